"""Multichannel attention: Triton kernels (the CPU interpreter here, real kernels on CUDA) vs the reference."""
import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ftkernels import reference
from helpers import LOW_PRECISION, TEST_SEED, assert_low_precision_ok, gpu_or_cpu, sdpa_low_precision
from ftkernels.multichannel_attention import MultichannelMultiheadAttention, _mca_op, multichannel_attention
from helpers import op_module

mca = op_module("multichannel_attention")

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
# the exact-comparison dtype: float64 through the interpreter; the CUDA kernels take fp32/fp16/bf16
EXACT = torch.float32 if HAS_CUDA else torch.float64
EXACT_TOL = dict(atol=2e-4, rtol=1e-3) if HAS_CUDA else dict(atol=1e-9, rtol=1e-7)


def _qkv(B, C, F, wq, wk, dtype=EXACT, device=DEV, seed=None):
    g = torch.Generator().manual_seed(TEST_SEED if seed is None else seed)
    mk = lambda w: torch.randn(B, C, F, w, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa
    return mk(wq), mk(wk), mk(wk)


def _check(q, k, v, H, rotary, scale=None, atol=1e-9, rtol=1e-7, grads=True):
    qs, ks, vs = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    qr, kr, vr = (t.detach().clone().requires_grad_(grads) for t in (q, k, v))
    out = multichannel_attention(qs, ks, vs, H, scale=scale, rotary=rotary, backend="triton")
    ref = reference.multichannel_attention(qr, kr, vr, H, scale=scale, rotary=rotary)
    assert out.shape == ref.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    if grads:
        g = torch.randn_like(ref)
        got = torch.autograd.grad(out, (qs, ks, vs), g)
        want = torch.autograd.grad(ref, (qr, kr, vr), g)
        for name, a, b in zip("qkv", got, want):
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"d{name}: {m}")


# (B, C, H, d, Wq, Wk, rotary): head dims 4..128 (BLOCK_D 16, 32, 64, 128), frame counts 1, 7, 33, 130,
# memory attention (Wq != Wk), rotary on and off, odd head dim without rotary
CASES = [
    (1, 2, 2, 4, 7, 7, True),
    (1, 1, 2, 8, 33, 33, True),
    (2, 1, 1, 16, 1, 1, True),
    (1, 1, 1, 16, 1, 130, True),
    (1, 1, 2, 24, 130, 33, True),
    (1, 1, 1, 24, 33, 7, False),
    (1, 1, 1, 64, 130, 130, True),
    (1, 1, 1, 64, 7, 33, False),
    (1, 1, 1, 128, 33, 70, True),
    (1, 1, 3, 5, 7, 33, False),
]


@pytest.mark.parametrize("B,C,H,d,wq,wk,rotary", CASES)
def test_matches_reference_fp64(B, C, H, d, wq, wk, rotary):
    q, k, v = _qkv(B, C, H * d, wq, wk, device=DEV if not HAS_CUDA else "cpu")
    if HAS_CUDA:  # fp64 is an interpreter-only oracle dtype; on CUDA compare fp32 kernels instead
        q, k, v = (t.to(DEV, torch.float32) for t in (q, k, v))
        _check(q, k, v, H, rotary, atol=2e-4, rtol=1e-3)
    else:
        _check(q, k, v, H, rotary)


def test_fp32_and_custom_scale():
    q, k, v = _qkv(1, 2, 32, 33, 20, dtype=torch.float32)
    _check(q, k, v, 2, True, scale=1 / math.sqrt(32), atol=1e-5, rtol=1e-4)


def test_self_attention_same_tensor():
    x, _, _ = _qkv(1, 2, 16, 33, 33)
    if not HAS_CUDA:
        _check(x, x, x, 2, True)
    # one tensor as q, k and v: gradients accumulate through all three uses
    xa = x.detach().clone().requires_grad_()
    xb = x.detach().clone().requires_grad_()
    multichannel_attention(xa, xa, xa, 2, backend="triton").square().sum().backward()
    reference.multichannel_attention(xb, xb, xb, 2).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4 if HAS_CUDA else 1e-9, rtol=1e-4 if HAS_CUDA else 1e-7)


