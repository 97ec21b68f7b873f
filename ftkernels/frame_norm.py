"""Frame norm: layer norm over the features of every (batch, channel, frame), per-channel affine.

    x (B, C, F, W) -> y (B, C, F, W);  weight, bias (C, F)
    y[b,c,:,w] = (x[b,c,:,w] - mean) * rstd * weight[c] + bias[c]

Kernels
-------
The features axis is strided (stride W in a contiguous tensor) while frames are contiguous, so a program
takes BW neighbouring frames of one (b, c) -- coalesced loads along frames -- and walks the features in BF
chunks: the statistics pass takes each chunk's mean and centred sum of squares in registers and merges them
into running ones (Chan et al.'s parallel update: one read of x, no E[x^2] - E[x]^2 cancellation), all
relative to the frame's first feature as a shift (exact differences, so a large common offset such as a
magnitude spectrogram's costs no digits); the second pass writes y from the same shifted values. The
re-read of the (F x BW) slab hits L2.
``_frame_norm_fwd_kernel`` also stores mean/rstd (B, C, W) fp32 (fp64 for the float64 interpreter oracle)
for backward (and the feed-forward's fused-norm prologue, which runs it with ``STORE_Y=False``).

``_frame_norm_bwd_kernel``: per (b, c, frame-block), pass 1 reduces sum(g) and sum(g * xhat) with
g = dy * weight, pass 2 writes dx = rstd * (g - mean(g) - xhat * mean(g * xhat)); the same program writes
this block's partial dweight = sum_w dy * xhat and dbias = sum_w dy into a (B * W-blocks, C, F) fp32
buffer that is summed afterwards (deterministic, no atomics).

Layouts: x, dy, weight and bias are read through their strides (views cost no copy; a missing weight/bias
is one cached element broadcast through zero strides). mean/rstd are this module's own contiguous outputs;
passed back in (backward, the feed-forward) they are made contiguous on the host, a no-op for them.
y, dx, dweight, dbias are new contiguous tensors.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from ftkernels import _common as common
from ftkernels import reference
from ftkernels._common import Specialization, spec

BF, BW = 32, 64  # feature chunk x frame block


@triton.jit
def _frame_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_f32_ptr, rstd_f32_ptr, C, F, W, eps,
                           s_xb, s_xc, s_xf, s_xw, s_wc, s_wf, s_bc, s_bf, s_yb, s_yc, s_yf, s_yw,
                           STORE_Y: tl.constexpr, LOAD_STATS: tl.constexpr, BF: tl.constexpr, BW: tl.constexpr):
    """grid (W-blocks, C, B); weight/bias (C, F) any strides; mean/rstd (B, C, W) contiguous fp32, computed and
    stored, or with LOAD_STATS read from an earlier pass (the feed-forward's backward re-normalising x)."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid_w = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2)
    offs_w = pid_w * BW + tl.arange(0, BW)
    mask_w = offs_w < W
    x_row = x_ptr + b.to(tl.int64) * s_xb + c.to(tl.int64) * s_xc + offs_w * s_xw  # feature 0 of each frame
    x_base = x_row[None, :]
    stat = (b * C + c).to(tl.int64) * W + offs_w
    if LOAD_STATS:
        shift = tl.load(mean_f32_ptr + stat, mask=mask_w, other=0.0).to(ACC)
        mean_s = tl.zeros((BW,), dtype=ACC)
        rstd = tl.load(rstd_f32_ptr + stat, mask=mask_w, other=0.0)
    else:
        # One pass over x: per chunk, the mean and centred sum of squares of its BF features (two-pass in
        # registers), merged into the running ones with Chan et al.'s parallel update. Everything is
        # relative to a shift, the frame's first feature: x - shift is exact for x near it (Sterbenz), so a
        # large common offset (magnitude spectrograms) never enters the sums and costs no digits.
        shift = tl.load(x_row, mask=mask_w, other=0.0).to(ACC)
        mean_s = tl.zeros((BW,), dtype=ACC)
        m2 = tl.zeros((BW,), dtype=ACC)
        for f0 in range(0, F, BF):
            offs_f = f0 + tl.arange(0, BF)
            m = (offs_f[:, None] < F) & mask_w[None, :]
            xs = tl.load(x_base + offs_f[:, None] * s_xf, mask=m, other=0.0).to(ACC) - shift[None, :]
            xs = tl.where(m, xs, 0.0)
            n_a = f0  # features merged so far; counts are ints, promoted to ACC by the ACC factor before them
            n_b = tl.minimum(F - f0, BF)
            mean_b = tl.sum(xs, axis=0) / n_b
            d = tl.where(m, xs - mean_b[None, :], 0.0)
            delta = mean_b - mean_s
            mean_s += delta * n_b / (n_a + n_b)
            m2 += tl.sum(d * d, axis=0) + delta * delta * n_a * n_b / (n_a + n_b)
        rstd = 1.0 / tl.sqrt(m2 / F + eps)
        tl.store(mean_f32_ptr + stat, shift + mean_s, mask=mask_w)
        tl.store(rstd_f32_ptr + stat, rstd, mask=mask_w)
    if STORE_Y:
        y_base = y_ptr + b.to(tl.int64) * s_yb + c.to(tl.int64) * s_yc + offs_w[None, :] * s_yw
        for f0 in range(0, F, BF):
            offs_f = f0 + tl.arange(0, BF)
            mask_f = offs_f < F
            m = mask_f[:, None] & mask_w[None, :]
            x = tl.load(x_base + offs_f[:, None] * s_xf, mask=m, other=0.0).to(ACC)
            g = tl.load(w_ptr + c * s_wc + offs_f * s_wf, mask=mask_f, other=0.0).to(ACC)
            bt = tl.load(b_ptr + c * s_bc + offs_f * s_bf, mask=mask_f, other=0.0).to(ACC)
            y = ((x - shift[None, :]) - mean_s[None, :]) * rstd[None, :] * g[:, None] + bt[:, None]
            tl.store(y_base + offs_f[:, None] * s_yf, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _frame_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_f32_ptr, rstd_f32_ptr, dx_ptr, dw_f32_ptr, db_f32_ptr,
                           C, F, W, s_gb, s_gc, s_gf, s_gw, s_xb, s_xc, s_xf, s_xw, s_wc, s_wf,
                           s_db, s_dc, s_df, s_dw,
                           BF: tl.constexpr, BW: tl.constexpr):
    """grid (W-blocks, C, B); partial dweight/dbias rows (b * W-blocks + pid_w, c, :) of (B*nWb, C, F) fp32."""
    ACC: tl.constexpr = tl.float64 if dy_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid_w = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2)
    offs_w = pid_w * BW + tl.arange(0, BW)
    mask_w = offs_w < W
    stat = (b * C + c).to(tl.int64) * W + offs_w
    mean = tl.load(mean_f32_ptr + stat, mask=mask_w, other=0.0)
    rstd = tl.load(rstd_f32_ptr + stat, mask=mask_w, other=0.0)
    g_base = dy_ptr + b.to(tl.int64) * s_gb + c.to(tl.int64) * s_gc + offs_w[None, :] * s_gw
    x_base = x_ptr + b.to(tl.int64) * s_xb + c.to(tl.int64) * s_xc + offs_w[None, :] * s_xw
    part = ((b * tl.num_programs(0) + pid_w) * C + c).to(tl.int64) * F
    sum_g = tl.zeros((BW,), dtype=ACC)
    sum_gx = tl.zeros((BW,), dtype=ACC)
    for f0 in range(0, F, BF):
        offs_f = f0 + tl.arange(0, BF)
        mask_f = offs_f < F
        m = mask_f[:, None] & mask_w[None, :]
        dy = tl.load(g_base + offs_f[:, None] * s_gf, mask=m, other=0.0).to(ACC)
        xhat = (tl.load(x_base + offs_f[:, None] * s_xf, mask=m, other=0.0).to(ACC) - mean[None, :]) \
            * rstd[None, :]
        xhat = tl.where(m, xhat, 0.0)
        gamma = tl.load(w_ptr + c * s_wc + offs_f * s_wf, mask=mask_f, other=0.0).to(ACC)
        g = dy * gamma[:, None]
        sum_g += tl.sum(g, axis=0)
        sum_gx += tl.sum(g * xhat, axis=0)
        tl.store(dw_f32_ptr + part + offs_f, tl.sum(dy * xhat, axis=1), mask=mask_f)
        tl.store(db_f32_ptr + part + offs_f, tl.sum(dy, axis=1), mask=mask_f)
    mean_g = sum_g / F
    mean_gx = sum_gx / F
    dx_base = dx_ptr + b.to(tl.int64) * s_db + c.to(tl.int64) * s_dc + offs_w[None, :] * s_dw
    for f0 in range(0, F, BF):
        offs_f = f0 + tl.arange(0, BF)
        mask_f = offs_f < F
        m = mask_f[:, None] & mask_w[None, :]
        dy = tl.load(g_base + offs_f[:, None] * s_gf, mask=m, other=0.0).to(ACC)
        xhat = (tl.load(x_base + offs_f[:, None] * s_xf, mask=m, other=0.0).to(ACC) - mean[None, :]) \
            * rstd[None, :]
        gamma = tl.load(w_ptr + c * s_wc + offs_f * s_wf, mask=mask_f, other=0.0).to(ACC)
        dx = rstd[None, :] * (dy * gamma[:, None] - mean_g[None, :] - xhat * mean_gx[None, :])
        tl.store(dx_base + offs_f[:, None] * s_df, dx.to(dx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# launch code


_CONSTANTS = {}


def _constant(x: Tensor, value: float, shape) -> Tensor:
    """One cached element broadcast to ``shape`` through zero strides (the kernels read through strides)."""
    key = (x.device, x.dtype, value)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.full((1,), value, device=x.device, dtype=x.dtype)
    return t.expand(shape)


def _affine(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """weight, bias (C, F) as given (any strides), ones / zeros when absent."""
    C, F = x.shape[1], x.shape[2]
    w = weight if weight is not None else _constant(x, 1.0, (C, F))
    b = bias if bias is not None else _constant(x, 0.0, (C, F))
    return w, b


def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, store_y: bool = True,
            saved_stats: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(y or an empty tensor, mean (B, C, W) fp32, rstd (B, C, W) fp32); ``saved_stats`` = (mean, rstd) from
    an earlier pass skips the two reduction passes (one read of x instead of three)."""
    B, C, F, W = x.shape
    w, b = _affine(x, weight, bias)
    y = torch.empty_like(x, memory_format=torch.contiguous_format) if store_y else x
    if saved_stats is not None:
        mean, rstd = (t.contiguous() for t in saved_stats)
    else:
        mean = torch.empty((B, C, W), device=x.device, dtype=common.stats_dtype(x.dtype))
        rstd = torch.empty_like(mean)
    _frame_norm_fwd_kernel[(triton.cdiv(W, BW), C, B)](
        x, w, b, y, mean, rstd, C, F, W, eps, *x.stride(), *w.stride(), *b.stride(), *y.stride(), STORE_Y=store_y,
        LOAD_STATS=saved_stats is not None, BF=BF, BW=BW, num_warps=4)
    return (y if store_y else x.new_empty(0)), mean, rstd


def stats(x: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """mean, rstd (B, C, W) fp32 only: the feed-forward applies the norm inside its first matmul."""
    _, mean, rstd = forward(x, None, None, eps, store_y=False)
    return mean, rstd


def backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor) -> List[Tensor]:
    """[dx, dweight (C, F), dbias (C, F)]."""
    B, C, F, W = x.shape
    w, _ = _affine(x, weight, None)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    n_wb = triton.cdiv(W, BW)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    dw_part = torch.empty((B * n_wb, C, F), device=x.device, dtype=common.stats_dtype(x.dtype))
    db_part = torch.empty_like(dw_part)
    _frame_norm_bwd_kernel[(n_wb, C, B)](dy, x, w, mean, rstd, dx, dw_part, db_part, C, F, W, *dy.stride(),
                                         *x.stride(), *w.stride(), *dx.stride(), BF=BF, BW=BW, num_warps=4)
    return [dx, dw_part.sum(0).to(x.dtype), db_part.sum(0).to(x.dtype)]


# ----------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("ftkernels::frame_norm", mutates_args=())
def _frame_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    return forward(x, weight, bias, eps)


@_frame_norm_op.register_fake
def _(x, weight, bias, eps):
    B, C, F, W = x.shape
    stat = x.new_empty((B, C, W), dtype=common.stats_dtype(x.dtype))
    return torch.empty_like(x, memory_format=torch.contiguous_format), stat, torch.empty_like(stat)


@torch.library.custom_op("ftkernels::frame_norm_backward", mutates_args=())
def _frame_norm_backward_op(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor
                            ) -> Tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = backward(dy, x, weight, mean, rstd)
    return dx, dw, db


@_frame_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd):
    C, F = x.shape[1], x.shape[2]
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((C, F)), x.new_empty((C, F))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _frame_norm_backward_op(dy, x, weight, mean, rstd)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None


_frame_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public API


def check_inputs(x, weight, bias, eps) -> None:
    common.check_tensor(x, "x", 4, "(B, C, F, W)")
    common.check_nonempty(x, "x", "(B, C, F, W)")
    C, F = x.shape[1], x.shape[2]
    common.check_shape(weight, "weight", (C, F), "(C, F)")
    common.check_shape(bias, "bias", (C, F), "(C, F)")
    common.check_same(x, {"weight": weight, "bias": bias})
    common.check_eps(eps)


def frame_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5,
               backend: Optional[str] = None) -> Tensor:
    """Layer norm over features of each frame. x (B, C, F, W); weight, bias (C, F) -> (B, C, F, W).

    Statistics in fp32 whatever the input dtype. Under autocast the affine parameters follow x's dtype.
    """
    if isinstance(x, Tensor) and x.is_floating_point() and common.autocast_dtype(x.device.type) is not None:
        weight = weight.to(x.dtype) if isinstance(weight, Tensor) else weight
        bias = bias.to(x.dtype) if isinstance(bias, Tensor) else bias
    check_inputs(x, weight, bias, eps)
    if not common.use_triton(x, backend, "frame_norm"):
        return reference.frame_norm(x, weight, bias, eps)
    common.kernel_dtype_ok(x)
    return _frame_norm_op(x, weight, bias, float(eps))[0]


class FrameNorm(common.BackendAttribute, nn.Module):
    """Layer norm over each frame's features with per-channel affine (C, F). (B, C, F, W) -> same."""

    def __init__(self, channels: int, features: int, eps: float = 1e-5, backend: Optional[str] = None):
        super().__init__()
        channels, features = common.check_positive_int(channels, "channels"), common.check_positive_int(features,
                                                                                                        "features")
        common.check_eps(eps)
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(channels, features))
        self.bias = nn.Parameter(torch.zeros(channels, features))

    def forward(self, x: Tensor) -> Tensor:
        return frame_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, features={self.weight.shape[1]}, eps={self.eps}"


def compile_specializations() -> List[Specialization]:
    out = []
    for dt in ("fp32", "fp16", "bf16"):
        for store_y, load_stats in ((False, False), (True, False), (True, True)):
            out.append(spec(__name__, "_frame_norm_fwd_kernel", dt,
                            dict(STORE_Y=store_y, LOAD_STATS=load_stats, BF=BF, BW=BW), floats=("eps",)))
        out.append(spec(__name__, "_frame_norm_bwd_kernel", dt, dict(BF=BF, BW=BW)))
    return out
