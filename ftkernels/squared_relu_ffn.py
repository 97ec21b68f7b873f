"""Squared-ReLU feed-forward (Primer): linear2(relu(linear1(frame_norm(x)))**2) on multichannel linears.

    x (B, C, F, W) -> norm -> linear1 (C -> C1, F -> H, optional depth-wise mix) -> relu^2
      -> linear2 (C1 -> C2, H -> F2)

Fusions (kernels live in multichannel_linear.py and frame_norm.py):
- forward: the frame norm is applied in linear1's prologue: a stats-only pass writes mean/rstd (B, C, W)
  fp32, and the position-wise kernel normalises each x tile as it loads it (the normalised x never
  exists in memory). The activation is linear1's epilogue (after the depth-wise mix when linear1 has one),
  so the pre-activation z is never stored either; only the hidden activation is, which linear2 reads and
  its weight gradient needs anyway.
- backward: relu^2's derivative 2 relu(z) is recovered from the saved hidden activation, fused into the
  epilogue of the kernel that produces dh (linear2's dx): no pre-activation is saved or recomputed.
  linear1's weight gradient normalises x's tiles as it loads them (the weight-gradient kernel's norm
  prologue, from the saved statistics): the normalised input is neither saved nor recomputed.
- saved, not recomputed: where a linear has a depth-wise mix, its position-wise output y (the mix's input,
  which the forward writes anyway) is saved for the mix's weight gradient (see multichannel_linear.py:
  recomputing it cost a whole position-wise GEMM for the same bytes).

Which hidden activation is saved depends on the dtype (``multichannel_linear.SAVE_RELU_DTYPES``):
- fp32, bf16: h = relu(z)^2, and 2 relu(z) = 2 sqrt(h). Their 8-bit exponent keeps h in range for
  |z| < 1.8e19 and normal down to |z| ~ 1e-19, where sqrt(h) is as accurate as a stored relu(z); linear2
  reads h as a plain GEMM operand.
- fp16: a = relu(z). h = z^2 leaves fp16's range at both ends: past z ~ 256 it overflows to Inf, and
  2 sqrt(Inf) gave Inf gradients where PyTorch's 2 relu(z) dh is finite; below z ~ 2^-7 it is subnormal
  (below 2^-12 zero), and 2 sqrt(h) lost the digits PyTorch keeps. a has fp16's full 11 bits over its whole
  range, and 2a is exactly PyTorch's factor. h = a^2 is recomputed where it is read: linear2's GEMM squares
  each x tile as it loads it (forward) and its weight-gradient kernel squares its B tiles, rounding to fp16 as a stored h would be (so the forward and
  dweight2 overflow exactly where PyTorch's do). Same bytes moved as saving h, a multiply per loaded
  element in registers; no extra tensor kept.
Saved for backward: x, the hidden activation (h or a), mean, rstd, and y1 / y2 where a linear has a mix;
the op returns them as non-differentiable outputs that cost no zero-filled gradients in backward
(``set_materialize_grads(False)``).
"""
from __future__ import annotations

import importlib
import math
import numbers
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ftkernels import _common as common
from ftkernels import reference
from ftkernels.frame_norm import FrameNorm
from ftkernels.multichannel_linear import MultichannelLinear

# The package re-exports the functions under the module names, so fetch the modules themselves.
_fn = importlib.import_module("ftkernels.frame_norm")
_mcl = importlib.import_module("ftkernels.multichannel_linear")

_PARAMS = ("weight1_pw", "weight2_pw", "weight1_dw", "bias1_pw", "bias1_dw", "weight2_dw", "bias2_pw", "bias2_dw",
           "norm_weight", "norm_bias")


def saves_relu(dtype: torch.dtype) -> bool:
    """Whether the hidden activation saved for backward is a = relu(z) (else h = relu(z)^2): see above."""
    return dtype in _mcl.SAVE_RELU_DTYPES


