"""frame_norm: interpreted Triton kernels vs the float64 reference, forward and every gradient."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ftkernels
from ftkernels import reference
from helpers import LOW_PRECISION, KERNEL_DEVICE, TEST_SEED, assert_backends_agree, assert_close_all, \
    assert_low_precision_ok, gpu_or_cpu, grads, rand


def make(B, C, F, W, dtype=torch.float64, noncontig=False, device=KERNEL_DEVICE, offset=0.0):
    x = rand(B, C, F, W, dtype=dtype, noncontig=noncontig, device=device, requires_grad=False)
    x = (x + offset).requires_grad_()
    return x, rand(C, F, dtype=dtype, device=device), rand(C, F, dtype=dtype, device=device)


def check(x, w, b, eps=1e-5, atol=1e-10, rtol=1e-9):
    out = ftkernels.frame_norm(x, w, b, eps, backend="triton")
    ref = reference.frame_norm(x, w, b, eps)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    g = torch.randn_like(ref)
    inputs = [t for t in (x, w, b) if t is not None]
    assert_close_all(grads(out, inputs, g), grads(ref, inputs, g), atol, rtol, ["x", "weight", "bias"])


# F crosses the 32-feature chunk, W the 64-frame block; F = 1 (a constant frame), W = 1
@pytest.mark.parametrize("B,C,F,W,noncontig", [(2, 3, 37, 70, False), (1, 1, 1, 5, False), (3, 2, 64, 1, True),
                                                 (1, 5, 33, 129, True), (2, 1, 7, 3, False)])
def test_matches_reference_float64(B, C, F, W, noncontig):
    check(*make(B, C, F, W, noncontig=noncontig))


LARGE_MEAN_SEEDS = 48


@pytest.mark.parametrize("offset", [1e4, -3e3])
def test_large_mean_is_stable(offset):
    """A large offset (magnitude spectrogram-like) costs no accuracy: forward and every gradient within the
    rule of F.layer_norm's fp32 error, for each of 48 seeded draws (the kernel used to fail about one draw in
    ten, at up to 2.6x; now its forward error stays under the floor over 200 draws, dx under 0.6x, dweight
    under 1x)."""
    for seed in range(TEST_SEED, TEST_SEED + LARGE_MEAN_SEEDS):
        g = torch.Generator().manual_seed(seed)
        x = (torch.randn(1, 2, 40, 9, generator=g) + offset).to(KERNEL_DEVICE).requires_grad_()
        w, b = (torch.randn(2, 40, generator=g).to(KERNEL_DEVICE).requires_grad_() for _ in range(2))
        out = ftkernels.frame_norm(x, w, b, backend="triton")
        leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
        ref = reference.frame_norm(*leaves64)
        leaves32 = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        torch_fp32 = torch.nn.functional.layer_norm(leaves32[0].transpose(2, 3), (40,)).transpose(2, 3) \
            * leaves32[1][:, :, None] + leaves32[2][:, :, None]
        what = f"frame norm, mean {offset:g}, seed {seed}"
        assert_low_precision_ok(out, torch_fp32, ref, what, floor=1e-4)
        dy = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(KERNEL_DEVICE)
        for n, a, t, r in zip("xwb", grads(out, [x, w, b], dy.float()), grads(torch_fp32, leaves32, dy.float()),
                              grads(ref, leaves64, dy)):
            assert_low_precision_ok(a, t, r, f"{what}: d{n}", floor=1e-4)


def test_without_affine():
    x, _, _ = make(2, 3, 11, 13)
    check(x, None, None)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 3), C=st.integers(1, 4), F=st.integers(1, 70), W=st.integers(1, 90),
       noncontig=st.booleans(), eps=st.sampled_from([1e-5, 1e-3]))
def test_property_shapes(B, C, F, W, noncontig, eps):
    check(*make(B, C, F, W, noncontig=noncontig), eps=eps)


def test_gradcheck_through_kernel():
    x, w, b = make(1, 2, 5, 3)
    assert torch.autograd.gradcheck(lambda *a: ftkernels.frame_norm(*a, backend="triton"), (x, w, b), atol=1e-6)


def test_module():
    m = ftkernels.FrameNorm(3, 8).double().to(KERNEL_DEVICE)
    assert torch.equal(m.weight, torch.ones(3, 8, dtype=torch.float64, device=KERNEL_DEVICE))
    x = rand(2, 3, 8, 5)
    assert_backends_agree(m, x)
    assert "features=8" in repr(m)


@pytest.mark.parametrize("bad,match", [
    (lambda x, w, b: (x[0], w, b, 1e-5), r"x must have shape \(B, C, F, W\)"),
    (lambda x, w, b: (x, w[:, :-1], b, 1e-5), r"weight must have shape \(C, F\)"),
    (lambda x, w, b: (x, w, b[:-1], 1e-5), r"bias must have shape \(C, F\)"),
    (lambda x, w, b: (x, w.double(), b, 1e-5), r"weight has dtype"),
    (lambda x, w, b: (x, w, b, -1.0), r"eps must be a positive float"),
    (lambda x, w, b: (x[:, :, :0], w[:, :0], b[:, :0], 1e-5), r"x must be non-empty"),
])
def test_bad_input_names_the_argument(bad, match):
    x, w, b = make(2, 3, 4, 5, dtype=torch.float32, device="cpu")
    with pytest.raises((ValueError, TypeError), match=match):
        ftkernels.frame_norm(*bad(x.detach(), w.detach(), b.detach()))


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_tolerance_rule(dtype):
    B, C, F, W = gpu_or_cpu((4, 8, 1024, 256), (2, 3, 70, 67))
    x, w, b = make(B, C, F, W, dtype=dtype, offset=0.5)
    out = ftkernels.frame_norm(x, w, b, backend="triton")
    low = torch.nn.functional.layer_norm(x.transpose(2, 3), (F,)).transpose(2, 3) * w[:, :, None] + b[:, :, None]
    leaves64 = [t.detach().double().requires_grad_() for t in (x, w, b)]
    ref64 = reference.frame_norm(*leaves64)
    assert_low_precision_ok(out, low, ref64, f"forward {dtype}")
    g = torch.randn_like(ref64)
    for n, a, l, r in zip("xwb", grads(out, [x, w, b], g.to(dtype)), grads(low, [x, w, b], g.to(dtype)),
                          grads(ref64, leaves64, g)):
        assert_low_precision_ok(a, l, r, f"d{n} {dtype}")
