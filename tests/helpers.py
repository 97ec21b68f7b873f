"""Shared test helpers: devices, random inputs, gradient comparison, the low-precision tolerance rule."""
import importlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"  # CPU runs the kernels through TRITON_INTERPRET
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (real fp16/bf16 kernels)")
# The interpreter computes fp16 faithfully but not bf16, so CPU runs check the tolerance rule in fp16 only.
LOW_PRECISION = [torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float16]


def gpu_or_cpu(gpu_shape, cpu_shape):
    """Model-sized shapes on a GPU, interpreter-sized ones on CPU."""
    return gpu_shape if HAS_CUDA else cpu_shape


def op_module(name):
    """The op's module (the package re-exports functions under the module names)."""
    return importlib.import_module(f"ftkernels.{name}")


def rand(*shape, dtype=torch.float64, device=KERNEL_DEVICE, scale=1.0, requires_grad=True, noncontig=False):
    if noncontig:  # same values, frames not unit-stride: allocate (..., W, F) and transpose the last two
        t = (torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype, device=device) * scale).transpose(-1, -2)
    else:
        t = torch.randn(*shape, dtype=dtype, device=device) * scale
    return t.requires_grad_(requires_grad)


def grads(out, inputs, grad_out):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=False)


def assert_close_all(actual, expected, atol, rtol, names=None):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, atol=atol, rtol=rtol, msg=lambda m: f"{names[i] if names else i}: {m}")


def max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def assert_low_precision_ok(kernel_out, torch_out, ref64, name, floor=1e-5):
    """FlashAttention's rule: error of the kernel vs the float64 reference <= 2x the error of the
    PyTorch op computed in the same low precision, plus a tiny floor. The floor includes one unit
    roundoff of the largest reference value: no result beats the rounding of its own dtype (this
    matters for large reductions such as bias gradients, where both errors are mostly that rounding)."""
    k_err, t_err = max_err(kernel_out, ref64), max_err(torch_out, ref64)
    floor = floor + torch.finfo(kernel_out.dtype).eps / 2 * ref64.abs().max().item()
    assert k_err <= 2 * t_err + floor, f"{name}: kernel err {k_err:.3e} > 2 x torch err {t_err:.3e} + {floor:.3e}"


def assert_backends_agree(module, *inputs):
    """The module gives the same output on the Triton kernels and on the reference."""
    module.backend = "triton"
    out = module(*inputs)
    module.backend = "reference"
    torch.testing.assert_close(out, module(*inputs))