def forward(x, w1pw, w2pw, w1dw, b1pw, b1dw, w2dw, b2pw, b2dw, nw, nb, eps: float, norm: bool):
    """(out, hidden, mean, rstd, y1, y2); hidden = relu(z) or relu(z)^2 (``saves_relu``); mean/rstd empty when
    norm is False; y1 / y2 = linear1's / linear2's position-wise output where it has a mix, else empty."""
    if norm:
        mean, rstd = _fn.stats(x, eps)
        norm_args = (mean, rstd, *_fn._affine(x, nw, nb))
    else:
        mean, rstd = (x.new_empty(0, dtype=common.stats_dtype(x.dtype)) for _ in range(2))
        norm_args = None
    relu = saves_relu(x.dtype)
    hidden, y1 = _mcl.forward(x, w1pw, w1dw, b1pw, b1dw, activation=_mcl.ACT_RELU if relu else _mcl.ACT_SQRELU,
                              norm=norm_args)
    out, y2 = _mcl.forward(hidden, w2pw, w2dw, b2pw, b2dw, square_x=relu)
    return out, hidden, mean, rstd, y1, y2


def backward(grad, x, hidden, mean, rstd, y1, y2, w1pw, w2pw, w1dw, w2dw, nw, nb, has_b1pw, has_b1dw, has_b2pw,
             has_b2dw, norm):
    """Gradients in _PARAMS order after dx: [dx, dw1pw, dw2pw, dw1dw, db1pw, db1dw, dw2dw, db2pw, db2dw, dnw, dnb]."""
    dz, dw2pw, dw2dw, db2pw, db2dw = _mcl.backward(grad, hidden, y2, w2pw, w2dw, has_b2pw, has_b2dw,
                                                   sqrelu_input="relu" if saves_relu(x.dtype) else "h")
    norm_args = (mean, rstd, *_fn._affine(x, nw, nb)) if norm else None
    dxn, dw1pw, dw1dw, db1pw, db1dw = _mcl.backward(dz, x, y1, w1pw, w1dw, has_b1pw, has_b1dw, norm=norm_args)
    dnw = dnb = None
    if norm:
        dx, dnw, dnb = _fn.backward(dxn, x, nw, mean, rstd)
    else:
        dx = dxn
    return [dx, dw1pw, dw2pw, dw1dw, db1pw, db1dw, dw2dw, db2pw, db2dw, dnw, dnb]