def test_non_contiguous_inputs():
    B, C, F, wq, wk = 2, 3, 16, 33, 20
    dt = torch.float32 if HAS_CUDA else torch.float64
    tol = dict(atol=2e-4, rtol=1e-3) if HAS_CUDA else dict(atol=1e-9, rtol=1e-7)
    g = torch.Generator().manual_seed(TEST_SEED + 1)
    # q: frames-major storage seen through a transpose (stride 1 along features)
    q = torch.randn(B, C, wq, F, generator=g, dtype=torch.float64).to(DEV, dt).transpose(2, 3)
    # k: every other frame of a longer sequence, from a channel slice
    k = torch.randn(B, C + 2, F, 2 * wk, generator=g, dtype=torch.float64).to(DEV, dt)[:, 1:C + 1, :, ::2]
    # v: batch/channel permuted storage
    v = torch.randn(C, B, F, wk, generator=g, dtype=torch.float64).to(DEV, dt).transpose(0, 1)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(q, k, v, 4, True, **tol)


def test_gradcheck():
    if HAS_CUDA:
        pytest.skip("float64 gradcheck runs through the interpreter (CPU)")
    q, k, v = _qkv(1, 1, 8, 5, 3)
    for rotary in (True, False):
        args = tuple(t.clone().requires_grad_() for t in (q, k, v))
        assert torch.autograd.gradcheck(
            lambda a, b, c: multichannel_attention(a, b, c, 2, rotary=rotary, backend="triton"), args,
            fast_mode=True)


