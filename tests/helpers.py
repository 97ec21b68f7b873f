"""Shared test helpers: devices, random inputs, memory layouts, the op cases every cross-op test runs, gradient
comparison and the low-precision tolerance rule.

Randomness: ``rand`` draws from torch's global RNG, which the root conftest seeds before every test;
``OpCase.make`` draws from its own seeded generator, so a case's inputs do not depend on test order.
"""
import dataclasses
import importlib
import math
import os
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

import ftkernels

HAS_CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if HAS_CUDA else "cpu"  # CPU runs the kernels through TRITON_INTERPRET
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (real fp16/bf16 kernels)")
# The interpreter computes fp16 faithfully but not bf16, so CPU runs check the tolerance rule in fp16 only.
LOW_PRECISION = [torch.float16, torch.bfloat16] if HAS_CUDA else [torch.float16]
# The exact-comparison dtype of the cross-op tests: float64 through the interpreter, float32 on a GPU.
ORACLE_DTYPE = torch.float32 if HAS_CUDA else torch.float64
ORACLE_TOL = dict(atol=2e-5, rtol=2e-5) if HAS_CUDA else dict(atol=1e-10, rtol=1e-9)
ATOL, RTOL = ORACLE_TOL["atol"], ORACLE_TOL["rtol"]
# gradcheck needs float64, which the kernels take only through the interpreter (on CUDA: fp32, fp16, bf16)
needs_float64_kernels = pytest.mark.skipif(HAS_CUDA, reason="float64 runs the kernels only through the CPU "
                                           "interpreter; the CUDA kernels take fp32/fp16/bf16")
# The seed of every test's inputs (conftest seeds the global RNGs with it too); set FTKERNELS_TEST_SEED to
# sweep seeds when checking that a test is not on an edge.
TEST_SEED = int(os.environ.get("FTKERNELS_TEST_SEED", "0"))


def gpu_or_cpu(gpu_shape, cpu_shape):
    """Model-sized shapes on a GPU, interpreter-sized ones on CPU."""
    return gpu_shape if HAS_CUDA else cpu_shape


def op_module(name):
    """The op's module (the package re-exports functions under the module names)."""
    return importlib.import_module(f"ftkernels.{name}")


def rand(*shape, dtype=ORACLE_DTYPE, device=KERNEL_DEVICE, scale=1.0, requires_grad=True, noncontig=False):
    if noncontig:  # same values, frames not unit-stride: allocate (..., W, F) and transpose the last two
        t = (torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype, device=device) * scale).transpose(-1, -2)
    else:
        t = torch.randn(*shape, dtype=dtype, device=device) * scale
    return t.requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------------
# memory layouts

VIEW_KINDS = ("transposed", "step2", "offset")


def as_layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """A tensor with t's values (and requires_grad) in another memory layout.

    "contiguous"; "transposed": the last two dims swapped in memory (a 1-D tensor: one column of a
    3-column matrix, stride 3); "step2": every other element of a twice-longer last dim (stride 2);
    "offset": contiguous, starting 3 elements into its storage. Every kind but "contiguous" is checked to
    really differ from a fresh contiguous tensor, so a test using it cannot silently test nothing.
    """
    shape = tuple(t.shape)
    kw = dict(dtype=t.dtype, device=t.device)
    if kind == "contiguous":
        view = torch.empty(shape, **kw)
    elif kind == "transposed":
        if len(shape) >= 2:
            view = torch.empty(*shape[:-2], shape[-1], shape[-2], **kw).transpose(-1, -2)
        else:
            view = torch.empty(shape[0], 3, **kw)[:, 0]
        assert not view.is_contiguous(), f"transposed view of shape {shape} is contiguous: pick other sizes"
    elif kind == "step2":
        view = torch.empty(*shape[:-1], 2 * shape[-1], **kw)[..., ::2]
        assert not view.is_contiguous(), f"step-2 view of shape {shape} is contiguous: pick other sizes"
    elif kind == "offset":
        view = torch.empty(t.numel() + 3, **kw)[3:].view(shape)
        assert view.storage_offset() == 3
    else:
        raise ValueError(f"unknown layout {kind!r}")
    with torch.no_grad():
        view.copy_(t)
    return view.requires_grad_(t.requires_grad)