# ----------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("ftkernels::squared_relu_ffn", mutates_args=())
def _ffn_op(x: Tensor, weight1_pw: Tensor, weight2_pw: Tensor, weight1_dw: Optional[Tensor],
            bias1_pw: Optional[Tensor], bias1_dw: Optional[Tensor], weight2_dw: Optional[Tensor],
            bias2_pw: Optional[Tensor], bias2_dw: Optional[Tensor], norm_weight: Optional[Tensor],
            norm_bias: Optional[Tensor], eps: float, norm: bool
            ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, hidden, mean, rstd, y1, y2): every output but out is saved-only (see the module docstring)."""
    return forward(x, weight1_pw, weight2_pw, weight1_dw, bias1_pw, bias1_dw, weight2_dw, bias2_pw, bias2_dw,
                   norm_weight, norm_bias, eps, norm)


@_ffn_op.register_fake
def _(x, weight1_pw, weight2_pw, weight1_dw, bias1_pw, bias1_dw, weight2_dw, bias2_pw, bias2_dw, norm_weight,
      norm_bias, eps, norm):
    B, C, F, W = x.shape
    H, F2 = weight1_pw.shape[1], weight2_pw.shape[1]
    C1 = weight1_dw.shape[0] if weight1_dw is not None else C
    C2 = weight2_dw.shape[0] if weight2_dw is not None else C1
    stat = x.new_empty((B, C, W) if norm else (0,), dtype=common.stats_dtype(x.dtype))
    y1 = x.new_empty((B, C, H, W) if weight1_dw is not None else (0,))
    y2 = x.new_empty((B, C1, F2, W) if weight2_dw is not None else (0,))
    return x.new_empty((B, C2, F2, W)), x.new_empty((B, C1, H, W)), stat, torch.empty_like(stat), y1, y2


@torch.library.custom_op("ftkernels::squared_relu_ffn_backward", mutates_args=())
def _ffn_backward_op(grad: Tensor, x: Tensor, hidden: Tensor, mean: Tensor, rstd: Tensor, y1: Tensor, y2: Tensor,
                     weight1_pw: Tensor, weight2_pw: Tensor, weight1_dw: Optional[Tensor],
                     weight2_dw: Optional[Tensor], norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                     has_bias1_pw: bool, has_bias1_dw: bool, has_bias2_pw: bool, has_bias2_dw: bool,
                     norm: bool) -> List[Tensor]:
    grads = backward(grad, x, hidden, mean, rstd, y1, y2, weight1_pw, weight2_pw, weight1_dw, weight2_dw,
                     norm_weight, norm_bias, has_bias1_pw, has_bias1_dw, has_bias2_pw, has_bias2_dw, norm)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_ffn_backward_op.register_fake
def _(grad, x, hidden, mean, rstd, y1, y2, weight1_pw, weight2_pw, weight1_dw, weight2_dw, norm_weight, norm_bias,
      has_bias1_pw, has_bias1_dw, has_bias2_pw, has_bias2_dw, norm):
    b1pw = weight1_pw[:, :, 0] if has_bias1_pw else None
    b2pw = weight2_pw[:, :, 0] if has_bias2_pw else None
    b1dw = weight1_dw[:, 0] if weight1_dw is not None and has_bias1_dw else None
    b2dw = weight2_dw[:, 0] if weight2_dw is not None and has_bias2_dw else None
    C, F = x.shape[1], x.shape[2]
    nw = x.new_empty((C, F)) if norm else None
    like = (x, weight1_pw, weight2_pw, weight1_dw, b1pw, b1dw, weight2_dw, b2pw, b2dw, nw, nw)
    # new contiguous gradients whatever the inputs' strides, as the kernels return them
    return [x.new_empty(t.shape) if t is not None else x.new_empty(0) for t in like]


def _setup_context(ctx, inputs, output):
    x, w1pw, w2pw, w1dw, b1pw, b1dw, w2dw, b2pw, b2dw, nw, nb, eps, norm = inputs
    _, hidden, mean, rstd, y1, y2 = output
    ctx.save_for_backward(x, hidden, mean, rstd, y1, y2, w1pw, w2pw, w1dw, w2dw, nw, nb)
    ctx.present = [t is not None for t in (x, w1pw, w2pw, w1dw, b1pw, b1dw, w2dw, b2pw, b2dw)]
    ctx.present += [norm and nw is not None, norm and nb is not None]
    ctx.norm = norm
    ctx.mark_non_differentiable(hidden, mean, rstd, y1, y2)
    ctx.set_materialize_grads(False)  # the saved-only outputs cost no zero-filled gradients


def _backward(ctx, grad, _dhidden, _dmean, _drstd, _dy1, _dy2):
    if grad is None:  # the output took no part in the loss
        return (None,) * 13
    x, hidden, mean, rstd, y1, y2, w1pw, w2pw, w1dw, w2dw, nw, nb = ctx.saved_tensors
    p = ctx.present
    grads = _ffn_backward_op(grad, x, hidden, mean, rstd, y1, y2, w1pw, w2pw, w1dw, w2dw, nw, nb, p[4], p[5],
                             p[7], p[8], ctx.norm)
    return tuple(g if q else None for g, q in zip(grads, p)) + (None, None)


_ffn_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public API


def squared_relu_ffn(x: Tensor, weight1_pw: Tensor, weight2_pw: Tensor, weight1_dw: Optional[Tensor] = None,
                     bias1_pw: Optional[Tensor] = None, bias1_dw: Optional[Tensor] = None,
                     weight2_dw: Optional[Tensor] = None, bias2_pw: Optional[Tensor] = None,
                     bias2_dw: Optional[Tensor] = None, norm_weight: Optional[Tensor] = None,
                     norm_bias: Optional[Tensor] = None, eps: float = 1e-5, norm: bool = True,
                     backend: Optional[str] = None) -> Tensor:
    """linear2(relu(linear1(frame_norm(x)))**2). x (B, C, F, W) -> (B, C2, F2, W).

    linear1: weight1_pw (C, H, F), bias1_pw (C, H), weight1_dw (C1, C), bias1_dw (C1,)
    linear2: weight2_pw (C1, F2, H), bias2_pw (C1, F2), weight2_dw (C2, C1), bias2_dw (C2,)
    norm: norm_weight, norm_bias (C, F), eps; skipped with ``norm=False``.
    """
    params = common.autocast_inputs(x, weight1_pw, weight2_pw, weight1_dw, bias1_pw, bias1_dw, weight2_dw, bias2_pw,
                                    bias2_dw, norm_weight, norm_bias)
    x, w1pw, w2pw, w1dw, b1pw, b1dw, w2dw, b2pw, b2dw, nw, nb = params
    if w1pw is None or w2pw is None:
        raise ValueError("squared_relu_ffn needs weight1_pw (C, H, F) and weight2_pw (C1, F2, H)")
    _mcl.check_inputs(x, w1pw, w1dw, b1pw, b1dw, names=("weight1_pw", "weight1_dw", "bias1_pw", "bias1_dw"))
    C1 = w1dw.shape[0] if w1dw is not None else x.shape[1]
    common.check_tensor(w2pw, "weight2_pw", 3, "(C1, F2, H)")
    common.check_shape(w2pw, "weight2_pw", (C1, w2pw.shape[1], w1pw.shape[1]), "(C1, F2, H)")
    common.check_shape(b2pw, "bias2_pw", (C1, w2pw.shape[1]), "(C1, F2)")
    if w2dw is not None:
        common.check_tensor(w2dw, "weight2_dw", 2, "(C2, C1)")
        common.check_shape(w2dw, "weight2_dw", (w2dw.shape[0], C1), "(C2, C1)")
        common.check_shape(b2dw, "bias2_dw", (w2dw.shape[0],), "(C2,)")
    elif b2dw is not None:
        raise ValueError("bias2_dw given without weight2_dw")
    if norm:
        _fn.check_inputs(x, nw, nb, eps)
    common.check_same(x, dict(zip(_PARAMS, (w1pw, w2pw, w1dw, b1pw, b1dw, w2dw, b2pw, b2dw, nw, nb))))
    if not common.use_triton(x, backend, "squared_relu_ffn"):
        return reference.squared_relu_ffn(x, w1pw, w2pw, w1dw, b1pw, b1dw, w2dw, b2pw, b2dw, nw, nb, eps, norm)
    common.kernel_dtype_ok(x)
    return _ffn_op(x, w1pw, w2pw, w1dw, b1pw, b1dw, w2dw, b2pw, b2dw, nw, nb, float(eps), bool(norm))[0]


class SquaredReLUFeedForward(common.BackendAttribute, nn.Module):
    """Pre-norm squared-ReLU feed-forward on multichannel linears.

    (B, channels, features, W) -> (B, out_channels, out_features, W); hidden = int(features * expansion).
    linear1 = MultichannelLinear(channels, out_channels, features, hidden, depthwise=depthwise),
    linear2 = MultichannelLinear(out_channels, out_channels, hidden, out_features).
    """

    def __init__(self, channels: int, features: int, expansion: float = 4, out_channels: Optional[int] = None,
                 out_features: Optional[int] = None, depthwise: bool = True, bias: bool = False, norm: bool = True,
                 eps: float = 1e-5, backend: Optional[str] = None):
        super().__init__()
        channels, features = common.check_positive_int(channels, "channels"), common.check_positive_int(features,
                                                                                                        "features")
        out_channels = channels if out_channels is None else common.check_positive_int(out_channels, "out_channels")
        out_features = features if out_features is None else common.check_positive_int(out_features, "out_features")
        if isinstance(expansion, bool) or not isinstance(expansion, numbers.Real) or not (
                math.isfinite(expansion) and expansion > 0):
            raise ValueError(f"expansion must be a positive float, got {expansion!r}")
        hidden = int(features * expansion)
        if hidden < 1:
            raise ValueError(f"hidden features int({features} * {expansion}) = {hidden}: raise expansion")
        common.check_eps(eps)
        self.backend = backend
        self.norm = FrameNorm(channels, features, eps, backend=backend) if norm else None
        self.linear1 = MultichannelLinear(channels, out_channels, features, hidden, depthwise=depthwise, bias=bias,
                                          backend=backend)
        self.linear2 = MultichannelLinear(out_channels, out_channels, hidden, out_features, bias=bias,
                                          backend=backend)

    def forward(self, x: Tensor) -> Tensor:
        l1, l2, n = self.linear1, self.linear2, self.norm
        return squared_relu_ffn(x, l1.weight_pw, l2.weight_pw, l1.weight_dw, l1.bias_pw, l1.bias_dw, l2.weight_dw,
                                l2.bias_pw, l2.bias_dw, n.weight if n is not None else None,
                                n.bias if n is not None else None, n.eps if n is not None else 1e-5,
                                norm=n is not None, backend=self.backend)
