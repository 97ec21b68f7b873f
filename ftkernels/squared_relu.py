"""Squared ReLU, elementwise: y = relu(x)**2, any shape, in x's memory layout (the v4 conv blocks' relu^2
between two channels-last cuDNN convolutions).

    x (...) -> y (...);  dx = 2 relu(x) dy

One kernel each way instead of PyTorch's two (relu, then square; their backwards are two more): forward reads
x and writes y (4 B per bf16 element instead of 8), backward reads dy and x and writes dx (6 B instead of 12).
torch.compile fuses ``torch.relu(x).square()`` the same way; this op gives the eager model (``train.py``) the
same bytes. Non-finite values follow PyTorch's composition: relu(NaN) = NaN, and dx = 0 wherever relu(x) <= 0
(as relu's backward masks it), even for an infinite dy.

Layouts: a non-overlapping, dense x (contiguous, channels-last, any permutation) is processed as the flat
block of memory it is, y and dx come out in the same strides; other views are first copied into that
layout (``torch.empty_like``). dy is copied into x's layout when it arrives in another one.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from ftkernels import _common as common
from ftkernels import reference

BLOCK = 4096  # elements per program (16 a thread at 8 warps: 16-byte vector loads of bf16)


@triton.jit
def _squared_relu_fwd_kernel(x_ptr, y_ptr, N, BLOCK: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
    r = tl.where(x < 0, 0.0, x)  # relu that keeps NaN, as torch.relu
    tl.store(y_ptr + offs, (r * r).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _squared_relu_bwd_kernel(dy_ptr, x_ptr, dx_ptr, N, BLOCK: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
    dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(ACC)
    r = tl.where(x < 0, 0.0, x)
    dx = tl.where(r <= 0, 0.0, 2.0 * r * dy)  # relu's backward masks where its output is <= 0
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# launch code


def _like(t: Tensor, layout: Tensor) -> Tensor:
    """t's values in layout's strides (a copy only when they differ)."""
    return t if t.stride() == layout.stride() else torch.empty_like(layout).copy_(t)


def _grid(n: int):
    return (max(1, triton.cdiv(n, BLOCK)),)


def forward(x: Tensor) -> Tensor:
    y = torch.empty_like(x)  # x's strides when x is dense, else dense strides in x's order
    x = _like(x, y)
    _squared_relu_fwd_kernel[_grid(x.numel())](x, y, x.numel(), BLOCK=BLOCK, num_warps=8)
    return y


def backward(dy: Tensor, x: Tensor) -> Tensor:
    dx = torch.empty_like(x)
    dy, x = _like(dy, dx), _like(x, dx)
    _squared_relu_bwd_kernel[_grid(x.numel())](dy, x, dx, x.numel(), BLOCK=BLOCK, num_warps=8)
    return dx


# ----------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("ftkernels::squared_relu", mutates_args=())
def _squared_relu_op(x: Tensor) -> Tensor:
    return forward(x)


@_squared_relu_op.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("ftkernels::squared_relu_backward", mutates_args=())
def _squared_relu_backward_op(dy: Tensor, x: Tensor) -> Tensor:
    return backward(dy, x)


@_squared_relu_backward_op.register_fake
def _(dy, x):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _squared_relu_backward_op(dy, x)


_squared_relu_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public API


def squared_relu(x: Tensor, backend: Optional[str] = None) -> Tensor:
    """relu(x)**2 elementwise, in x's dtype (autocast leaves it alone, as it does relu) and memory layout."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in common.FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor (float32/float16/bfloat16/float64), got {x.dtype}")
    if not common.use_triton(x, backend, "squared_relu") or x.numel() == 0:
        return reference.squared_relu(x)
    common.kernel_dtype_ok(x)
    return _squared_relu_op(x)


class SquaredReLU(common.BackendAttribute, nn.Module):
    """relu(x)**2 elementwise (Primer's activation), any shape."""

    def __init__(self, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend

    def forward(self, x: Tensor) -> Tensor:
        return squared_relu(x, backend=self.backend)