# ----------------------------------------------------------------------------------------------
# op cases: every op, every tensor argument named, covering each kernel path


@dataclasses.dataclass(frozen=True)
class OpCase:
    """One call of a public op: tensor argument shapes (all present), fixed non-tensor arguments, and the
    PyTorch formulation the low-precision rule compares with (default: the reference run in that dtype)."""
    id: str
    fn: Callable
    shapes: Dict[str, Tuple[int, ...]]
    kwargs: Dict[str, object] = dataclasses.field(default_factory=dict)
    torch_op: Optional[Callable] = None

    @property
    def args(self) -> Tuple[str, ...]:
        return tuple(self.shapes)

    def scale(self, name: str) -> float:
        """Init scale: weights 1/sqrt(fan_in) (fan_in = last dim), the rest unit normal."""
        return self.shapes[name][-1] ** -0.5 if name.startswith("weight") else 1.0

    def make(self, dtype=None, seed: Optional[int] = None, device=KERNEL_DEVICE, requires_grad=True, scales=None
             ) -> Dict[str, torch.Tensor]:
        """Seeded inputs (drawn in float64, then cast), ``scales`` multiplying named arguments."""
        dtype = dtype or ORACLE_DTYPE
        g = torch.Generator().manual_seed(TEST_SEED if seed is None else seed)
        out = {}
        for name, shape in self.shapes.items():
            t = torch.randn(shape, generator=g, dtype=torch.float64) * self.scale(name)
            t = t * (scales or {}).get(name, 1.0)
            out[name] = t.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        return out

    def fixed(self, args: Dict[str, torch.Tensor]) -> Dict[str, object]:
        """The fixed arguments; tensors among them (attention's rotary_freqs) on the arguments' device."""
        dev = next(iter(args.values())).device
        return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in self.kwargs.items()}

    def __call__(self, args: Dict[str, torch.Tensor], backend: Optional[str]) -> torch.Tensor:
        return self.fn(**args, **self.fixed(args), backend=backend)

    def torch_low(self, args: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The PyTorch op in the arguments' (low) precision, for FlashAttention's rule."""
        if self.torch_op is None:
            return self(args, "reference")
        return self.torch_op(**args, **self.fixed(args))

    def grad_out(self, out: torch.Tensor, seed: Optional[int] = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(TEST_SEED + 1 if seed is None else seed)
        return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)


def layer_norm_low_precision(x, weight, bias, eps=1e-5):
    """torch's layer_norm over the features axis, affine in x's dtype: frame norm's PyTorch formulation."""
    y = torch.nn.functional.layer_norm(x.transpose(2, 3), (x.shape[2],), eps=eps).transpose(2, 3)
    return y * weight[:, :, None] + bias[:, :, None]


def frame_norm_channels_last(x, weight, bias, eps=1e-5, backend=None):
    """frame_norm writing y channels-last, as the v4 conv blocks call it (its own tiles in the kernels)."""
    return ftkernels.frame_norm(x, weight, bias, eps, backend, memory_format=torch.channels_last)


def layer_norm_low_precision_channels_last(x, weight, bias, eps=1e-5):
    return layer_norm_low_precision(x, weight, bias, eps).contiguous(memory_format=torch.channels_last)


def squared_relu_both_sides(x, backend=None):
    """relu(x)^2 + relu(-x)^2 (= x^2): every element reaches the output through one of the two calls, so a
    non-finite gradient is never masked by relu's zero side; x's own layout goes into the first call."""
    return ftkernels.squared_relu(x, backend) + ftkernels.squared_relu(-x, backend)


def sdpa_low_precision(q, k, v, num_heads, scale=None, rotary=True, rotary_freqs=None):
    """PyTorch's own attention op (SDPA) in the inputs' precision, rotary applied in that precision too (a
    stored table's rotation in fp32, as the v4 model's): multichannel attention's PyTorch formulation."""
    from ftkernels import reference

    qh, kh, vh = (reference._split_heads(t, num_heads) for t in (q, k, v))
    if rotary:
        qh, kh = reference.apply_rotary(qh, freqs=rotary_freqs), reference.apply_rotary(kh, freqs=rotary_freqs)
    d = q.shape[2] // num_heads
    o = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, scale=1 / math.sqrt(d) if scale is None
                                                         else scale)
    return o.transpose(-1, -2).reshape(q.shape)


