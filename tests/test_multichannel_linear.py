"""multichannel_linear: interpreted Triton kernels vs the float64 reference, forward and every gradient."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ftkernels
from ftkernels import reference
from helpers import LOW_PRECISION, KERNEL_DEVICE, assert_backends_agree, assert_close_all, assert_low_precision_ok, \
    gpu_or_cpu, grads, op_module, rand

mcl = op_module("multichannel_linear")


def make(B, C_in, C_out, F_in, F_out, W, pw=True, dw=True, bias=True, dtype=torch.float64, noncontig=False,
         device=KERNEL_DEVICE):
    x = rand(B, C_in, F_in, W, dtype=dtype, noncontig=noncontig, device=device)
    s_pw, s_dw = 1 / math.sqrt(F_in), 1 / math.sqrt(C_in)
    p = dict(
        weight_pw=rand(C_in, F_out, F_in, dtype=dtype, scale=s_pw, device=device) if pw else None,
        weight_dw=rand(C_out, C_in, dtype=dtype, scale=s_dw, device=device) if dw else None,
        bias_pw=rand(C_in, F_out, dtype=dtype, device=device) if pw and bias else None,
        bias_dw=rand(C_out, dtype=dtype, device=device) if dw and bias else None,
    )
    return x, p


def check_against_reference(x, p, atol=1e-10, rtol=1e-9):
    out = ftkernels.multichannel_linear(x, **p, backend="triton")
    ref = reference.multichannel_linear(x, **p)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    g = torch.randn_like(ref)
    names = ["x"] + [k for k, v in p.items() if v is not None]
    inputs = [x] + [v for v in p.values() if v is not None]
    assert_close_all(grads(out, inputs, g), grads(ref, inputs, g), atol, rtol, names)


# (B, C_in, C_out, F_in, F_out, W, pw, dw, bias, noncontig): fused mix (C_out <= 8), two-pass (C_out > 8),
# position-wise only, depth-wise only, W smaller than a block, W = 1, F = 1, non-contiguous frames.
CASES = [
    (2, 3, 3, 5, 7, 11, True, False, True, False),
    (2, 3, 2, 5, 7, 11, True, True, True, False),
    (1, 3, 8, 17, 9, 13, True, True, False, True),
    (1, 3, 11, 17, 9, 13, True, True, True, False),
    (2, 5, 3, 6, 6, 9, False, True, True, True),
    (1, 2, 13, 4, 4, 3, False, True, False, False),
    (3, 1, 1, 1, 1, 1, True, True, True, False),
    (1, 2, 2, 37, 1, 70, True, False, False, True),
    (1, 1, 5, 33, 65, 67, True, True, True, True),
]


@pytest.mark.parametrize("B,C_in,C_out,F_in,F_out,W,pw,dw,bias,noncontig", CASES)
def test_matches_reference_float64(B, C_in, C_out, F_in, F_out, W, pw, dw, bias, noncontig):
    x, p = make(B, C_in, C_out, F_in, F_out, W, pw, dw, bias, noncontig=noncontig)
    check_against_reference(x, p)


def test_float32_kernel_vs_float64_reference():
    x, p = make(2, 3, 5, 40, 24, 19, dtype=torch.float32)
    out = ftkernels.multichannel_linear(x, **p, backend="triton")
    ref = reference.multichannel_linear(x.double(), **{k: v.double() for k, v in p.items()})
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), C_in=st.integers(1, 5), C_out=st.integers(1, 12), F_in=st.integers(1, 40),
       F_out=st.integers(1, 40), W=st.integers(1, 70), mode=st.sampled_from(["pw", "dw", "both"]),
       bias=st.booleans(), noncontig=st.booleans())
def test_property_shapes(B, C_in, C_out, F_in, F_out, W, mode, bias, noncontig):
    pw, dw = mode in ("pw", "both"), mode in ("dw", "both")
    if not pw:
        F_out = F_in
    if not dw:
        C_out = C_in
    x, p = make(B, C_in, C_out, F_in, F_out, W, pw, dw, bias, noncontig=noncontig)
    check_against_reference(x, p)


def test_gradcheck_through_kernel():
    x, p = make(1, 2, 3, 2, 3, 2)
    names = ["x"] + list(p)

    def fn(*args):
        kw = dict(zip(names[1:], args[1:]))
        return ftkernels.multichannel_linear(args[0], **kw, backend="triton")

    assert torch.autograd.gradcheck(fn, (x, *p.values()), eps=1e-6, atol=1e-6)


def test_module_init_and_backends_agree():
    m = ftkernels.MultichannelLinear(3, 6, 10, 12, depthwise=True, bias=True).double().to(KERNEL_DEVICE)
    assert m.weight_pw.shape == (3, 12, 10) and m.weight_dw.shape == (6, 3)
    assert m.bias_pw.shape == (3, 12) and m.bias_dw.shape == (6,)
    assert m.weight_pw.abs().max() <= 1 / math.sqrt(10) and m.weight_dw.abs().max() <= 1 / math.sqrt(3)
    x = rand(2, 3, 10, 7)
    assert_backends_agree(m, x)
    assert "channels=3->6" in repr(m)


def test_seed_rules_for_which_weights_exist():
    assert ftkernels.MultichannelLinear(4, 4, 8, 8, positionwise=False).weight_pw is None
    assert ftkernels.MultichannelLinear(4, 4, 8, 16, positionwise=False).weight_pw is not None
    assert ftkernels.MultichannelLinear(4, 4, 8, 8).weight_dw is None
    assert ftkernels.MultichannelLinear(4, 2, 8, 8).weight_dw is not None


def test_fused_and_two_pass_paths_agree():
    """C_out = 8 takes the fused kernel, 9 the two-pass path: both match the reference."""
    for C_out in (8, 9):
        x, p = make(2, 3, C_out, 20, 18, 21)
        check_against_reference(x, p)


def test_cpu_auto_backend_is_reference():
    x, p = make(1, 2, 3, 4, 5, 6, device="cpu")
    torch.testing.assert_close(ftkernels.multichannel_linear(x, **p, backend="auto"),
                               reference.multichannel_linear(x, **p), atol=0, rtol=0)


@pytest.mark.parametrize("bad,match", [
    (lambda x, p: (x[0], p), r"x must have shape \(B, C_in, F_in, W\)"),
    (lambda x, p: (x, {**p, "weight_pw": p["weight_pw"][:, :, :-1]}), r"weight_pw must have shape"),
    (lambda x, p: (x, {**p, "weight_dw": p["weight_dw"][:, :-1]}), r"weight_dw must have shape"),
    (lambda x, p: (x, {**p, "bias_pw": p["bias_pw"][:-1]}), r"bias_pw must have shape"),
    (lambda x, p: (x, {**p, "bias_dw": p["bias_dw"][:-1]}), r"bias_dw must have shape"),
    (lambda x, p: (x, {**p, "weight_pw": p["weight_pw"].double()}), r"weight_pw has dtype"),
    (lambda x, p: (x.long(), p), r"x must be a floating tensor"),
    (lambda x, p: (x[:0], p), r"x must be non-empty"),
    (lambda x, p: (x, {k: None for k in p}), r"needs weight_pw \(C_in, F_out, F_in\) or weight_dw"),
    (lambda x, p: (x, {**p, "weight_pw": None}), r"bias_pw given without weight_pw"),
    (lambda x, p: (x.tolist(), p), r"x must be a torch.Tensor"),
])
def test_bad_input_names_the_argument(bad, match):
    x, p = make(2, 3, 4, 5, 6, 7, device="cpu", dtype=torch.float32)
    x, p = bad(x.detach(), {k: v.detach() for k, v in p.items()})
    with pytest.raises((ValueError, TypeError), match=match):
        ftkernels.multichannel_linear(x, **p)


def test_device_mismatch_is_reported():
    x, p = make(1, 2, 2, 3, 3, 4, device="cpu", dtype=torch.float32)
    p["weight_dw"] = p["weight_dw"].detach().to("meta")
    with pytest.raises(ValueError, match="weight_dw is on meta"):
        ftkernels.multichannel_linear(x, **p)


def test_triton_backend_on_cpu_without_interpreter_is_refused(monkeypatch):
    from ftkernels import _common

    monkeypatch.setattr(_common, "INTERPRET", False)
    x, p = make(1, 2, 2, 3, 3, 4, device="cpu", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        ftkernels.multichannel_linear(x, **p, backend="triton")


def test_autocast_casts_to_autocast_dtype():
    x, p = make(1, 2, 3, 4, 5, 6, device="cpu", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ftkernels.multichannel_linear(x, **p)
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("C_out", [4, 16])
def test_low_precision_tolerance_rule(dtype, C_out):
    """FlashAttention's rule, forward and every gradient, fused (C_out = 4) and two-pass (16) paths."""
    B, C_in, F_in, F_out, W = gpu_or_cpu((4, 8, 256, 384, 256), (2, 3, 40, 48, 37))
    x, p = make(B, C_in, C_out, F_in, F_out, W, dtype=dtype)
    out = ftkernels.multichannel_linear(x, **p, backend="triton")
    ref_low = reference.multichannel_linear(x, **p)
    x64 = x.detach().double().requires_grad_()
    p64 = {k: v.detach().double().requires_grad_() for k, v in p.items()}
    ref64 = reference.multichannel_linear(x64, **p64)
    assert_low_precision_ok(out, ref_low, ref64, f"forward {dtype}")
    g = torch.randn_like(ref64)
    names = ["x"] + list(p)
    for n, a, b, c in zip(names, grads(out, [x, *p.values()], g.to(dtype)), grads(ref_low, [x, *p.values()],
                          g.to(dtype)), grads(ref64, [x64, *p64.values()], g)):
        assert_low_precision_ok(a, b, c, f"d{n} {dtype}")
