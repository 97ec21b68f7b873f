"""squared_relu_ffn: the fused feed-forward (norm prologues, relu^2 epilogue, 2*sqrt(h) backward) vs reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ftkernels
from ftkernels import reference
from helpers import ATOL, LOW_PRECISION, KERNEL_DEVICE, OP_CASES, ORACLE_DTYPE, RTOL, OpCase, _ffn_shapes, \
    assert_close_all, assert_low_precision_ok, gpu_or_cpu, grads, needs_float64_kernels, op_module, rand

mcl = op_module("multichannel_linear")
ffn_module = op_module("squared_relu_ffn")


@pytest.fixture(params=["h", "relu"])
def saved(request, monkeypatch):
    """Run float64 (float32 on a GPU) through either saved-activation design (fp16 saves relu(z), the others
    relu(z)^2), so the exact oracle tests cover the kernels of both."""
    if request.param == "relu":
        monkeypatch.setattr(mcl, "SAVE_RELU_DTYPES", mcl.SAVE_RELU_DTYPES + (torch.float64, torch.float32))
    assert ffn_module.saves_relu(torch.float64) == (request.param == "relu")
    return request.param


def make(B, C, F, W, H, C1=None, C2=None, F2=None, dw1=True, dw2=False, bias=True, norm=True, dtype=ORACLE_DTYPE,
         device=KERNEL_DEVICE, noncontig=False):
    C1 = C1 or C
    C2 = C2 or C1
    F2 = F2 or F
    x = rand(B, C, F, W, dtype=dtype, device=device, noncontig=noncontig)
    r = lambda *s, scale=1.0: rand(*s, dtype=dtype, device=device, scale=scale)  # noqa: E731
    p = dict(weight1_pw=r(C, H, F, scale=F ** -0.5), weight2_pw=r(C1, F2, H, scale=H ** -0.5),
             weight1_dw=r(C1, C, scale=C ** -0.5) if dw1 else None,
             bias1_pw=r(C, H) if bias else None, bias1_dw=r(C1) if bias and dw1 else None,
             weight2_dw=r(C2, C1, scale=C1 ** -0.5) if dw2 else None,
             bias2_pw=r(C1, F2) if bias else None, bias2_dw=r(C2) if bias and dw2 else None,
             norm_weight=r(C, F) if norm else None, norm_bias=r(C, F) if norm else None)
    return x, p


def check(x, p, norm=True, atol=ATOL, rtol=RTOL):
    out = ftkernels.squared_relu_ffn(x, **p, norm=norm, backend="triton")
    ref = reference.squared_relu_ffn(x, **p, norm=norm)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    g = torch.randn_like(ref)
    names = ["x"] + [k for k, v in p.items() if v is not None]
    inputs = [x] + [v for v in p.values() if v is not None]
    assert_close_all(grads(out, inputs, g), grads(ref, inputs, g), atol, rtol, names)


@pytest.mark.parametrize("kw", [
    dict(B=2, C=3, F=6, W=9, H=12),                                  # fused norm + small mix + relu^2
    dict(B=1, C=3, F=5, W=11, H=7, C1=10, noncontig=True),           # small mix, non-contiguous x
    dict(B=1, C=3, F=5, W=11, H=7, C1=67),                           # wide mix (C1 > 64)
    dict(B=2, C=2, F=7, W=5, H=14, dw1=False, bias=False),           # position-wise only
    dict(B=1, C=4, F=5, W=3, H=10, dw2=True, C2=3, F2=4),            # linear2 with a channel mix, new F
    dict(B=1, C=2, F=9, W=66, H=17, norm=False),                     # no norm
    dict(B=1, C=1, F=1, W=1, H=16),                                  # degenerate sizes
])
def test_matches_reference_float64(kw, saved):
    norm = kw.get("norm", True)
    check(*make(**kw), norm=norm)


@pytest.mark.parametrize("saved", ["relu"], indirect=True)
@pytest.mark.parametrize("arg", ["x", "grad", "bias1_pw", "weight2_pw"])
@pytest.mark.parametrize("case", [c for c in OP_CASES if c.id.startswith("squared_relu_ffn")], ids=lambda c: c.id)
def test_nan_inf_saved_relu_design(case, arg, saved):
    """NaN/Inf positions of the saved-relu(z) design (fp16's), exercised in float64 (test_nonfinite runs the
    float64 default, the saved-h design, on every argument)."""
    from test_nonfinite import SPECIALS, _check

    for value in SPECIALS:
        _check(case, arg, value, index=5)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 2), C=st.integers(1, 4), F=st.integers(1, 24), W=st.integers(1, 40), k=st.integers(1, 4),
       C1=st.integers(1, 11), dw1=st.booleans(), dw2=st.booleans(), bias=st.booleans(), norm=st.booleans())
def test_property_shapes(B, C, F, W, k, C1, dw1, dw2, bias, norm):
    C1 = C1 if dw1 else C
    check(*make(B, C, F, W, H=k * F, C1=C1, dw1=dw1, dw2=dw2, bias=bias, norm=norm), norm=norm)


@needs_float64_kernels
def test_gradcheck_through_kernel():
    x, p = make(1, 2, 3, 4, H=6)
    names = list(p)

    def fn(x, *vals):
        return ftkernels.squared_relu_ffn(x, **dict(zip(names, vals)), backend="triton")

    assert torch.autograd.gradcheck(fn, (x, *p.values()), atol=1e-6)


def test_module_matches_composed_modules():
    m = ftkernels.SquaredReLUFeedForward(3, 8, expansion=2, bias=True).to(KERNEL_DEVICE, ORACLE_DTYPE)
    x = rand(2, 3, 8, 5)
    m.backend = "triton"
    out = m(x)
    composed = m.linear2(ftkernels.reference.squared_relu(m.linear1(m.norm(x))))
    torch.testing.assert_close(out, composed)
    assert m.linear1.weight_dw is not None and m.linear1.weight_pw.shape == (3, 16, 8)


def test_bad_input_names_the_argument():
    x, p = make(1, 2, 4, 3, H=8, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"weight2_pw must have shape \(C1, F2, H\)"):
        ftkernels.squared_relu_ffn(x, **{**p, "weight2_pw": p["weight2_pw"][:, :, :-1]})
    with pytest.raises(ValueError, match=r"norm_weight|weight must have shape \(C, F\)"):
        ftkernels.squared_relu_ffn(x, **{**p, "norm_weight": p["norm_weight"][:, :-1]})
    with pytest.raises(TypeError, match=r"bias1_pw has dtype"):
        ftkernels.squared_relu_ffn(x, **{**p, "bias1_pw": p["bias1_pw"].double()})


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("C1", [4, 16])
def test_low_precision_tolerance_rule(dtype, C1):
    B, C, F, W, H = gpu_or_cpu((2, 4, 256, 256, 512), (1, 3, 24, 37, 48))
    x, p = make(B, C, F, W, H=H, C1=C1, dtype=dtype)
    out = ftkernels.squared_relu_ffn(x, **p, backend="triton")
    low = reference.squared_relu_ffn(x, **p)
    x64 = x.detach().double().requires_grad_()
    p64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in p.items()}
    ref64 = reference.squared_relu_ffn(x64, **p64)
    assert_low_precision_ok(out, low, ref64, f"forward {dtype}")
    g = torch.randn_like(ref64)
    names = ["x"] + [k for k, v in p.items() if v is not None]
    ins = [x] + [v for v in p.values() if v is not None]
    ins64 = [x64] + [v for v in p64.values() if v is not None]
    for n, a, l, r in zip(names, grads(out, ins, g.to(dtype)), grads(low, ins, g.to(dtype)), grads(ref64, ins64, g)):
        assert_low_precision_ok(a, l, r, f"d{n} {dtype}")


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("end,norm", [("large", False), ("tiny", False), ("tiny", True)])
def test_squared_relu_range_ends(dtype, end, norm):
    """The pre-activation z at both ends of the low-precision range, every gradient under the rule.

    large: z ~ 300 on a few frames, so h = z^2 overflows fp16 there (in PyTorch too: the forward and
    dweight2 are Inf on those frames) while PyTorch's dz = 2 relu(z) dh, and so dx, stays finite.
    tiny: z ~ 1e-3, so h = z^2 ~ 1e-6 is an fp16 subnormal with a few bits: 2 sqrt(h) from a saved h would
    be off by percents where PyTorch's 2 relu(z) is exact. Through the norm, z is made tiny by its affine.
    """
    B, C, F, W, H = gpu_or_cpu((2, 4, 256, 256, 512), (1, 3, 24, 37, 48))
    x, p = make(B, C, F, W, H=H, C1=4, dtype=torch.float64, norm=norm)
    with torch.no_grad():
        if end == "large":
            x[..., 3::11] *= 300.0  # about 4 frames
        elif norm:
            for n in ("norm_weight", "norm_bias", "bias1_pw", "bias1_dw"):
                p[n] *= 1e-3
        else:
            x *= 1e-3
            p["bias1_pw"] *= 1e-3
            p["bias1_dw"] *= 1e-3
    x = x.detach().to(dtype).requires_grad_()
    p = {k: v.detach().to(dtype).requires_grad_() if v is not None else None for k, v in p.items()}
    out = ftkernels.squared_relu_ffn(x, **p, norm=norm, backend="triton")
    low = reference.squared_relu_ffn(x, **p, norm=norm)
    x64 = x.detach().double().requires_grad_()
    p64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in p.items()}
    ref64 = reference.squared_relu_ffn(x64, **p64, norm=norm)
    fi = torch.finfo(dtype)
    floor = fi.smallest_normal * fi.eps  # one subnormal spacing: the default 1e-5 would hide the tiny end
    if end == "large" and dtype == torch.float16:  # bf16 has fp32's range
        assert not low.isfinite().all() and low.isfinite().any(), "h should overflow fp16 on some frames only"
    assert_low_precision_ok(out, low, ref64, f"forward {dtype}", floor=floor)
    g = torch.randn_like(ref64)
    names = ["x"] + [k for k, v in p.items() if v is not None]
    ins = [x] + [v for v in p.values() if v is not None]
    ins64 = [x64] + [v for v in p64.values() if v is not None]
    for n, a, l, r in zip(names, grads(out, ins, g.to(dtype)), grads(low, ins, g.to(dtype)), grads(ref64, ins64, g)):
        # large: PyTorch's channel-mix weight gradients overflow everywhere (sums of z-sized terms)
        checked = assert_low_precision_ok(a, l, r, f"d{n} {dtype}", floor=floor, allow_overflow_everywhere=True)
        assert checked or n.endswith("_dw"), f"d{n}: nothing checked"


# ----------------------------------------------------------------------------------------------
# kernel variants: every autotune config through the feed-forward's prologues/epilogues, the wide-mix path
# under the cross-op checks, no zero-filled gradients


def _tile_configs():
    from test_multichannel_linear import TILE_CONFIGS
    return TILE_CONFIGS


# per kernel, feed-forwards that launch it, sized to cross every config's tiles and no larger (the interpreter
# runs them): make(B, C, F, W, H, ...) keyword sets
_FFN_GEMMS = dict(B=2, C=2, F=70, W=70, H=130, dw1=False)  # position-wise GEMMs and their weight gradients
_FFN_WIDE = dict(B=1, C=3, F=5, W=60, H=5, C1=66)  # linear1's wide mix with the relu^2 epilogue: N = 300
_FFN_SMALL = dict(B=1, C=3, F=5, W=60, H=5, C1=4, dw2=True, C2=3)  # fused mix backwards (relu^2 gradient)
FFN_LAYERS_OF = {"pw": [_FFN_GEMMS], "wg": [_FFN_GEMMS, _FFN_WIDE], "mix": [_FFN_WIDE], "mixb": [_FFN_SMALL]}


def _ffn_tile_params():
    """Every tile config once, the saved-activation designs alternating along each kernel's list (so every kernel
    runs configs of both designs: the squaring prologue of the saved-relu(z) design in pw / wg)."""
    out = []
    for i, p in enumerate(_tile_configs()):
        design = ("h", "relu")[i % 2]
        out.append(pytest.param(*p.values, design, id=f"{design}-{p.id}"))
    return out


@pytest.mark.parametrize("kernel,config,saved", _ffn_tile_params(), indirect=["saved"])
def test_every_autotune_config_in_the_feed_forward(kernel, config, saved, monkeypatch):
    """Every GPU config of every kernel, forced through the interpreter: the norm prologue (position-wise forward
    and weight gradient), the squaring prologue (saved relu(z)), the activation and squared-ReLU-gradient
    epilogues, small and wide mixes; split K on (an H100's SM count)."""
    monkeypatch.setattr(mcl, "_num_sms", lambda device: 132)
    with mcl.forced_config(kernel, config):
        for kw in FFN_LAYERS_OF[kernel]:
            check(*make(**kw, noncontig=True))


FFN_WIDE = OpCase("squared_relu_ffn-wide_mix", ftkernels.squared_relu_ffn, _ffn_shapes(C1=66))


@pytest.mark.parametrize("arg", ["weight1_dw", "grad"])
def test_wide_mix_layouts_and_nonfinite(arg):
    """linear1's wide mix (C1 > 64: separate dy and weight-gradient kernels), which the shared OP_CASES do not
    take, under test_layouts' and test_nonfinite's checks for its own weight and the incoming gradient."""
    from test_multichannel_linear import test_wide_mix_layouts_and_nonfinite as check_case

    check_case(FFN_WIDE, arg)


@pytest.mark.parametrize("layout", ["views"])  # contiguous: test_multichannel_linear's wide-mix opcheck
def test_wide_mix_opcheck(layout):
    from test_torch_library import _FFN, _detached, _grad_like, _saved, _views

    a = _views(FFN_WIDE.make(), layout)
    p = [a.get(n) for n in _FFN]
    fwd = (a["x"], *p, 1e-5, True)
    torch.library.opcheck(torch.ops.ftkernels.squared_relu_ffn.default, fwd)
    out, hidden, mean, rstd, y1, y2 = torch.ops.ftkernels.squared_relu_ffn(*_detached(fwd))
    hidden, mean, rstd, y1 = (_saved(t, k, layout) for t, k in ((hidden, "transposed"), (mean, "step2"),
                                                                 (rstd, "offset"), (y1, "transposed")))
    w1pw, w2pw, w1dw, b1pw, b1dw, w2dw, b2pw, b2dw, nw, nb = _detached(p)
    bwd = (_grad_like(out, layout), a["x"].detach(), hidden, mean, rstd, y1, y2, w1pw, w2pw, w1dw, w2dw, nw, nb,
           b1pw is not None, b1dw is not None, b2pw is not None, b2dw is not None, True)
    torch.library.opcheck(torch.ops.ftkernels.squared_relu_ffn_backward.default, bwd)


@pytest.mark.parametrize("dw", [False, True])
def test_saved_only_outputs_cost_no_zero_gradients(dw):
    """hidden, mean, rstd and the saved position-wise outputs y1 / y2 are non-differentiable outputs of the op:
    backward gets no zero-filled gradients for them (it used to get one per output and call)."""
    from test_multichannel_linear import assert_no_zero_gradients

    x, p = make(2, 3, 6, 7, H=12, C1=4 if dw else None, dw1=dw, dw2=dw, C2=5)
    args = [p[n] for n in ("weight1_pw", "weight2_pw", "weight1_dw", "bias1_pw", "bias1_dw", "weight2_dw", "bias2_pw",
                           "bias2_dw", "norm_weight", "norm_bias")]
    out, *saved_only = torch.ops.ftkernels.squared_relu_ffn(x, *args, 1e-5, True)
    assert [tuple(t.shape) for t in saved_only] == [(2, 4 if dw else 3, 12, 7), (2, 3, 7), (2, 3, 7)] + (
        [(2, 3, 12, 7), (2, 4, 6, 7)] if dw else [(0,), (0,)])
    assert not any(t.requires_grad for t in saved_only)
    assert_no_zero_gradients(out, [x] + [t for t in args if t is not None])