def _ffn_shapes(C1=None, dw2=None, C=3, F=6, W=7, H=12, F2=5):
    s = dict(x=(1, C, F, W), weight1_pw=(C, H, F))
    if C1 is not None:
        s.update(weight1_dw=(C1, C), bias1_dw=(C1,))
    c1 = C1 or C
    s.update(bias1_pw=(C, H), weight2_pw=(c1, F2, H), bias2_pw=(c1, F2))
    if dw2 is not None:
        s.update(weight2_dw=(dw2, c1), bias2_dw=(dw2,))
    s.update(norm_weight=(C, F), norm_bias=(C, F))
    return s


# Each variant runs different kernels or epilogues: position-wise + mix (the mix's fused backward; C_out 4 and 9),
# mix only, the feed-forward with a mix in linear1 and/or linear2 (the squared ReLU in the position-wise or the
# channel-mix kernel's epilogue) or position-wise only. Wide mixes (C_out > 64: separate backward kernels) are in
# test_multichannel_linear.py / test_squared_relu_ffn.py (WIDE_CASES, FFN_WIDE).
OP_CASES = [
    OpCase("multichannel_linear-pw_mix", ftkernels.multichannel_linear,
           dict(x=(2, 3, 5, 7), weight_pw=(3, 6, 5), weight_dw=(4, 3), bias_pw=(3, 6), bias_dw=(4,))),
    OpCase("multichannel_linear-pw_mix9", ftkernels.multichannel_linear,
           dict(x=(2, 3, 5, 7), weight_pw=(3, 6, 5), weight_dw=(9, 3), bias_pw=(3, 6), bias_dw=(9,))),
    OpCase("multichannel_linear-depthwise", ftkernels.multichannel_linear,
           dict(x=(2, 3, 5, 7), weight_dw=(4, 3), bias_dw=(4,))),
    OpCase("frame_norm", ftkernels.frame_norm, dict(x=(2, 3, 37, 7), weight=(3, 37), bias=(3, 37)),
           torch_op=layer_norm_low_precision),
    OpCase("frame_norm-channels_last", frame_norm_channels_last, dict(x=(2, 5, 13, 9), weight=(5, 13), bias=(5, 13)),
           torch_op=layer_norm_low_precision_channels_last),
    OpCase("squared_relu", squared_relu_both_sides, dict(x=(2, 3, 5, 7))),
    OpCase("squared_relu_ffn-both_mixes", ftkernels.squared_relu_ffn, _ffn_shapes(C1=2, dw2=3)),
    OpCase("squared_relu_ffn-mix1", ftkernels.squared_relu_ffn, _ffn_shapes(C1=9)),
    OpCase("squared_relu_ffn-positionwise", ftkernels.squared_relu_ffn, _ffn_shapes(dw2=10)),
    OpCase("multichannel_attention", ftkernels.multichannel_attention,
           dict(q=(1, 2, 8, 7), k=(1, 2, 8, 5), v=(1, 2, 8, 5)), dict(num_heads=2), torch_op=sdpa_low_precision),
    # a stored rotary table (the v4 model's), odd head dim 5: two rotated pairs, the last feature as is
    OpCase("multichannel_attention-freqs", ftkernels.multichannel_attention,
           dict(q=(1, 2, 10, 7), k=(1, 2, 10, 5), v=(1, 2, 10, 5)),
           dict(num_heads=2, rotary_freqs=torch.tensor([1.0, 0.15], dtype=torch.float32)),
           torch_op=sdpa_low_precision),
]


def case_args(cases=OP_CASES, with_grad=True):
    """pytest params (case, argument name) for every tensor argument of every case; "grad" is the
    gradient flowing into the op's backward."""
    return [pytest.param(c, a, id=f"{c.id}-{a}") for c in cases for a in c.args + (("grad",) if with_grad else ())]


