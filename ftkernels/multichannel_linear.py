"""Multichannel linear: per-channel position-wise linear along features, then a depth-wise channel mix.

    x (B, C_in, F_in, W) --weight_pw (C_in, F_out, F_in), bias_pw (C_in, F_out)-->  y (B, C_in, F_out, W)
    y                    --weight_dw (C_out, C_in),       bias_dw (C_out,)     -->  out (B, C_out, F_out, W)

Either weight may be absent (position-wise only / depth-wise only).

Kernels
-------
``_positionwise_kernel``      y[b,c] = W[c] @ x[b,c] (+bias): one (BM x BN) tile of (F_out x W) per program,
                              K = F_in looped in BK chunks through ``tl.dot``; x is read in place through its
                              strides (frames need not be contiguous). Optional prologue: frame-norm of the x tile
                              from precomputed (mean, rstd) (the feed-forward's fused norm). Optional epilogues:
                              squared ReLU; multiply by 2*sqrt(h) (squared-ReLU backward from its saved output).
                              Backward dx = W[c]^T @ dy is the same kernel with W's strides swapped.
``_positionwise_mix_kernel``  the fused op for C_out <= 8: for each input channel the program computes the
                              position-wise tile and accumulates ``weight_dw[o, c] * tile`` for every output
                              channel in a (BO, BM, BN) register accumulator, so y never touches memory.
                              For larger C_out that would recompute the matmul C_out/BO times, so the
                              dispatcher runs two passes instead: position-wise, then ``_channel_mix_kernel``.
``_channel_mix_kernel``       out[b] = W_dw @ y[b] as a GEMM with M = C_out, K = C_in, N = F*W (frames and
                              features flattened and un-flattened through strides). Backward dy = W_dw^T @ dout.
``_weight_grad_kernel``       dW[g] = sum_k A[g,:,k] B[g,:,k]^T with k running over (batch, frame[, feature]),
                              split-K into fp32 partials (deterministic: partials are summed in a fixed order),
                              row sums of A in the same pass give the bias gradient.

Backward recomputes y = pw(x) for the depth-wise weight gradient instead of saving it (one extra GEMM,
no (B, C_in, F_out, W) activation kept alive).

Layouts
-------
Every pointer argument is read through its strides, with two host-side exceptions: the gradient entering
backward is made contiguous (autograd almost always hands a contiguous one; the depth-wise weight gradient
walks (feature, frame) as one flat K index), and so is a strided x for a depth-wise-only layer's weight
gradient (same reason). The frame-norm statistics of the fused prologue are the stats pass's own contiguous
outputs. Weights, biases, x, the saved squared-ReLU activation and the norm's gamma/beta take any strides:
transposed, sliced or offset views cost no copy. A missing bias is one cached zero broadcast through zero
strides (nothing allocated per call). Outputs and gradients are always new contiguous tensors.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from ftkernels import _common as common
from ftkernels import reference
from ftkernels._common import Specialization, spec

# Activations fused into epilogues: none, relu(z)^2, relu(z) (the fp16 feed-forward saves relu(z): see
# squared_relu_ffn.py).
ACT_NONE, ACT_SQRELU, ACT_RELU = 0, 1, 2
# Prologues applied to each x tile as it is loaded: none, frame norm from saved statistics, square (the
# fp16 feed-forward's linear2 takes h = a^2 from the saved a = relu(z)).
PRO_NONE, PRO_NORM, PRO_SQUARE = 0, 1, 2
# Squared-ReLU backward epilogues (dz from dh): none, from a saved h = relu(z)^2 (2 sqrt(h)), from a saved
# a = relu(z) (2 a).
GRAD_NONE, GRAD_FROM_H, GRAD_FROM_RELU = 0, 1, 2
FUSED_MIX_MAX_CHANNELS = 8  # C_out up to this runs the single fused kernel
# dtypes in which the squared-ReLU feed-forward saves a = relu(z) rather than h = relu(z)^2 (fp16: h leaves
# fp16's range at both ends; see squared_relu_ffn.py). Its kernel variants are gated for these dtypes only.
SAVE_RELU_DTYPES = (torch.float16,)


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    """relu(z)^2 (ACT_SQRELU) or relu(z) (ACT_RELU), NaN kept as torch.relu keeps it (tl.maximum's default
    drops NaN)."""
    if ACTIVATION != 0:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
        if ACTIVATION == 1:
            z = z * z
    return z


@triton.jit
def _squared_relu_grad(dh, saved, GRAD: tl.constexpr):
    """dz = dh * d/dz relu(z)^2 = dh * 2 relu(z), with relu(z) = sqrt(h) from a saved h = relu(z)^2
    (GRAD_FROM_H) or the saved a = relu(z) itself (GRAD_FROM_RELU). Exactly 0 where z <= 0 whatever dh is
    (torch's relu backward is a select, so a NaN/Inf dh passes on relu's live side only); NaN where z is."""
    if GRAD == 1:
        saved = tl.sqrt(saved)
    return tl.where(saved <= 0.0, 0.0, dh * 2.0 * saved)


@triton.jit
def _positionwise_tile(w_ptr, x_ptr, mean_f32_ptr, rstd_f32_ptr, gamma_ptr, beta_ptr, b, c, offs_m, offs_n,
                       M, N, K, s_wc, s_wm, s_wk, s_xb, s_xc, s_xk, s_xn, s_sb, s_sc, s_gc, s_gk, s_tc, s_tk,
                       PROLOGUE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       PRECISION: tl.constexpr):
    """(BM, BN) fp32 tile of W[c] @ prologue(x[b, c]) for rows offs_m (features out) and cols offs_n (frames);
    prologue: none, frame norm (PRO_NORM) or square (PRO_SQUARE, rounded back to x's dtype as a stored
    h = a^2 would be)."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    acc = tl.zeros((BM, BN), dtype=ACC)
    c = tl.cast(c, tl.int64)  # a loop counter in the fused kernel
    w_base = w_ptr + c * s_wc
    x_base = x_ptr + b.to(tl.int64) * s_xb + c * s_xc
    mask_m = offs_m < M
    mask_n = offs_n < N
    if PROLOGUE == 1:
        stat_off = b.to(tl.int64) * s_sb + c * s_sc + offs_n
        mean = tl.load(mean_f32_ptr + stat_off, mask=mask_n, other=0.0)
        rstd = tl.load(rstd_f32_ptr + stat_off, mask=mask_n, other=0.0)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        w = tl.load(w_base + offs_m[:, None] * s_wm + offs_k[None, :] * s_wk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        x = tl.load(x_base + offs_k[:, None] * s_xk + offs_n[None, :] * s_xn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if PROLOGUE == 1:
            g = tl.load(gamma_ptr + c * s_gc + offs_k * s_gk, mask=mask_k, other=0.0).to(ACC)
            bt = tl.load(beta_ptr + c * s_tc + offs_k * s_tk, mask=mask_k, other=0.0).to(ACC)
            xf = (x.to(ACC) - mean[None, :]) * rstd[None, :] * g[:, None] + bt[:, None]
            x = xf.to(w.dtype)
        if PROLOGUE == 2:
            xf = x.to(ACC)
            x = (xf * xf).to(w.dtype)
        acc = tl.dot(w, x, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _positionwise_kernel(w_ptr, x_ptr, bias_ptr, out_ptr, mul_ptr, mean_f32_ptr, rstd_f32_ptr, gamma_ptr, beta_ptr,
                         M, N, K, s_wc, s_wm, s_wk, s_xb, s_xc, s_xk, s_xn, s_bias_c, s_bias_m,
                         s_ob, s_oc, s_om, s_on, s_pb, s_pc, s_pm, s_pn, s_sb, s_sc, s_gc, s_gk, s_tc, s_tk,
                         PROLOGUE: tl.constexpr, ACTIVATION: tl.constexpr, SQRELU_GRAD: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """out[b, c] = epilogue(W[c] @ prologue(x[b, c]) + bias[c]); grid (m-tiles * n-tiles, C, B).
    bias (C, M) any strides (zeros when the layer has none: one load per row, fewer specializations)."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    c = tl.program_id(1)
    b = tl.program_id(2)
    n_tiles = tl.cdiv(N, BN)
    offs_m = (pid // n_tiles) * BM + tl.arange(0, BM)
    offs_n = (pid % n_tiles) * BN + tl.arange(0, BN)
    acc = _positionwise_tile(w_ptr, x_ptr, mean_f32_ptr, rstd_f32_ptr, gamma_ptr, beta_ptr, b, c, offs_m, offs_n,
                             M, N, K, s_wc, s_wm, s_wk, s_xb, s_xc, s_xk, s_xn, s_sb, s_sc, s_gc, s_gk, s_tc, s_tk,
                             PROLOGUE, BM, BN, BK, PRECISION)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    acc += tl.load(bias_ptr + c * s_bias_c + offs_m * s_bias_m, mask=offs_m < M, other=0.0).to(ACC)[:, None]
    acc = _activation(acc, ACTIVATION)
    if SQRELU_GRAD != 0:
        saved = tl.load(mul_ptr + b.to(tl.int64) * s_pb + c.to(tl.int64) * s_pc + offs_m[:, None] * s_pm
                        + offs_n[None, :] * s_pn, mask=mask, other=0.0).to(ACC)
        acc = _squared_relu_grad(acc, saved, SQRELU_GRAD)
    out = out_ptr + b.to(tl.int64) * s_ob + c.to(tl.int64) * s_oc + offs_m[:, None] * s_om + offs_n[None, :] * s_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _positionwise_mix_kernel(w_ptr, x_ptr, bias_ptr, mix_ptr, mix_bias_ptr, out_ptr, mean_f32_ptr, rstd_f32_ptr,
                             gamma_ptr, beta_ptr, C_in, C_out, M, N, K, s_wc, s_wm, s_wk, s_xb, s_xc, s_xk, s_xn,
                             s_bias_c, s_bias_m, s_mo, s_mc, s_mbias, s_ob, s_oc, s_om, s_on, s_sb, s_sc,
                             s_gc, s_gk, s_tc, s_tk,
                             PROLOGUE: tl.constexpr, ACTIVATION: tl.constexpr, BO: tl.constexpr,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """Fused position-wise + channel mix for C_out <= BO; grid (m-tiles * n-tiles, 1, B)."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    b = tl.program_id(2)
    n_tiles = tl.cdiv(N, BN)
    offs_m = (pid // n_tiles) * BM + tl.arange(0, BM)
    offs_n = (pid % n_tiles) * BN + tl.arange(0, BN)
    offs_o = tl.arange(0, BO)
    mask_o = offs_o < C_out
    acc = tl.zeros((BO, BM, BN), dtype=ACC)
    for c in range(0, C_in):
        y = _positionwise_tile(w_ptr, x_ptr, mean_f32_ptr, rstd_f32_ptr, gamma_ptr, beta_ptr, b, c, offs_m, offs_n,
                               M, N, K, s_wc, s_wm, s_wk, s_xb, s_xc, s_xk, s_xn, s_sb, s_sc, s_gc, s_gk, s_tc,
                               s_tk, PROLOGUE, BM, BN, BK, PRECISION)
        y += tl.load(bias_ptr + c * s_bias_c + offs_m * s_bias_m, mask=offs_m < M, other=0.0).to(ACC)[:, None]
        wd = tl.load(mix_ptr + offs_o * s_mo + c * s_mc, mask=mask_o, other=0.0).to(ACC)
        acc += wd[:, None, None] * y[None, :, :]
    acc += tl.load(mix_bias_ptr + offs_o * s_mbias, mask=mask_o, other=0.0).to(ACC)[:, None, None]
    acc = _activation(acc, ACTIVATION)
    out = (out_ptr + b.to(tl.int64) * s_ob + offs_o[:, None, None].to(tl.int64) * s_oc
           + offs_m[None, :, None] * s_om + offs_n[None, None, :] * s_on)
    mask = mask_o[:, None, None] & (offs_m[None, :, None] < M) & (offs_n[None, None, :] < N)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_mix_kernel(w_ptr, y_ptr, bias_ptr, out_ptr, mul_ptr, M, N, K, F, W, s_wm, s_wk,
                        s_yb, s_yk, s_yf, s_yw, s_bias, s_ob, s_om, s_of, s_ow, s_pb, s_pm, s_pf, s_pw,
                        ACTIVATION: tl.constexpr, SQRELU_GRAD: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """out[b, m, f, w] = epilogue(sum_k W[m, k] y[b, k, f, w] + bias[m]); n = f * W + w; grid (tiles, 1, B)."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    b = tl.program_id(2)
    n_tiles = tl.cdiv(N, BN)
    offs_m = (pid // n_tiles) * BM + tl.arange(0, BM)
    offs_n = (pid % n_tiles) * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    f = offs_n // W
    w = offs_n % W
    y_base = y_ptr + b.to(tl.int64) * s_yb + f * s_yf + w * s_yw
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < K
        a = tl.load(w_ptr + offs_m[:, None] * s_wm + offs_k[None, :] * s_wk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        y = tl.load(y_base[None, :] + offs_k[:, None].to(tl.int64) * s_yk,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, y, acc, input_precision=PRECISION)
    mask = mask_m[:, None] & mask_n[None, :]
    acc += tl.load(bias_ptr + offs_m * s_bias, mask=mask_m, other=0.0).to(ACC)[:, None]
    acc = _activation(acc, ACTIVATION)
    if SQRELU_GRAD != 0:
        saved = tl.load(mul_ptr + b.to(tl.int64) * s_pb + offs_m[:, None].to(tl.int64) * s_pm
                        + (f * s_pf + w * s_pw)[None, :], mask=mask, other=0.0).to(ACC)
        acc = _squared_relu_grad(acc, saved, SQRELU_GRAD)
    out = (out_ptr + b.to(tl.int64) * s_ob + offs_m[:, None].to(tl.int64) * s_om
           + (f * s_of + w * s_ow)[None, :])
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _weight_grad_kernel(a_ptr, b_ptr, out_f32_ptr, rowsum_f32_ptr, M, N, K, K_INNER, K_PER_SPLIT,
                        s_ag, s_am, s_ak1, s_ak0, s_bg, s_bn, s_bk1, s_bk0,
                        HAS_ROWSUM: tl.constexpr, SQUARE_B: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, PRECISION: tl.constexpr):
    """Partial dW[split, g] = sum_{k in split} A[g, :, k] B[g, :, k]^T, k = k1 * K_INNER + k0 addressed through
    (s_*k1, s_*k0) strides; with HAS_ROWSUM also partial sum_k A[g, :, k]; with SQUARE_B, B's tiles are squared
    as loaded (rounded back to B's dtype, as a stored B^2 would be). grid (tiles, G, SPLITS)."""
    ACC: tl.constexpr = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    n_tiles = tl.cdiv(N, BN)
    pid_n = pid % n_tiles
    offs_m = (pid // n_tiles) * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_base = a_ptr + g.to(tl.int64) * s_ag + offs_m[:, None] * s_am
    b_base = b_ptr + g.to(tl.int64) * s_bg + offs_n[None, :] * s_bn
    acc = tl.zeros((BM, BN), dtype=ACC)
    rowsum = tl.zeros((BM,), dtype=ACC)
    k_start = split * K_PER_SPLIT
    k_stop = tl.minimum(k_start + K_PER_SPLIT, K)
    for k0 in range(k_start, k_stop, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < k_stop
        k_off_a = (offs_k // K_INNER).to(tl.int64) * s_ak1 + (offs_k % K_INNER) * s_ak0
        k_off_b = (offs_k // K_INNER).to(tl.int64) * s_bk1 + (offs_k % K_INNER) * s_bk0
        a = tl.load(a_base + k_off_a[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        bt = tl.load(b_base + k_off_b[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if SQUARE_B:
            bf = bt.to(ACC)
            bt = (bf * bf).to(b_ptr.dtype.element_ty)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
        if HAS_ROWSUM:
            rowsum += tl.sum(a.to(ACC), axis=1)
    G = tl.num_programs(1)
    out = out_f32_ptr + ((split * G + g).to(tl.int64) * M + offs_m[:, None]) * N + offs_n[None, :]
    tl.store(out, acc, mask=mask_m[:, None] & mask_n[None, :])
    if HAS_ROWSUM:
        if pid_n == 0:
            tl.store(rowsum_f32_ptr + (split * G + g).to(tl.int64) * M + offs_m, rowsum, mask=mask_m)


# ----------------------------------------------------------------------------------------------
# launch code

_DUMMIES = {}


def _dummy_f32(device) -> Tensor:
    t = _DUMMIES.get(device)
    if t is None:
        t = _DUMMIES[device] = torch.empty(1, dtype=torch.float32, device=device)
    return t


# fp32 inputs multiply in full fp32 ("ieee"), matching torch.matmul's default (allow_tf32=False);
# fp16/bf16 use tensor cores with fp32 accumulation.
PRECISION = "ieee"


_ZEROS = {}


def _bias_or_zeros(bias: Optional[Tensor], like: Tensor, *shape) -> Tensor:
    """The bias, or (no bias) one cached zero broadcast to ``shape`` through zero strides: the kernels add a
    bias unconditionally (fewer specializations) and read it through its strides, so nothing is allocated."""
    if bias is not None:
        return bias
    key = (like.device, like.dtype)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros(1, device=like.device, dtype=like.dtype)
    return z.expand(shape)


def _norm_args(norm, x: Tensor, dummy: Tensor):
    """(mean, rstd, gamma, beta) and their stride arguments for the norm prologue (or placeholders).

    mean/rstd are the frame-norm statistics pass's own (B, C, N) outputs, made contiguous here (a no-op for
    them; the kernel reads them with unit frame stride); gamma/beta (C, K) are read through their strides."""
    if norm is None:
        return (dummy, dummy, x, x), (0, 0, 0, 0, 0, 0)
    mean, rstd, gamma, beta = norm
    mean, rstd = mean.contiguous(), rstd.contiguous()
    return (mean, rstd, gamma, beta), (mean.stride(0), mean.stride(1), *gamma.stride(), *beta.stride())


# Few block configs on purpose: every one is a specialization the compile gate builds for 2 archs x 3 dtypes.
def _gemm_blocks(M: int) -> Tuple[int, int, int]:
    """(BM, BN, BK) for the position-wise (M = F_out, N = frames, K = F_in) and channel-mix
    (M = C_out, N = F * W, K = C_in) GEMMs: 16 rows for tiny M, else 64."""
    return (16 if M <= 16 else 64), 64, 32


def _mix_blocks(C_out: int) -> Tuple[int, int, int, int]:
    """(BO, BM, BN, BK) for the fused kernel: the (BO, BM, BN) fp32 accumulator stays at 8K elements."""
    return (4, 32, 64, 32) if C_out <= 4 else (8, 32, 32, 32)


_WG_BLOCKS = (32, 32, 32)


def _prologue(norm, square_x: bool) -> int:
    if norm is not None:
        assert not square_x, "one x prologue at a time"
        return PRO_NORM
    return PRO_SQUARE if square_x else PRO_NONE


def positionwise(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                 activation: int = ACT_NONE, sqrelu_grad: Optional[Tuple[Tensor, int]] = None,
                 norm: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None, square_x: bool = False) -> Tensor:
    """out[b, c] = act(weight[c] @ prologue(x[b, c]) + bias[c]); x (B, C, K, N), weight (C, M, K) any strides.

    norm = (mean (B, C, N) fp32, rstd (B, C, N) fp32, gamma (C, K), beta (C, K)) applies frame norm to x tiles;
    square_x squares them (the layer's input is x^2). sqrelu_grad = (saved (B, C, M, N), GRAD_FROM_H or
    GRAD_FROM_RELU): multiply the result by 2 relu(z) recovered from the saved squared-ReLU quantity.
    """
    B, C, K, N = x.shape
    M = weight.shape[1]
    out = torch.empty((B, C, M, N), device=x.device, dtype=x.dtype)
    BM, BN, BK = _gemm_blocks(M)
    norm_ptrs, norm_strides = _norm_args(norm, x, _dummy_f32(x.device))
    mul, grad_mode = sqrelu_grad if sqrelu_grad is not None else (out, GRAD_NONE)
    bias = _bias_or_zeros(bias, x, C, M)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), C, B)
    _positionwise_kernel[grid](
        weight, x, bias, out, mul, *norm_ptrs,
        M, N, K, *weight.stride(), *x.stride(), *bias.stride(), *out.stride(), *mul.stride(), *norm_strides,
        PROLOGUE=_prologue(norm, square_x), ACTIVATION=activation, SQRELU_GRAD=grad_mode, BM=BM, BN=BN, BK=BK,
        PRECISION=PRECISION, num_warps=4)
    return out


def positionwise_mix(x: Tensor, weight_pw: Tensor, bias_pw: Optional[Tensor], weight_dw: Tensor,
                     bias_dw: Optional[Tensor], *, activation: int = ACT_NONE,
                     norm: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None, square_x: bool = False) -> Tensor:
    """Fused position-wise + depth-wise mix (C_out <= FUSED_MIX_MAX_CHANNELS); prologues as ``positionwise``."""
    B, C_in, K, N = x.shape
    M = weight_pw.shape[1]
    C_out = weight_dw.shape[0]
    out = torch.empty((B, C_out, M, N), device=x.device, dtype=x.dtype)
    BO, BM, BN, BK = _mix_blocks(C_out)
    norm_ptrs, norm_strides = _norm_args(norm, x, _dummy_f32(x.device))
    bias_pw = _bias_or_zeros(bias_pw, x, C_in, M)
    bias_dw = _bias_or_zeros(bias_dw, x, C_out)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), 1, B)
    _positionwise_mix_kernel[grid](
        weight_pw, x, bias_pw, weight_dw, bias_dw, out, *norm_ptrs, C_in, C_out, M, N, K,
        *weight_pw.stride(), *x.stride(), *bias_pw.stride(), *weight_dw.stride(), *bias_dw.stride(),
        *out.stride(), *norm_strides,
        PROLOGUE=_prologue(norm, square_x), ACTIVATION=activation, BO=BO, BM=BM, BN=BN, BK=BK,
        PRECISION=PRECISION, num_warps=4)
    return out


def channel_mix(y: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: int = ACT_NONE,
                sqrelu_grad: Optional[Tuple[Tensor, int]] = None) -> Tensor:
    """out[b] = act(weight @ y[b] + bias) over channels; y (B, K, F, W) any strides, weight (M, K) any strides;
    sqrelu_grad as ``positionwise``."""
    B, K, F, W = y.shape
    M = weight.shape[0]
    out = torch.empty((B, M, F, W), device=y.device, dtype=y.dtype)
    BM, BN, BK = _gemm_blocks(M)
    mul, grad_mode = sqrelu_grad if sqrelu_grad is not None else (out, GRAD_NONE)
    bias = _bias_or_zeros(bias, y, M)
    grid = (triton.cdiv(M, BM) * triton.cdiv(F * W, BN), 1, B)
    _channel_mix_kernel[grid](
        weight, y, bias, out, mul, M, F * W, K, F, W, *weight.stride(),
        *y.stride(), *bias.stride(), *out.stride(), *mul.stride(), ACTIVATION=activation,
        SQRELU_GRAD=grad_mode, BM=BM, BN=BN, BK=BK, PRECISION=PRECISION, num_warps=4)
    return out


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


def _num_splits(tiles: int, K: int, BK: int, device) -> int:
    """Split-K factor for the weight gradients: about 4 programs per SM, each at least 4 K-blocks long."""
    return max(1, min(triton.cdiv(K, 4 * BK), triton.cdiv(4 * _num_sms(device), max(tiles, 1))))


def weight_grad(a: Tensor, b: Tensor, G: int, M: int, N: int, K: int, K_inner: int, a_strides, b_strides,
                rowsum: bool, out_dtype, square_b: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """dW (G, M, N) = sum_k A[g, :, k] B'[g, :, k]^T (and sum_k A (G, M)); strides = (g, m|n, k1, k0);
    B' = B, or B^2 with square_b."""
    BM, BN, BK = _WG_BLOCKS
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN) * G
    splits = _num_splits(tiles, K, BK, a.device)
    k_per_split = triton.cdiv(triton.cdiv(K, splits), BK) * BK
    splits = triton.cdiv(K, k_per_split)
    acc_dtype = common.stats_dtype(a.dtype)
    part = torch.empty((splits, G, M, N), device=a.device, dtype=acc_dtype)
    rows = torch.empty((splits, G, M), device=a.device, dtype=acc_dtype) if rowsum else _dummy_f32(a.device)
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN), G, splits)
    _weight_grad_kernel[grid](a, b, part, rows, M, N, K, K_inner, k_per_split, *a_strides, *b_strides,
                              HAS_ROWSUM=rowsum, SQUARE_B=square_b, BM=BM, BN=BN, BK=BK, PRECISION=PRECISION,
                              num_warps=4)
    dw = part.sum(0).to(out_dtype)
    return dw, (rows.sum(0).to(out_dtype) if rowsum else None)


def forward(x: Tensor, weight_pw: Optional[Tensor], weight_dw: Optional[Tensor], bias_pw: Optional[Tensor],
            bias_dw: Optional[Tensor], activation: int = ACT_NONE,
            norm: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None, square_x: bool = False) -> Tensor:
    """Triton forward; picks fused or two-pass by C_out. Activation and an x prologue (the norm, or squaring:
    the layer's input is x^2) optional; the prologues need the position-wise weight."""
    if weight_pw is None:
        if norm is not None or square_x:
            raise ValueError("an x prologue (fused frame norm, squaring) needs a position-wise weight")
        return channel_mix(x, weight_dw, bias_dw, activation=activation)
    if weight_dw is None:
        return positionwise(x, weight_pw, bias_pw, activation=activation, norm=norm, square_x=square_x)
    if weight_dw.shape[0] <= FUSED_MIX_MAX_CHANNELS:
        return positionwise_mix(x, weight_pw, bias_pw, weight_dw, bias_dw, activation=activation, norm=norm,
                                square_x=square_x)
    y = positionwise(x, weight_pw, bias_pw, norm=norm, square_x=square_x)
    return channel_mix(y, weight_dw, bias_dw, activation=activation)


def backward(grad: Tensor, x: Tensor, weight_pw: Optional[Tensor], weight_dw: Optional[Tensor],
             bias_pw: Optional[Tensor], has_bias_pw: bool, has_bias_dw: bool,
             sqrelu_input: Optional[str] = None) -> List[Optional[Tensor]]:
    """[dx, d_weight_pw, d_weight_dw, d_bias_pw, d_bias_dw] (None where absent).

    sqrelu_input: the layer takes a squared ReLU's output, saved as x; dx is then the gradient w.r.t. the
    pre-activation z. "h": x is h = relu(z)^2 itself (dx gets the factor 2 sqrt(h)); "relu": x is
    a = relu(z) and the layer's input is a^2 (squared as loaded; dx gets the factor 2a).
    """
    grad = grad.contiguous()
    B, _, F_out, W = grad.shape
    d_wpw = d_wdw = d_bpw = d_bdw = None
    square_x = sqrelu_input == "relu"
    sqrelu_grad = None
    if sqrelu_input is not None:
        sqrelu_grad = (x, GRAD_FROM_RELU if square_x else GRAD_FROM_H)
    dy = grad
    if weight_dw is not None:
        C_out, C_in = weight_dw.shape
        y = positionwise(x, weight_pw, bias_pw, square_x=square_x) if weight_pw is not None else x
        # d_weight_dw[o, c] = sum_{b, f, w} grad[b, o, f, w] y[b, c, f, w]; k = (b, (f, w))
        if y.stride(3) != 1 or y.stride(2) != W:
            y = y.contiguous()
        d_wdw, d_bdw = weight_grad(grad, y, 1, C_out, C_in, B * F_out * W, F_out * W,
                                   (0, grad.stride(1), grad.stride(0), 1), (0, y.stride(1), y.stride(0), 1),
                                   has_bias_dw, weight_dw.dtype, square_b=square_x and weight_pw is None)
        d_wdw = d_wdw[0]
        d_bdw = d_bdw[0] if d_bdw is not None else None
        # the squared-ReLU factor belongs to dx: here when the mix is the layer's last backward step
        dy = channel_mix(grad, weight_dw.t(), sqrelu_grad=sqrelu_grad if weight_pw is None else None)
    if weight_pw is not None:
        C, F_out, F_in = weight_pw.shape
        # d_weight_pw[c] = sum_{b, w} dy[b, c] x[b, c]^T; k = (b, w)
        d_wpw, d_bpw = weight_grad(dy, x, C, F_out, F_in, B * W, W,
                                   (dy.stride(1), dy.stride(2), dy.stride(0), dy.stride(3)),
                                   (x.stride(1), x.stride(2), x.stride(0), x.stride(3)),
                                   has_bias_pw, weight_pw.dtype, square_b=square_x)
        dx = positionwise(dy, weight_pw.transpose(1, 2), sqrelu_grad=sqrelu_grad)
    else:
        dx = dy
    return [dx, d_wpw, d_wdw, d_bpw, d_bdw]


# ----------------------------------------------------------------------------------------------
# torch.library registration


def _opt(t: Optional[Tensor]) -> Tensor:
    return t if t is not None else torch.empty(0)


@torch.library.custom_op("ftkernels::multichannel_linear", mutates_args=())
def _mcl_op(x: Tensor, weight_pw: Optional[Tensor], weight_dw: Optional[Tensor], bias_pw: Optional[Tensor],
            bias_dw: Optional[Tensor]) -> Tensor:
    return forward(x, weight_pw, weight_dw, bias_pw, bias_dw)


@_mcl_op.register_fake
def _(x, weight_pw, weight_dw, bias_pw, bias_dw):
    B, C, F, W = x.shape
    return x.new_empty((B, weight_dw.shape[0] if weight_dw is not None else C,
                        weight_pw.shape[1] if weight_pw is not None else F, W))


@torch.library.custom_op("ftkernels::multichannel_linear_backward", mutates_args=())
def _mcl_backward_op(grad: Tensor, x: Tensor, weight_pw: Optional[Tensor], weight_dw: Optional[Tensor],
                     bias_pw: Optional[Tensor], has_bias_dw: bool) -> List[Tensor]:
    grads = backward(grad, x, weight_pw, weight_dw, bias_pw, bias_pw is not None, has_bias_dw)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_mcl_backward_op.register_fake
def _(grad, x, weight_pw, weight_dw, bias_pw, has_bias_dw):
    # the kernels return new contiguous gradients whatever the inputs' strides (not empty_like's layout)
    like = (x, weight_pw, weight_dw, bias_pw, weight_dw[:, 0] if weight_dw is not None and has_bias_dw else None)
    return [x.new_empty(t.shape) if t is not None else x.new_empty(0) for t in like]


def _mcl_setup_context(ctx, inputs, output):
    x, weight_pw, weight_dw, bias_pw, bias_dw = inputs
    ctx.save_for_backward(x, weight_pw, weight_dw, bias_pw)
    ctx.has_bias_dw = bias_dw is not None


def _mcl_backward(ctx, grad):
    x, weight_pw, weight_dw, bias_pw = ctx.saved_tensors
    dx, d_wpw, d_wdw, d_bpw, d_bdw = _mcl_backward_op(grad, x, weight_pw, weight_dw, bias_pw, ctx.has_bias_dw)
    present = (True, weight_pw is not None, weight_dw is not None, bias_pw is not None, ctx.has_bias_dw)
    return tuple(g if p else None for g, p in zip((dx, d_wpw, d_wdw, d_bpw, d_bdw), present))


_mcl_op.register_autograd(_mcl_backward, setup_context=_mcl_setup_context)


# ----------------------------------------------------------------------------------------------
# public API


def check_inputs(x, weight_pw, weight_dw, bias_pw, bias_dw, x_name: str = "x",
                 names: Tuple[str, str, str, str] = ("weight_pw", "weight_dw", "bias_pw", "bias_dw")) -> None:
    """Validate a multichannel linear's inputs; ``names`` are the argument names used in messages."""
    n_wpw, n_wdw, n_bpw, n_bdw = names
    common.check_tensor(x, x_name, 4, "(B, C_in, F_in, W)")
    common.check_nonempty(x, x_name, "(B, C_in, F_in, W)")
    B, C, F, W = x.shape
    if weight_pw is None and weight_dw is None:
        raise ValueError(f"multichannel linear needs {n_wpw} (C_in, F_out, F_in) or {n_wdw} (C_out, C_in)")
    if weight_pw is not None:
        common.check_tensor(weight_pw, n_wpw, 3, "(C_in, F_out, F_in)")
        F_out = weight_pw.shape[1]
        common.check_shape(weight_pw, n_wpw, (C, F_out, F), "(C_in, F_out, F_in)")
        common.check_shape(bias_pw, n_bpw, (C, F_out), "(C_in, F_out)")
    elif bias_pw is not None:
        raise ValueError(f"{n_bpw} given without {n_wpw}")
    if weight_dw is not None:
        common.check_tensor(weight_dw, n_wdw, 2, "(C_out, C_in)")
        common.check_shape(weight_dw, n_wdw, (weight_dw.shape[0], C), "(C_out, C_in)")
        common.check_shape(bias_dw, n_bdw, (weight_dw.shape[0],), "(C_out,)")
    elif bias_dw is not None:
        raise ValueError(f"{n_bdw} given without {n_wdw}")
    common.check_same(x, dict(zip(names, (weight_pw, weight_dw, bias_pw, bias_dw))))


def multichannel_linear(x: Tensor, weight_pw: Optional[Tensor] = None, weight_dw: Optional[Tensor] = None,
                        bias_pw: Optional[Tensor] = None, bias_dw: Optional[Tensor] = None,
                        backend: Optional[str] = None) -> Tensor:
    """x (B, C_in, F_in, W) -> (B, C_out, F_out, W).

    weight_pw (C_in, F_out, F_in), bias_pw (C_in, F_out): per-channel linear along features for every frame.
    weight_dw (C_out, C_in), bias_dw (C_out,): depth-wise channel mix applied after it.
    """
    x, weight_pw, weight_dw, bias_pw, bias_dw = common.autocast_inputs(x, weight_pw, weight_dw, bias_pw, bias_dw)
    check_inputs(x, weight_pw, weight_dw, bias_pw, bias_dw)
    if not common.use_triton(x, backend, "multichannel_linear"):
        return reference.multichannel_linear(x, weight_pw, weight_dw, bias_pw, bias_dw)
    common.kernel_dtype_ok(x)
    return _mcl_op(x, weight_pw, weight_dw, bias_pw, bias_dw)


class MultichannelLinear(common.BackendAttribute, nn.Module):
    """Parallel per-channel linear layers along features, with an optional depth-wise channel mix.

    (B, in_channels, in_features, W) -> (B, out_channels, out_features, W). As in the seed, the position-wise
    weight exists when ``positionwise`` or the feature count changes, the depth-wise one when ``depthwise``
    or the channel count changes; weights init uniform(+-1/sqrt(fan_in)).
    """

    def __init__(self, in_channels: int, out_channels: int, in_features: int, out_features: int,
                 positionwise: bool = True, depthwise: bool = False, bias: bool = False,
                 backend: Optional[str] = None):
        super().__init__()
        in_channels, out_channels, in_features, out_features = (
            common.check_positive_int(v, n) for v, n in ((in_channels, "in_channels"), (out_channels, "out_channels"),
                                                         (in_features, "in_features"), (out_features, "out_features")))
        self.in_channels, self.out_channels = in_channels, out_channels
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.weight_pw = self.bias_pw = self.weight_dw = self.bias_dw = None
        if positionwise or in_features != out_features:
            bound = 1 / math.sqrt(in_features)
            self.weight_pw = nn.Parameter(torch.empty(in_channels, out_features, in_features).uniform_(-bound, bound))
            if bias:
                self.bias_pw = nn.Parameter(torch.empty(in_channels, out_features).uniform_(-bound, bound))
        if depthwise or in_channels != out_channels:
            bound = 1 / math.sqrt(in_channels)
            self.weight_dw = nn.Parameter(torch.empty(out_channels, in_channels).uniform_(-bound, bound))
            if bias:
                self.bias_dw = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return multichannel_linear(x, self.weight_pw, self.weight_dw, self.bias_pw, self.bias_dw,
                                   backend=self.backend)

    def extra_repr(self) -> str:
        return (f"channels={self.in_channels}->{self.out_channels}, features={self.in_features}->"
                f"{self.out_features}, positionwise={self.weight_pw is not None}, "
                f"depthwise={self.weight_dw is not None}, bias={self.bias_pw is not None or self.bias_dw is not None}")


# ----------------------------------------------------------------------------------------------
# compile gate: every specialization the launch code above can pick


def compile_specializations() -> List[Specialization]:
    mod = __name__
    out = []
    for dt in ("fp32", "fp16", "bf16"):
        # the feed-forward saves relu(z) in fp16 (ACT_RELU epilogue, PRO_SQUARE prologue, GRAD_FROM_RELU
        # epilogue, SQUARE_B weight gradient), h = relu(z)^2 otherwise (ACT_SQRELU, GRAD_FROM_H)
        fp16 = dt == "fp16"
        act = ACT_RELU if fp16 else ACT_SQRELU
        # (PROLOGUE, ACTIVATION, SQRELU_GRAD): plain layer / dx; feed-forward linear1 two-pass with the norm;
        # linear1 position-wise only, with and without the norm; linear2 forward (fp16: squaring its input);
        # linear2 dx with the squared-ReLU factor
        pw_flags = [(PRO_NONE, ACT_NONE, GRAD_NONE), (PRO_NORM, ACT_NONE, GRAD_NONE), (PRO_NONE, act, GRAD_NONE),
                    (PRO_NORM, act, GRAD_NONE), (PRO_NONE, ACT_NONE, GRAD_FROM_RELU if fp16 else GRAD_FROM_H)]
        if fp16:
            pw_flags.append((PRO_SQUARE, ACT_NONE, GRAD_NONE))
        for BM in (16, 64):
            for pro, a, grad in pw_flags:
                out.append(spec(mod, "_positionwise_kernel", dt, dict(
                    PROLOGUE=pro, ACTIVATION=a, SQRELU_GRAD=grad, BM=BM, BN=64, BK=32, PRECISION=PRECISION)))
            # plain mix / dy; linear1's two-pass mix with the activation
            for a in (ACT_NONE, act):
                out.append(spec(mod, "_channel_mix_kernel", dt, dict(
                    ACTIVATION=a, SQRELU_GRAD=GRAD_NONE, BM=BM, BN=64, BK=32, PRECISION=PRECISION)))
        # plain fused layer; linear1 fused, with and without the norm; fp16 linear2 fused (squaring its input)
        mix_flags = [(PRO_NONE, ACT_NONE), (PRO_NONE, act), (PRO_NORM, act)]
        if fp16:
            mix_flags.append((PRO_SQUARE, ACT_NONE))
        for C_out in (4, 8):
            BO, BM, BN, BK = _mix_blocks(C_out)
            for pro, a in mix_flags:
                out.append(spec(mod, "_positionwise_mix_kernel", dt, dict(
                    PROLOGUE=pro, ACTIVATION=a, BO=BO, BM=BM, BN=BN, BK=BK, PRECISION=PRECISION)))
        BM, BN, BK = _WG_BLOCKS
        for rs in (False, True):
            for sq in ((False, True) if fp16 else (False,)):
                out.append(spec(mod, "_weight_grad_kernel", dt, dict(HAS_ROWSUM=rs, SQUARE_B=sq, BM=BM, BN=BN, BK=BK,
                                                                     PRECISION=PRECISION)))
    return out
