"""squared_relu: interpreted Triton kernels vs the float64 reference (float32 on a GPU) of relu(x)**2, forward and
gradient, in every memory layout it keeps (contiguous, channels-last, permuted) or copies (strided views),
non-finite values as PyTorch's relu-then-square composition, and the low-precision rule. (Layout, NaN/Inf, range-end, opcheck and
compile coverage: the "squared_relu" case in tests/helpers.py.)"""
import pytest
import torch

import ftkernels
from ftkernels import reference
from helpers import HAS_CUDA, KERNEL_DEVICE, LOW_PRECISION, ORACLE_DTYPE, assert_low_precision_ok, gpu_or_cpu, grads, \
    op_module

mod = op_module("squared_relu")
# the gradient 2 relu(x) dy: the same roundings as the reference, up to the order of the two products
TIGHT = dict(atol=1e-6, rtol=1e-6) if HAS_CUDA else dict(atol=1e-15, rtol=1e-15)


def _rand(*shape, dtype=ORACLE_DTYPE):
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(KERNEL_DEVICE, dtype)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (5000,), (1,), (3, 1, 4097)])  # 4097: a partial last block
def test_matches_reference_float64(shape):
    x = _rand(*shape).requires_grad_()
    out = ftkernels.squared_relu(x, backend="triton")
    ref = reference.squared_relu(x)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # one rounding of r * r, as the reference
    g = _rand(*shape) * 3
    torch.testing.assert_close(grads(out, [x], g)[0], grads(ref, [x], g)[0], **TIGHT)


@pytest.mark.parametrize("layout", ["channels_last", "permuted", "step2"])
def test_layout_is_kept_or_copied(layout):
    """A dense x in any stride order (channels-last between the v4 convs) comes out in the same strides; a strided
    view is copied into a dense layout first; the gradient arrives in any layout."""
    base = _rand(2, 6, 5, 7)
    x = {"channels_last": base.contiguous(memory_format=torch.channels_last),
         "permuted": base.permute(3, 1, 0, 2).contiguous().permute(2, 1, 3, 0),
         "step2": torch.cat([base, base], dim=3)[..., ::2]}[layout].requires_grad_()
    out = ftkernels.squared_relu(x, backend="triton")
    if layout != "step2":
        assert out.stride() == x.stride()
    ref = reference.squared_relu(x)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    g = _rand(2, 6, 5, 7).transpose(2, 3).contiguous().transpose(2, 3)
    dx = grads(out, [x], g)[0]
    assert dx.stride() == torch.empty_like(x).stride()
    torch.testing.assert_close(dx, grads(ref, [x], g)[0], **TIGHT)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_non_finite_like_relu_then_square():
    """relu(NaN) = NaN, relu(-Inf) = 0; dx = 0 wherever relu(x) <= 0, even for an infinite dy (relu's backward
    masks PyTorch's 2 * 0 * Inf)."""
    x = torch.tensor([float("nan"), -float("inf"), float("inf"), -2.0, -0.0, 0.0, 3.0, -1.0, 2.0],
                     dtype=ORACLE_DTYPE, device=KERNEL_DEVICE, requires_grad=True)
    dy = torch.tensor([1.0, 1.0, 1.0, float("inf"), float("nan"), 1.0, float("inf"), -float("inf"), 0.0],
                      dtype=ORACLE_DTYPE, device=KERNEL_DEVICE)
    out = ftkernels.squared_relu(x, backend="triton")
    ref = reference.squared_relu(x)
    torch.testing.assert_close(out, ref, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(grads(out, [x], dy)[0], grads(ref, [x], dy)[0], atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_tolerance_rule(dtype):
    shape = gpu_or_cpu((8, 32, 1024, 256), (2, 5, 40, 37))
    x = (_rand(*shape) * 4).to(dtype).requires_grad_()
    out = ftkernels.squared_relu(x, backend="triton")
    low = torch.relu(x).square()
    x64 = x.detach().double().requires_grad_()
    ref = reference.squared_relu(x64)
    assert_low_precision_ok(out, low, ref, f"forward {dtype}")
    g = _rand(*shape)
    assert_low_precision_ok(grads(out, [x], g.to(dtype))[0], grads(low, [x], g.to(dtype))[0], grads(ref, [x64], g)[0],
                            f"dx {dtype}")


def test_module_and_empty_input():
    m = ftkernels.SquaredReLU(backend="triton")
    x = _rand(2, 3)
    torch.testing.assert_close(m(x), torch.relu(x).square())
    assert ftkernels.squared_relu(x[:0], backend="triton").shape == (0, 3)


@pytest.mark.parametrize("bad,match", [(lambda: [1.0], r"x must be a torch.Tensor"),
                                       (lambda: torch.ones(3, dtype=torch.int32), r"x must be a floating tensor")])
def test_bad_input_names_the_argument(bad, match):
    with pytest.raises(TypeError, match=match):
        ftkernels.squared_relu(bad())
