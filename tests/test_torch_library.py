"""torch.library integration: every custom op (forward and backward) under opcheck on contiguous and
non-contiguous inputs, fakes that describe exactly what the kernels return (shape, dtype, strides), and
torch.compile(fullgraph=True) forward and backward on transposed-view inputs."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import ftkernels
from helpers import KERNEL_DEVICE, OP_CASES, ORACLE_DTYPE, VIEW_KINDS, as_layout, rand

ops = torch.ops.ftkernels
CASE = {c.id: c for c in OP_CASES}


def _views(args, layout):
    """All tensors contiguous, or each a different kind of view (transposed / step-2 / offset, cycling)."""
    if layout == "contiguous":
        return args
    return {n: as_layout(t, VIEW_KINDS[i % len(VIEW_KINDS)]) for i, (n, t) in enumerate(args.items())}


def _grad_like(out, layout):
    g = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    return g if layout == "contiguous" else as_layout(g, "transposed")


def _detached(args):
    return [a.detach() if isinstance(a, torch.Tensor) else a for a in args]


# Each builder: (case, layout) -> [(op, args)] for the forward op and its backward op, the backward's saved
# tensors from a real forward run. Optional arguments absent in a case are passed as None.

def _saved(t, kind, layout):
    """A saved-only output handed to a backward op: as a view when testing views (empty ones stay as they are)."""
    return as_layout(t, kind) if layout != "contiguous" and t.numel() else t


def _mcl(case_id, layout):
    a = _views(CASE[case_id].make(), layout)
    fwd = (a["x"], a.get("weight_pw"), a.get("weight_dw"), a.get("bias_pw"), a.get("bias_dw"))
    out, y = ops.multichannel_linear(*_detached(fwd))
    x, w_pw, w_dw = _detached(fwd[:3])
    bwd = (_grad_like(out, layout), x, _saved(y, "transposed", layout), w_pw, w_dw, "bias_pw" in a, "bias_dw" in a)
    return [(ops.multichannel_linear.default, fwd), (ops.multichannel_linear_backward.default, bwd)]


def _frame_norm(case_id, layout):
    a = _views(CASE[case_id].make(), layout)
    fwd = (a["x"], a["weight"], a["bias"], 1e-5)
    y, mean, rstd = ops.frame_norm(*_detached(fwd))
    if layout != "contiguous":
        mean, rstd = as_layout(mean, "step2"), as_layout(rstd, "offset")
    bwd = (_grad_like(y, layout), *_detached(fwd[:2]), mean, rstd)
    return [(ops.frame_norm.default, fwd), (ops.frame_norm_backward.default, bwd)]


def _frame_norm_channels_last(case_id, layout):
    """y written channels-last in fp32 (out_dtype), the gradient arriving channels-last as from a conv."""
    a = _views(CASE[case_id].make(), layout)
    fwd = (a["x"], a["weight"], a["bias"], 1e-5, torch.float32, True)
    y, mean, rstd = ops.frame_norm(*_detached(fwd))
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    dy = _grad_like(y, layout)
    bwd = (dy.contiguous(memory_format=torch.channels_last) if layout == "contiguous" else dy,
           *_detached(fwd[:2]), mean, rstd)
    return [(ops.frame_norm.default, fwd), (ops.frame_norm_backward.default, bwd)]


def _squared_relu(case_id, layout):
    a = _views(CASE[case_id].make(), layout)
    fwd = (a["x"],)
    y = ops.squared_relu(*_detached(fwd))
    return [(ops.squared_relu.default, fwd), (ops.squared_relu_backward.default, (_grad_like(y, layout),
                                                                              a["x"].detach()))]


_FFN = ("weight1_pw", "weight2_pw", "weight1_dw", "bias1_pw", "bias1_dw", "weight2_dw", "bias2_pw", "bias2_dw",
        "norm_weight", "norm_bias")


def _ffn(case_id, layout):
    a = _views(CASE[case_id].make(), layout)
    p = [a.get(n) for n in _FFN]
    fwd = (a["x"], *p, 1e-5, True)
    out, hidden, mean, rstd, y1, y2 = ops.squared_relu_ffn(*_detached(fwd))
    hidden, mean, rstd = (_saved(t, k, layout) for t, k in ((hidden, "transposed"), (mean, "step2"), (rstd, "offset")))
    y1, y2 = _saved(y1, "transposed", layout), _saved(y2, "step2", layout)
    w1pw, w2pw, w1dw, b1pw, b1dw, w2dw, b2pw, b2dw, nw, nb = _detached(p)
    bwd = (_grad_like(out, layout), a["x"].detach(), hidden, mean, rstd, y1, y2, w1pw, w2pw, w1dw, w2dw, nw, nb,
           b1pw is not None, b1dw is not None, b2pw is not None, b2dw is not None, True)
    return [(ops.squared_relu_ffn.default, fwd), (ops.squared_relu_ffn_backward.default, bwd)]


def _attention(case_id, layout):
    case = CASE[case_id]
    a = _views(case.make(), layout)
    freqs = case.fixed(a).get("rotary_freqs")
    if freqs is not None and layout != "contiguous":
        freqs = as_layout(freqs, "step2")
    fwd = (a["q"], a["k"], a["v"], 2, 0.5, True, freqs)
    out, lse = ops.multichannel_attention(*_detached(fwd))
    if layout != "contiguous":
        out, lse = as_layout(out, "transposed"), as_layout(lse, "step2")
    bwd = (_grad_like(out, layout), *_detached(fwd[:3]), out, lse, 2, 0.5, True, freqs)
    return [(ops.multichannel_attention.default, fwd), (ops.multichannel_attention_backward.default, bwd)]


BUILDERS = [
    ("multichannel_linear-pw_mix", _mcl), ("multichannel_linear-pw_mix9", _mcl),
    ("multichannel_linear-depthwise", _mcl), ("frame_norm", _frame_norm),
    ("frame_norm-channels_last", _frame_norm_channels_last), ("squared_relu", _squared_relu),
    ("squared_relu_ffn-both_mixes", _ffn),
    ("squared_relu_ffn-mix1", _ffn), ("multichannel_attention", _attention),
    ("multichannel_attention-freqs", _attention),
]
OP_PARAMS = [pytest.param(cid, b, which, layout, id=f"{cid}-{which}-{layout}")
             for cid, b in BUILDERS for which in ("forward", "backward") for layout in ("contiguous", "views")]


def _op_and_args(case_id, builder, which, layout):
    op, args = builder(case_id, layout)[0 if which == "forward" else 1]
    if layout == "views":
        assert any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in args)
    return op, args


@pytest.mark.parametrize("case_id,builder,which,layout", OP_PARAMS)
def test_opcheck(case_id, builder, which, layout):
    op, args = _op_and_args(case_id, builder, which, layout)
    torch.library.opcheck(op, args)


def _fake(t, mode):
    return mode.from_tensor(t) if isinstance(t, torch.Tensor) else t


def _flat(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


@pytest.mark.parametrize("case_id,builder,which,layout", OP_PARAMS)
def test_fake_matches_real_outputs(case_id, builder, which, layout):
    """The fake (meta) kernel's outputs have the real kernel's shapes, dtypes and strides."""
    op, args = _op_and_args(case_id, builder, which, layout)
    inputs = _detached(args)
    real = _flat(op(*inputs))
    with FakeTensorMode() as mode:
        fake = _flat(op(*[_fake(a, mode) for a in inputs]))
    assert len(real) == len(fake)
    for i, (r, f) in enumerate(zip(real, fake)):
        assert (tuple(f.shape), f.dtype, f.stride()) == (tuple(r.shape), r.dtype, r.stride()), \
            f"output {i}: fake {tuple(f.shape)} {f.dtype} {f.stride()} vs real {tuple(r.shape)} {r.dtype} {r.stride()}"


# ----------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True), forward and backward


def _compile_check(case, backend, layout="transposed"):
    args = {n: as_layout(t, layout) for n, t in case.make().items()}

    def fn(**kw):
        return case(kw, "triton").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got = compiled(**args)
    g_got = torch.autograd.grad(got, list(args.values()))
    want = fn(**args)
    g_want = torch.autograd.grad(want, list(args.values()))
    torch.testing.assert_close(got, want)
    for n, a, b in zip(args, g_got, g_want):
        torch.testing.assert_close(a, b, msg=lambda m: f"d{n}: {m}")


@pytest.mark.parametrize("case", [CASE[c] for c, _ in BUILDERS], ids=[c for c, _ in BUILDERS])
def test_compile_fullgraph_backward_on_transposed_views(case):
    """aot_eager: AOTAutograd traces forward and backward through the fakes (no inductor codegen)."""
    _compile_check(case, "aot_eager")


def test_inductor_fullgraph_backward_on_transposed_views():
    """inductor checks every custom op's real output strides against its fake (assert_size_stride): the
    backward used to fail here with x or weight_pw a transposed view. All four ops in one graph."""
    C, F, W = 3, 8, 6
    torch.manual_seed(0)
    tv = lambda *s: as_layout(torch.randn(*s, dtype=ORACLE_DTYPE, device=KERNEL_DEVICE), "transposed")  # noqa
    x = tv(2, C, F, W).requires_grad_()
    params = dict(
        weight_pw=tv(C, F, F).requires_grad_(), bias_pw=tv(C, F).requires_grad_(),
        norm_weight=tv(C, F).requires_grad_(), w1=tv(C, 2 * F, F).requires_grad_(),
        w2=tv(C, F, 2 * F).requires_grad_(), w1dw=tv(C, C).requires_grad_())

    def fn(x, p):
        h = ftkernels.multichannel_linear(x, p["weight_pw"], None, p["bias_pw"], backend="triton")
        h = ftkernels.frame_norm(h, p["norm_weight"], None, backend="triton")
        h = h + ftkernels.squared_relu_ffn(h, p["w1"], p["w2"], p["w1dw"], backend="triton")
        return ftkernels.multichannel_attention(h, h, h, 2, backend="triton").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    leaves = [x, *params.values()]
    # no on-disk graph caches: their keys do not cover a custom op's fake, so a stale entry could hide a
    # fake that changed. Inductor on CPU needs a C++ compiler (CI's image has g++).
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        got = compiled(x, params)
        g_got = torch.autograd.grad(got, leaves)
    want = fn(x, params)
    g_want = torch.autograd.grad(want, leaves)
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


class Block(torch.nn.Module):
    """x + ffn(x) after a frame norm and a multichannel linear: all three ops in one graph."""

    def __init__(self):
        super().__init__()
        self.norm = ftkernels.FrameNorm(3, 8, backend="triton")
        self.proj = ftkernels.MultichannelLinear(3, 3, 8, 8, depthwise=True, bias=True, backend="triton")
        self.ffn = ftkernels.SquaredReLUFeedForward(3, 8, expansion=2, backend="triton")

    def forward(self, x):
        h = self.proj(self.norm(x))
        return h + self.ffn(h)


def test_torch_compile_fullgraph_matches_eager():
    m = Block().to(KERNEL_DEVICE, ORACLE_DTYPE)
    x = rand(2, 3, 8, 6)
    eager = m(x)
    g_eager = torch.autograd.grad(eager.sum(), [x, *m.parameters()])
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager" if KERNEL_DEVICE == "cpu" else "inductor")
    out = compiled(x)
    g_comp = torch.autograd.grad(out.sum(), [x, *m.parameters()])
    torch.testing.assert_close(out, eager)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b)