def run_case(case: OpCase, args: Dict[str, torch.Tensor], backend: str, grad: torch.Tensor = None):
    """(out, {name: gradient}) for every argument that requires grad; ``grad`` defaults to the case's."""
    out = case(args, backend)
    grad = case.grad_out(out) if grad is None else grad
    names = [n for n, t in args.items() if t.requires_grad]
    gs = torch.autograd.grad(out, [args[n] for n in names], grad)
    return out, dict(zip(names, gs))


def grads(out, inputs, grad_out):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=False)


def oracle_atol(expected, atol):
    """The absolute tolerance of an exact-oracle comparison. On CPU (float64 through the interpreter) ``atol``
    itself. On a GPU the oracle is fp32 on both sides, and a sum's round-off scales with its terms, not its
    result: a weight gradient of K = 1200 unit products (|values| ~ 35) differs from torch's by ~5e-5 where
    the value itself is near 0. There ``atol`` is relative to the tensor's largest finite value."""
    if not HAS_CUDA or not expected.is_floating_point() or expected.numel() == 0:
        return atol
    finite = expected.detach()[expected.detach().isfinite()]
    return atol * max(1.0, finite.abs().max().item()) if finite.numel() else atol


def assert_close_all(actual, expected, atol, rtol, names=None, equal_nan=False):
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, atol=oracle_atol(e, atol), rtol=rtol, equal_nan=equal_nan,
                                   msg=lambda m: f"{names[i] if names else i}: {m}")


# ----------------------------------------------------------------------------------------------
# the low-precision tolerance rule


def max_err(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def assert_low_precision_ok(kernel_out, torch_out, ref64, name, floor=1e-5, allow_overflow_everywhere=False,
                            rule_min_elements=0):
    """FlashAttention's rule: error of the kernel vs the float64 reference <= 2x the error of the
    PyTorch op computed in the same low precision, plus a tiny floor. The floor includes one unit
    roundoff of the largest reference value: no result beats the rounding of its own dtype (this
    matters for large reductions such as bias gradients, where both errors are mostly that rounding).

    Overflow: where the PyTorch op leaves the dtype's range (Inf/NaN: its error there is unbounded) the
    rule allows anything, and so where the exact value itself rounds to Inf in the dtype. The kernel may
    also round to Inf where the exact value is within the rule's tolerance of the overflow threshold
    (Inf is then the rounding of an admissible value). Everywhere else it must be finite.

    ``rule_min_elements``: outputs with fewer finite elements get the finiteness check only. Across seeds,
    the max error over a handful of numbers (a bias gradient of a few channels, summed from inputs whose
    rounding is correlated along the reduction) is one draw of a random variable, and the ratio of two such
    draws exceeds 2 by chance. Returns whether the rule was checked (False with
    ``allow_overflow_everywhere`` when PyTorch overflowed everywhere, or for a small output).
    """
    assert ref64.isfinite().all(), f"{name}: the float64 reference is not finite; pick other inputs"
    fi = torch.finfo(kernel_out.dtype)
    ok = torch_out.isfinite() & ref64.to(kernel_out.dtype).isfinite()
    if not ok.any():
        assert allow_overflow_everywhere, f"{name}: the results overflow everywhere; the rule checks nothing"
        return False
    t_err = max_err(torch_out[ok], ref64[ok])
    floor = floor + fi.eps / 2 * ref64[ok].abs().max().item()
    tol = 2 * t_err + floor
    threshold = fi.max + fi.eps * 2.0 ** math.floor(math.log2(fi.max)) / 2  # rounds to Inf from here on
    inf = ok & ~kernel_out.isfinite()
    bad = inf & (ref64.abs() + tol < threshold)
    assert not bad.any(), f"{name}: kernel gives Inf/NaN at {int(bad.sum())} positions where PyTorch is finite"
    ok = ok & ~inf
    if int(ok.sum()) < rule_min_elements:
        return False
    k_err = max_err(kernel_out[ok], ref64[ok])
    assert k_err <= tol, f"{name}: kernel err {k_err:.3e} > 2 x torch err {t_err:.3e} + {floor:.3e}"
    return True


def assert_backends_agree(module, *inputs):
    """The module gives the same output on the Triton kernels and on the reference."""
    module.backend = "triton"
    out = module(*inputs)
    module.backend = "reference"
    torch.testing.assert_close(out, module(*inputs))

