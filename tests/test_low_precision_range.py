"""Both ends of the low-precision range (fp16 through the interpreter; fp16 and bf16 on a GPU) under
FlashAttention's rule, for every tensor argument of every op and the gradient entering backward: one
argument scaled up by 2^8 (values in fp16's top decades) or down by 2^-16 (fp16 subnormals), the others
as usual. Where PyTorch's own op overflows the rule allows anything, and the kernel must be finite
everywhere else. The floor is one subnormal spacing of the dtype, far below the default 1e-5 that would
hide tiny values.

Arguments an op is not linear in reach the end of the range at a smaller scale, and past it the test
would only measure cancellation noise between two overflowing computations: the feed-forward's
pre-activation arguments (h = z^2, so 2^4 puts h in fp16's top decades; test_squared_relu_ffn covers z ~ 300
where h overflows) and attention's q and k (the logits' scale: 2^4 already saturates the softmax).
Shapes are interpreter-sized but large enough that the rule's max-error statistic is stable across seeds
(checked over FTKERNELS_TEST_SEED=0..7); outputs of fewer than 32 numbers (the small channel-mix weight and
bias gradients) are checked for spurious Inf/NaN only: at the range ends their inputs are near-constant
along the reduction (a tiny pre-activation weight leaves z = its bias), the rounding errors do not average,
and the max error over four numbers is one random draw (the normal-range rule tests in each op's file and
the float64 tests hold them).
"""
import pytest
import torch

import ftkernels
from helpers import LOW_PRECISION, OpCase, _ffn_shapes, assert_low_precision_ok, case_args, frame_norm_channels_last, \
    layer_norm_low_precision, layer_norm_low_precision_channels_last, sdpa_low_precision, squared_relu_both_sides

RANGE_CASES = [
    OpCase("multichannel_linear-pw_mix", ftkernels.multichannel_linear,
           dict(x=(2, 3, 24, 37), weight_pw=(3, 40, 24), weight_dw=(4, 3), bias_pw=(3, 40), bias_dw=(4,))),
    OpCase("multichannel_linear-pw_mix9", ftkernels.multichannel_linear,
           dict(x=(2, 3, 24, 37), weight_pw=(3, 40, 24), weight_dw=(12, 3), bias_pw=(3, 40), bias_dw=(12,))),
    OpCase("frame_norm", ftkernels.frame_norm, dict(x=(2, 3, 40, 37), weight=(3, 40), bias=(3, 40)),
           torch_op=layer_norm_low_precision),
    OpCase("frame_norm-channels_last", frame_norm_channels_last, dict(x=(2, 18, 40, 21), weight=(18, 40),
                                                                      bias=(18, 40)),
           torch_op=layer_norm_low_precision_channels_last),
    OpCase("squared_relu", squared_relu_both_sides, dict(x=(2, 3, 24, 37))),
    OpCase("squared_relu_ffn-both_mixes", ftkernels.squared_relu_ffn, _ffn_shapes(C1=4, dw2=3, F=24, W=37, H=48, F2=20)),
    OpCase("squared_relu_ffn-mix1", ftkernels.squared_relu_ffn, _ffn_shapes(C1=12, F=24, W=37, H=48, F2=20)),
    OpCase("multichannel_attention", ftkernels.multichannel_attention,
           dict(q=(1, 2, 32, 37), k=(1, 2, 32, 21), v=(1, 2, 32, 21)), dict(num_heads=2), torch_op=sdpa_low_precision),
]
RANGE = {"large": 2.0 ** 8, "tiny": 2.0 ** -16}
NONLINEAR_LARGE = 2.0 ** 4
NONLINEAR = {"weight1_pw", "bias1_pw", "weight1_dw", "bias1_dw", "norm_weight", "norm_bias", "q", "k"}
NONLINEAR_CASES = {"squared_relu"}  # every argument: y = x^2


def low_precision_check(case, args_low, grad64, dtype, what, floor):
    """Kernel and PyTorch op in ``dtype`` vs float64 on the same (rounded) inputs, forward and every gradient.
    An output that PyTorch overflows everywhere checks nothing, but some output must be checked."""
    leaves = {n: t.detach().clone().requires_grad_() for n, t in args_low.items()}
    torch_leaves = {n: t.detach().clone().requires_grad_() for n, t in args_low.items()}
    leaves64 = {n: t.detach().double().requires_grad_() for n, t in args_low.items()}
    out = case(leaves, "triton")
    low = case.torch_low(torch_leaves)
    ref = case(leaves64, "reference")
    kw = dict(floor=floor, allow_overflow_everywhere=True, rule_min_elements=32)
    checked = [assert_low_precision_ok(out, low, ref, f"{what}: forward", **kw)]
    names = list(leaves)
    got = torch.autograd.grad(out, [leaves[n] for n in names], grad64.to(dtype))
    want_low = torch.autograd.grad(low, [torch_leaves[n] for n in names], grad64.to(dtype))
    want = torch.autograd.grad(ref, [leaves64[n] for n in names], grad64)
    for n, a, b, c in zip(names, got, want_low, want):
        checked.append(assert_low_precision_ok(a, b, c, f"{what}: d{n}", **kw))
    assert any(checked), f"{what}: PyTorch overflowed in every output; nothing was checked"


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("end", list(RANGE))
@pytest.mark.parametrize("case,arg", case_args(RANGE_CASES))
def test_range_ends(case, arg, end, dtype):
    nonlinear = arg in NONLINEAR or (case.id in NONLINEAR_CASES and arg != "grad")
    scale = NONLINEAR_LARGE if end == "large" and nonlinear else RANGE[end]
    args = case.make(dtype=dtype, scales={arg: scale})
    with torch.no_grad():
        grad64 = case.grad_out(case({n: t.double() for n, t in args.items()}, "reference"))
    grad64 = (grad64 * (scale if arg == "grad" else 1.0)).to(dtype).double()  # what both sides see
    fi = torch.finfo(dtype)
    low_precision_check(case, args, grad64, dtype, f"{case.id}, {arg} x {scale:g}, {dtype}",
                        floor=fi.smallest_normal * fi.eps)