def test_backward_deterministic():
    q, k, v = _qkv(1, 1, 16, 70, 70, dtype=torch.float32)
    grads = []
    for _ in range(2):
        args = tuple(t.clone().requires_grad_() for t in (q, k, v))
        out = multichannel_attention(*args, 1, backend="triton")
        grads.append(torch.autograd.grad(out, args, torch.ones_like(out)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@pytest.mark.parametrize("d", [4, 16, 64])
def test_reference_rotary_matches_rotary_embedding_torch(d):
    rotary_embedding_torch = pytest.importorskip("rotary_embedding_torch")
    rot = rotary_embedding_torch.RotaryEmbedding(dim=d)
    t = torch.randn(2, 3, 37, d, dtype=torch.float64)
    # rotary-embedding-torch keeps its frequencies in float32, hence the float64 tolerance
    torch.testing.assert_close(reference.apply_rotary(t), rot.rotate_queries_or_keys(t).to(t.dtype),
                               atol=1e-5, rtol=1e-5)
    t32 = t.float()
    torch.testing.assert_close(reference.apply_rotary(t32), rot.rotate_queries_or_keys(t32), atol=1e-4, rtol=1e-4)


def test_opcheck():
    q, k, v = _qkv(1, 2, 8, 5, 7, dtype=torch.float32)
    args = [t.requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(_mca_op, (*args, 2, 0.5, True))
    torch.library.opcheck(_mca_op, (*(t.detach() for t in args), 2, 0.5, False))


def _compile(fn):
    """torch.compile(fullgraph=True); inductor on CPU needs a C++ toolchain, else the aot_eager backend."""
    compiled = torch.compile(fn, fullgraph=True)

    def run(*args):
        nonlocal compiled
        try:
            return compiled(*args)
        except Exception as e:
            if "compiler" not in str(e).lower() and "cpp" not in str(e).lower():
                raise
            torch._dynamo.reset()
            compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
            return compiled(*args)
    return run


def test_module_compile_fullgraph_matches_reference():
    C, H, F = 2, 2, 16
    mod = MultichannelMultiheadAttention(C, H, F, backend="triton").to(DEV)
    ref = MultichannelMultiheadAttention(C, H, F, backend="reference").to(DEV)
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(1, C, F, 9, device=DEV)
    mem = torch.randn(1, C, F, 5, device=DEV)
    compiled = _compile(mod)
    torch.testing.assert_close(compiled(x), ref(x), atol=1e-4, rtol=1e-4)
    out, want = compiled(x, mem), ref(x, mem)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    # backward through the compiled module: attention and the multichannel-linear projections
    for a, b in zip(torch.autograd.grad(out.square().sum(), list(mod.parameters())),
                    torch.autograd.grad(want.square().sum(), list(ref.parameters()))):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_op_compile_fullgraph_backward():
    q, k, v = _qkv(1, 2, 16, 9, 5, dtype=torch.float32)
    fn = _compile(lambda a, b, c: multichannel_attention(a, b, c, 2, scale=0.25, backend="triton").square().sum())
    args = tuple(t.clone().requires_grad_() for t in (q, k, v))
    rargs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    got = torch.autograd.grad(fn(*args), args)
    want = torch.autograd.grad(reference.multichannel_attention(*rargs, 2, scale=0.25).square().sum(), rargs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_module_scale_default_and_auto_backend_cpu():
    mod = MultichannelMultiheadAttention(2, 4, 16)
    assert mod.scale == pytest.approx(1 / math.sqrt(16))
    q, k, v = _qkv(1, 2, 16, 5, 6, device="cpu")
    # CPU + auto: the reference
    torch.testing.assert_close(multichannel_attention(q, k, v, 4), reference.multichannel_attention(q, k, v, 4),
                               atol=0, rtol=0)
    out = mod(torch.randn(1, 2, 16, 5), torch.randn(1, 2, 16, 8))
    assert out.shape == (1, 2, 16, 5)


def test_bad_inputs():
    q, k, v = _qkv(1, 2, 8, 5, 6, device="cpu")
    with pytest.raises(ValueError, match="q"):
        multichannel_attention(q[0], k, v, 2)
    with pytest.raises(TypeError, match="k"):
        multichannel_attention(q, k.numpy(), v, 2)
    with pytest.raises(ValueError, match="num_heads"):
        multichannel_attention(q, k, v, 3)
    with pytest.raises(ValueError, match="num_heads"):
        multichannel_attention(q, k, v, 0)
    with pytest.raises(TypeError, match="num_heads"):
        multichannel_attention(q, k, v, 2.0)
    with pytest.raises(ValueError, match="rotary"):
        multichannel_attention(q, k, v, 8)  # head dim 1: odd
    with pytest.raises(ValueError, match="^k"):
        multichannel_attention(q, k[:, :1], v[:, :1], 2)
    with pytest.raises(ValueError, match="^v"):
        multichannel_attention(q, k, v[..., :3], 2)
    with pytest.raises(ValueError, match="^v"):
        multichannel_attention(q, k, v[:, :, :4], 2)
    with pytest.raises(TypeError, match="^v"):  # a dtype other than q's (float32 is q's own on a GPU)
        multichannel_attention(q, k, v.to(torch.float16), 2)
    with pytest.raises(TypeError, match="scale"):
        multichannel_attention(q, k, v, 2, scale="big")
    with pytest.raises(ValueError, match="q"):
        multichannel_attention(q[..., :0], k, v, 2)
    if HAS_CUDA:
        with pytest.raises(ValueError, match="^k"):
            multichannel_attention(q.cuda(), k, v.cuda(), 2)
    else:
        with pytest.raises(ValueError, match="^k"):
            multichannel_attention(q, k.to("meta"), v, 2)
    with pytest.raises(ValueError, match="num_heads"):
        MultichannelMultiheadAttention(2, 3, 16)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("d,stored", [(4, False), (64, False), (128, False), (64, True), (9, True)])
def test_low_precision_tolerance_rule(dtype, d, stored):
    """FlashAttention's rule for the output and dq, dk, dv (fp16 in the interpreter, fp16/bf16 on CUDA):
    kernel error vs float64 <= 2x the error of PyTorch's SDPA in the same precision + a floor. ``stored``:
    rotary from a stored table (the v4 model's; odd head dim 9: the last feature is not rotated), which
    both the kernel and the PyTorch side rotate in fp32."""
    B, C, wq, wk = gpu_or_cpu((2, 4, 513, 257), (1, 1, 37, 21))
    q, k, v = _qkv(B, C, 2 * d, wq, wk, dtype=dtype)
    scale = 1 / math.sqrt(2 * d)
    freqs = _freqs(d) if stored else None
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    low_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = multichannel_attention(*leaves, 2, scale=scale, backend="triton", rotary_freqs=freqs)
    low = sdpa_low_precision(*low_leaves, 2, scale=scale, rotary_freqs=freqs)
    ref = reference.multichannel_attention(*leaves64, 2, scale=scale, rotary_freqs=freqs)
    what = f"{dtype} d={d}" + (" stored table" if stored else "")
    assert_low_precision_ok(out, low, ref, f"out {what}")
    g = torch.randn_like(ref)
    for n, a, b, c in zip("qkv", torch.autograd.grad(out, leaves, g.to(dtype)),
                          torch.autograd.grad(low, low_leaves, g.to(dtype)), torch.autograd.grad(ref, leaves64, g)):
        assert_low_precision_ok(a, b, c, f"d{n} {what}")


# ----------------------------------------------------------------------------------------------
# every autotune config, the rotary table from stored frequencies, TF32, saved-only lse


def _config_rounds():
    """Rounds of forced configs per head-dim class: round i runs the i-th config of every list of the class
    (both dtype groups), so every GPU config runs through the interpreter once."""
    rounds = []
    for head in mca.HEAD_CLASSES:
        lists = {(kern, grp): cfgs for (kern, h, grp), cfgs in mca.CONFIGS.items() if h == head}
        for grp in ("16", "32"):
            n = max(len(cfgs) for (kern, g), cfgs in lists.items() if g == grp)
            for i in range(n):
                rounds.append((head, {kern: lists[(kern, grp)][min(i, len(lists[(kern, grp)]) - 1)]
                                      for kern in mca.KERNELS}))
    return rounds


# a head dim per class: not a power of two (masked feature columns; class 128 reads the dq kernel's rotated q)
_CLASS_HEAD_DIM = {"128": 98, "64": 40, "32": 18}


@pytest.mark.skipif(HAS_CUDA, reason="forces configs through the interpreter (the GPU autotunes over them)")
@pytest.mark.parametrize("head,configs", _config_rounds(),
                         ids=[f"{h}-" + "-".join(f"{k}{c.kwargs['BM']}x{c.kwargs['BN']}" for k, c in cfg.items())
                              for h, cfg in _config_rounds()])
def test_every_config_matches_reference_fp64(head, configs):
    """Each GPU config's tiles (query blocks BM, key blocks BN) on frame counts that leave partial tiles."""
    d = _CLASS_HEAD_DIM[head]
    q, k, v = _qkv(1, 1, 2 * d, 130, 70)
    with contextlib.ExitStack() as stack:
        for kern, cfg in configs.items():
            stack.enter_context(mca.forced_config(kern, cfg))
        _check(q, k, v, 2, True)


def _freqs(d, dtype=torch.float32, device=DEV):
    """A stored table as upstream's rotary computes it (fp32), perturbed so it is not the theta default."""
    base = 1.0 / (10000 ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    return (base * (1 + 0.01 * torch.arange(d // 2))).to(device=device, dtype=dtype)


@pytest.mark.parametrize("d,wq,wk", [(6, 9, 9), (5, 7, 12), (64, 33, 20), (128, 20, 33), (1, 5, 5)])
def test_rotary_freqs_match_reference_fp64(d, wq, wk):
    """Odd head dims (the last feature is not rotated; d = 1 rotates nothing), memory attention, the dq
    kernel's rotated-q path (d = 128)."""
    q, k, v = _qkv(1, 2, 2 * d, wq, wk)
    freqs = _freqs(d)
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = multichannel_attention(qs, ks, vs, 2, rotary_freqs=freqs, backend="triton")
    ref = reference.multichannel_attention(qr, kr, vr, 2, rotary_freqs=freqs)
    tol = EXACT_TOL
    torch.testing.assert_close(out, ref, **tol)
    g = torch.randn_like(ref)
    for n, a, b in zip("qkv", torch.autograd.grad(out, (qs, ks, vs), g), torch.autograd.grad(ref, (qr, kr, vr), g)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"d{n}: {m}")
    if d > 1:  # the table is used: another table gives another result
        other = multichannel_attention(q, k, v, 2, rotary_freqs=freqs * 1.1, backend="triton")
        assert (other - out).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rotary_freqs_are_the_v4_models_rotary(dtype):
    """The op with the stored table equals the v4 model's own rotation (RotaryEmbedding, angles rounded in the
    table's dtype) followed by attention without rotary: the fusion changes nothing but rounding."""
    from frame_transformer.model import RotaryEmbedding
    B, C, H, d, W = 1, 2, 2, 6, 11
    rot = RotaryEmbedding(d).to(dtype)
    with torch.no_grad():
        rot.freqs.mul_(1 + 0.01 * torch.arange(d // 2, dtype=dtype))
    q, k, v = (t.to(dtype) for t in _qkv(B, C, H * d, W, W, device="cpu"))
    want = reference.multichannel_attention(rot(q, H), rot(k, H), v, H, 0.3, rotary=False)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-13, rtol=1e-12)
    got_ref = multichannel_attention(q, k, v, H, 0.3, backend="reference", rotary_freqs=rot.freqs)
    torch.testing.assert_close(got_ref, want, **tol)
    if not HAS_CUDA:
        got = multichannel_attention(q, k, v, H, 0.3, backend="triton", rotary_freqs=rot.freqs)
        torch.testing.assert_close(got, want, **tol)


def test_rotary_freq_tables_follow_the_tensor():
    """The kernels' cos/sin tables are cached per frequency tensor: an in-place change (a checkpoint loaded into
    the buffer) or another tensor is seen, a freed tensor's entry goes away."""
    q, k, v = _qkv(1, 1, 8, 9, 9)
    freqs = _freqs(4)

    def run(f):
        return multichannel_attention(q, k, v, 2, rotary_freqs=f, backend="triton")
    first = run(freqs)
    with torch.no_grad():
        freqs.mul_(1.5)
    changed = run(freqs)
    torch.testing.assert_close(changed, reference.multichannel_attention(q, k, v, 2, rotary_freqs=freqs), **EXACT_TOL)
    assert (changed - first).abs().max() > 1e-3
    twin = freqs.clone()
    assert torch.equal(run(twin), changed)
    n = len(mca._FREQ_TABLES)
    del twin
    assert len(mca._FREQ_TABLES) == n - 1


def test_rotary_freqs_bad_inputs():
    q, k, v = _qkv(1, 2, 8, 5, 6, device="cpu")
    with pytest.raises(ValueError, match=r"rotary_freqs must have shape \(head_dim // 2,\) = \(2,\)"):
        multichannel_attention(q, k, v, 2, rotary_freqs=torch.ones(3))
    with pytest.raises(ValueError, match="rotary_freqs must have shape"):
        multichannel_attention(q, k, v, 2, rotary_freqs=torch.ones(1, 2))
    with pytest.raises(ValueError, match="rotary=False"):
        multichannel_attention(q, k, v, 2, rotary=False, rotary_freqs=torch.ones(2))
    with pytest.raises(TypeError, match="rotary_freqs must be a floating"):
        multichannel_attention(q, k, v, 2, rotary_freqs=torch.ones(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="rotary_freqs must be a torch.Tensor"):
        multichannel_attention(q, k, v, 2, rotary_freqs=[1.0, 0.1])
    with pytest.raises(ValueError, match="rotary_freqs is on meta"):
        multichannel_attention(q, k, v, 2, rotary_freqs=torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match="rotary_freqs requires grad"):
        multichannel_attention(q, k, v, 2, rotary_freqs=torch.ones(2, requires_grad=True))
    # an odd head dim: the stored table's length defines the pairs (no error, unlike the theta default)
    assert multichannel_attention(q, k, v, 4, rotary_freqs=torch.ones(1)).shape == q.shape


def test_opcheck_rotary_freqs():
    q, k, v = _qkv(1, 2, 10, 5, 7, dtype=torch.float32)
    args = [t.requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(_mca_op, (*args, 2, 0.5, True, _freqs(5)))


@pytest.mark.parametrize("tf32", [False, True])
def test_fp32_dots_follow_torchs_tf32_setting(tf32):
    """fp32 launches take input_precision "tf32" exactly when torch allows TF32 matmuls (as torch.matmul),
    "ieee" by default; half types always "ieee". Results stay right either way (the interpreter computes
    fp32 dots exactly: it checks the plumbing, the compile gate the tf32 build)."""
    from ftkernels import _launch_recorder as lr
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if not HAS_CUDA:
            with lr.recording() as rec, torch.device("meta"):
                for dt in (torch.float32, torch.bfloat16):
                    q, k, v = (torch.empty(1, 2, 32, 9, dtype=dt, requires_grad=True) for _ in range(3))
                    multichannel_attention(q, k, v, 2).sum().backward()
            got = {(l.args["q_ptr"][1], l.kernel.split(":")[1], l.args["PRECISION"][1]) for l in rec.launches}
            want = "tf32" if tf32 else "ieee"
            assert got == {(dt, kern, p) for dt, p in (("fp32", want), ("bf16", "ieee"))
                           for kern in ("_mca_fwd_kernel", "_mca_bwd_dq_kernel", "_mca_bwd_dkdv_kernel")}
        q, k, v = _qkv(1, 2, 32, 20, 9, dtype=torch.float32)
        tol = dict(atol=5e-3, rtol=5e-3) if (tf32 and HAS_CUDA) else dict(atol=1e-5, rtol=1e-4)
        _check(q, k, v, 2, True, **tol)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


class _Fills(TorchDispatchMode):
    """Records the shapes of the tensors that fill ops create (zero gradients autograd materialises)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[-1]
        if name in ("zeros", "zeros_like", "new_zeros", "zero_", "fill_", "full", "full_like", "new_full"):
            self.shapes.append(tuple(out.shape))
        return out


def test_lse_gets_no_materialised_zero_gradient():
    """lse (saved for backward only) costs no zero-filled gradient tensor in backward, and backward through
    lse alone is no kernel launch at all."""
    q, k, v = _qkv(1, 2, 8, 5, 7, dtype=torch.float32)
    args = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = _mca_op(*args, 2, 0.5, True)
    assert lse.shape == (1, 2, 2, 5) and not lse.requires_grad
    with _Fills() as fills:
        grads = torch.autograd.grad(out.square().sum(), args)
    assert fills.shapes == [], f"zero tensors allocated in backward: {fills.shapes}"
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
