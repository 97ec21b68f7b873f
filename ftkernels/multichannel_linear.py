"""Multichannel linear: per-channel position-wise linear along features, then a depth-wise channel mix.

    x (B, C_in, F_in, W) --weight_pw (C_in, F_out, F_in), bias_pw (C_in, F_out)-->  y (B, C_in, F_out, W)
    y                    --weight_dw (C_out, C_in),       bias_dw (C_out,)     -->  out (B, C_out, F_out, W)

Either weight may be absent (position-wise only / depth-wise only).

Kernels (three GEMMs, each ``@triton.autotune``d over a short config list per dtype and shape class)
-------
``_positionwise_kernel``  y[b, c] = W[c] @ x[b, c] (+bias). Per channel the batch is folded into the GEMM's
                          columns (N' = B x frames): the grid is channel-outermost and each channel's
                          (row tile) x (batch, column tile) programs run in grouped (L2-friendly) order, so
                          a weight row panel is read from DRAM once for the whole batch and stays in L2
                          while every batch item's columns use it. (A batch-outermost grid reads all
                          weights once per batch item: at channels 32 the FFN's level-0 weights are 222 MB
                          against a 50 MB L2, 8 x 222 MB of weight traffic for 444 MB of activations.)
                          Optional prologue on each x tile: frame norm from (mean, rstd) (the feed-forward's
                          fused norm) or squaring; epilogues: squared ReLU / ReLU, or the squared-ReLU
                          backward factor. dx = W[c]^T @ dy is the same kernel with W's strides swapped.
``_channel_mix_kernel``   out[b] = W_dw @ y[b]: M = C_out, K = C_in, N = F x W (frames and features
                          flattened through strides); row tiles fastest in the grid, so the y panel of a
                          column tile is read once from DRAM for every output channel. Memory-bound at every
                          model shape (<= 180 FLOP/B at channels 32): tiles sized to move bytes.
                          Backward dy = W_dw^T @ dout.
``_weight_grad_kernel``   dW[g] = sum_k A[g, :, k] B[g, :, k]^T, k = (k1, k0) (batch, frames[, features]):
                          128 x 128 / 128 x 64 tiles (wgmma on sm_90) for the position-wise weights, thin
                          tiles with long K steps for the channel-mix weights (M, N = channel counts);
                          split-K into fp32 partials only when the tiles would not fill the SMs
                          (deterministic: the partials are summed in a fixed order; no atomics), else the
                          gradient is stored in the weight's dtype directly. Row sums of A in the same pass
                          give the bias gradient; a frame-norm or squaring prologue on B's tiles gives the
                          feed-forward's first weight gradient from x itself.

The C_out <= 8 fused position-wise + mix kernel is gone: it kept a (C_out, BM, BN) accumulator in registers
(152-214 registers, 12-19 % occupancy, mma.sync) and was predicted slower than the two passes (report in
BENCHMARKS.md); the two-pass path's extra y round trip is memory traffic at a fraction of the GEMM's time.

Backward: y is saved, not recomputed
------------------------------------
The depth-wise weight gradient needs y = pw(x). The forward writes y anyway (it is the mix's input), so
saving it costs no forward traffic, and backward reads it once (2 B x B C_in F_out W). Recomputing costs the
whole position-wise GEMM again (2 B C_in F_out F_in W FLOPs, plus reading x and writing and re-reading y):
at channels 32 the recompute was +1.8 TFLOP a training step (15-17 % of its FLOPs) for the same bytes. The
memory kept is what PyTorch's own matmul chain keeps (it saves y for the mix's backward). So the op returns y
as a second, saved-only output.

Layouts
-------
Every pointer argument is read through its strides, with two host-side exceptions: the gradient entering
backward is made contiguous (autograd almost always hands a contiguous one; the depth-wise weight gradient
walks (feature, frame) as one flat K index), and so is a strided x for a depth-wise-only layer's weight
gradient (same reason). The frame-norm statistics of the fused prologues are the stats pass's own contiguous
outputs. Weights, biases, x, the saved squared-ReLU activation and the norm's gamma/beta take any strides:
transposed, sliced or offset views cost no copy. A missing bias is one cached zero broadcast through zero
strides (nothing allocated per call). Outputs and gradients are always new contiguous tensors.

Precision: bf16/fp16 multiply on the tensor cores with fp32 accumulation; fp32 dots follow torch's TF32
setting (``common.dot_precision``: "ieee" by default, "tf32" when torch allows it), as torch.matmul does.
Under ``TRITON_INTERPRET=1`` every kernel runs one deterministic config (:data:`INTERPRETER_CONFIGS`).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from ftkernels import _common as common
from ftkernels import reference

# Activations fused into epilogues: none, relu(z)^2, relu(z) (the fp16 feed-forward saves relu(z): see
# squared_relu_ffn.py).
ACT_NONE, ACT_SQRELU, ACT_RELU = 0, 1, 2
# Prologues applied to each x tile as it is loaded: none, frame norm from saved statistics, square (the
# fp16 feed-forward's linear2 takes h = a^2 from the saved a = relu(z)).
PRO_NONE, PRO_NORM, PRO_SQUARE = 0, 1, 2
# Squared-ReLU backward epilogues (dz from dh): none, from a saved h = relu(z)^2 (2 sqrt(h)), from a saved
# a = relu(z) (2 a).
GRAD_NONE, GRAD_FROM_H, GRAD_FROM_RELU = 0, 1, 2
# dtypes in which the squared-ReLU feed-forward saves a = relu(z) rather than h = relu(z)^2 (fp16: h leaves
# fp16's range at both ends; see squared_relu_ffn.py).
SAVE_RELU_DTYPES = (torch.float16,)
GROUP_M = 8  # row tiles per group in the grouped (L2-friendly) program order


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
def _grouped(pid, m_tiles, n_tiles, GROUP: tl.constexpr):
    """(pid_m, pid_n) of program ``pid`` in grouped order: GROUP row tiles walk the column tiles together,
    so a column panel is reused from L2 by GROUP row tiles and a row panel by every column tile in turn."""
    width = GROUP * n_tiles
    first_m = (pid // width) * GROUP
    size_m = tl.minimum(m_tiles - first_m, GROUP)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


# Integers whose divisibility never changes the code that matters (grid decoding, masks across rows, strides of
# once-per-program loads and stores) are not specialized: fewer variants to compile and gate, same inner loops.
@triton.jit(do_not_specialize=["B", "s_bias_c", "s_bias_m", "s_sb", "s_sc", "s_gc", "s_gk", "s_tc", "s_tk"])
def _positionwise_kernel(w_ptr, x_ptr, bias_ptr, out_ptr, mul_ptr, mean_f32_ptr, rstd_f32_ptr, gamma_ptr, beta_ptr,
                         B, M, N, K, s_wc, s_wm, s_wk, s_xb, s_xc, s_xk, s_xn, s_bias_c, s_bias_m,
                         s_ob, s_oc, s_om, s_on, s_pb, s_pc, s_pm, s_pn, s_sb, s_sc, s_gc, s_gk, s_tc, s_tk,
                         PROLOGUE: tl.constexpr, ACTIVATION: tl.constexpr, SQRELU_GRAD: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
                         PRECISION: tl.constexpr):
    """out[b, c] = epilogue(W[c] @ prologue(x[b, c]) + bias[c]); grid (m-tiles * B * n-tiles, C): per channel
    the (row tile, (batch, column tile)) programs in grouped order. bias (C, M) any strides (zeros when the
    layer has none: one load per row, fewer specializations)."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    c = tl.program_id(1).to(tl.int64)
    n_tiles = tl.cdiv(N, BN)
    pid_m, pid_bn = _grouped(tl.program_id(0), tl.cdiv(M, BM), B * n_tiles, GROUP)
    b = (pid_bn // n_tiles).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = (pid_bn % n_tiles) * BN + tl.arange(0, BN)
    offs_kb = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    w_ptrs = w_ptr + c * s_wc + offs_m[:, None] * s_wm + offs_kb[None, :] * s_wk
    x_ptrs = x_ptr + b * s_xb + c * s_xc + offs_kb[:, None] * s_xk + offs_n[None, :] * s_xn
    if PROLOGUE == 1:
        stat_off = b * s_sb + c * s_sc + offs_n
        mean = tl.load(mean_f32_ptr + stat_off, mask=mask_n, other=0.0)
        rstd = tl.load(rstd_f32_ptr + stat_off, mask=mask_n, other=0.0)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        offs_k = k0 + offs_kb
        mask_k = offs_k < K
        w = tl.load(w_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        x = tl.load(x_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if PROLOGUE == 1:
            g = tl.load(gamma_ptr + c * s_gc + offs_k * s_gk, mask=mask_k, other=0.0).to(ACC)
            bt = tl.load(beta_ptr + c * s_tc + offs_k * s_tk, mask=mask_k, other=0.0).to(ACC)
            x = ((x.to(ACC) - mean[None, :]) * rstd[None, :] * g[:, None] + bt[:, None]).to(w.dtype)
        if PROLOGUE == 2:
            xf = x.to(ACC)
            x = (xf * xf).to(w.dtype)  # rounded as a stored h = a^2 would be
        acc = tl.dot(w, x, acc, input_precision=PRECISION)
        w_ptrs += BK * s_wk
        x_ptrs += BK * s_xk
    mask = mask_m[:, None] & mask_n[None, :]
    acc += tl.load(bias_ptr + c * s_bias_c + offs_m * s_bias_m, mask=mask_m, other=0.0).to(ACC)[:, None]
    acc = _activation(acc, ACTIVATION)
    if SQRELU_GRAD != 0:
        saved = tl.load(mul_ptr + b * s_pb + c * s_pc + offs_m[:, None] * s_pm + offs_n[None, :] * s_pn,
                        mask=mask, other=0.0).to(ACC)
        acc = _squared_relu_grad(acc, saved, SQRELU_GRAD)
    out = out_ptr + b * s_ob + c * s_oc + offs_m[:, None] * s_om + offs_n[None, :] * s_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "K", "s_wm", "s_wk", "s_bias"])
def _channel_mix_kernel(w_ptr, y_ptr, bias_ptr, out_ptr, mul_ptr, M, N, K, W, s_wm, s_wk,
                        s_yb, s_yk, s_yf, s_yw, s_bias, s_ob, s_om, s_of, s_ow, s_pb, s_pm, s_pf, s_pw,
                        ACTIVATION: tl.constexpr, SQRELU_GRAD: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """out[b, m, f, w] = epilogue(sum_k W[m, k] y[b, k, f, w] + bias[m]); n = f * W + w; grid
    (m-tiles * n-tiles * B,) with the row tile fastest (the y panel of a column tile is read once)."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    m_tiles = tl.cdiv(M, BM)
    n_tiles = tl.cdiv(N, BN)
    pid_m = pid % m_tiles
    rest = pid // m_tiles
    b = (rest // n_tiles).to(tl.int64)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = (rest % n_tiles) * BN + tl.arange(0, BN)
    offs_kb = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    f = offs_n // W
    w = offs_n % W
    w_ptrs = w_ptr + offs_m[:, None] * s_wm + offs_kb[None, :] * s_wk
    y_ptrs = y_ptr + b * s_yb + (f * s_yf + w * s_yw)[None, :] + offs_kb[:, None].to(tl.int64) * s_yk
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        mask_k = k0 + offs_kb < K
        a = tl.load(w_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        y = tl.load(y_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, y, acc, input_precision=PRECISION)
        w_ptrs += BK * s_wk
        y_ptrs += BK * s_yk
    mask = mask_m[:, None] & mask_n[None, :]
    acc += tl.load(bias_ptr + offs_m * s_bias, mask=mask_m, other=0.0).to(ACC)[:, None]
    acc = _activation(acc, ACTIVATION)
    if SQRELU_GRAD != 0:
        saved = tl.load(mul_ptr + b * s_pb + offs_m[:, None].to(tl.int64) * s_pm + (f * s_pf + w * s_pw)[None, :],
                        mask=mask, other=0.0).to(ACC)
        acc = _squared_relu_grad(acc, saved, SQRELU_GRAD)
    out = out_ptr + b * s_ob + offs_m[:, None].to(tl.int64) * s_om + (f * s_of + w * s_ow)[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M", "N", "K1", "K1_PER_SPLIT", "K0_SPLITS", "s_sg", "s_sk1", "s_gg", "s_gn", "s_tg",
                            "s_tn", "s_og", "s_om", "s_on", "s_rg", "s_ps", "s_pg", "s_pm"])
def _weight_grad_kernel(a_ptr, b_ptr, out_ptr, rows_ptr, part_f32_ptr, mean_f32_ptr, rstd_f32_ptr, gamma_ptr,
                        beta_ptr, M, N, K1, K0, K1_PER_SPLIT, K0_PER_SPLIT, K0_SPLITS,
                        s_ag, s_am, s_ak1, s_ak0, s_bg, s_bn, s_bk1, s_bk0, s_sg, s_sk1, s_gg, s_gn, s_tg, s_tn,
                        s_og, s_om, s_on, s_rg, s_ps, s_pg, s_pm,
                        HAS_ROWSUM: tl.constexpr, PROLOGUE: tl.constexpr, SPLIT: tl.constexpr, BM: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr):
    """dW[split, g] = sum_{k in split} A[g, :, k] prologue(B[g, :, k])^T, k = (k1, k0) addressed through
    (s_*k1, s_*k0) strides; with HAS_ROWSUM also sum_k A[g, :, k]. Split ``split`` covers k1 in
    [s1 K1_PER_SPLIT, ...) and k0 in [s0 K0_PER_SPLIT, ...) (s1, s0 = divmod(split, K0_SPLITS)). B's prologue:
    frame norm (PRO_NORM: (B - mean[g, k]) rstd[g, k] gamma[g, n] + beta[g, n], statistics indexed by
    (k1, k0) as (s_sk1, 1)) or squaring (PRO_SQUARE, rounded back to B's dtype as a stored B^2 would be).
    One split: dW to out (G, M, N) and the row sums to rows (G, M) (unit stride), in their dtype (the
    weight's). SPLIT: fp32 partials to part (S, G, M, N + HAS_ROWSUM) (unit stride along N, the row sums in
    column N). grid (tiles, G, splits)."""
    ACC: tl.constexpr = tl.float64 if a_ptr.dtype.element_ty == tl.float64 else tl.float32
    g = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n_tiles = tl.cdiv(N, BN)
    pid_m, pid_n = _grouped(tl.program_id(0), tl.cdiv(M, BM), n_tiles, GROUP)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_kb = tl.arange(0, BK)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_base = a_ptr + g * s_ag + offs_m[:, None] * s_am
    b_base = b_ptr + g * s_bg + offs_n[None, :] * s_bn
    if PROLOGUE == 1:
        gam = tl.load(gamma_ptr + g * s_gg + offs_n * s_gn, mask=mask_n, other=0.0).to(ACC)
        bet = tl.load(beta_ptr + g * s_tg + offs_n * s_tn, mask=mask_n, other=0.0).to(ACC)
    k1_lo = (split // K0_SPLITS) * K1_PER_SPLIT
    k1_hi = tl.minimum(k1_lo + K1_PER_SPLIT, K1)
    k0_lo = (split % K0_SPLITS) * K0_PER_SPLIT
    k0_hi = tl.minimum(k0_lo + K0_PER_SPLIT, K0)
    k0_tiles = tl.cdiv(k0_hi - k0_lo, BK)
    acc = tl.zeros((BM, BN), dtype=ACC)
    rowsum = tl.zeros((BM,), dtype=ACC)
    for it in range(0, (k1_hi - k1_lo) * k0_tiles):
        k1 = (k1_lo + it // k0_tiles).to(tl.int64)
        offs_k = k0_lo + (it % k0_tiles) * BK + offs_kb
        mask_k = offs_k < k0_hi
        a = tl.load(a_base + k1 * s_ak1 + offs_k[None, :] * s_ak0, mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        bt = tl.load(b_base + k1 * s_bk1 + offs_k[:, None] * s_bk0, mask=mask_k[:, None] & mask_n[None, :],
                     other=0.0)
        if PROLOGUE == 1:
            stat = g * s_sg + k1 * s_sk1 + offs_k
            mean = tl.load(mean_f32_ptr + stat, mask=mask_k, other=0.0)
            rstd = tl.load(rstd_f32_ptr + stat, mask=mask_k, other=0.0)
            xn = (bt.to(ACC) - mean[:, None]) * rstd[:, None] * gam[None, :] + bet[None, :]
            bt = tl.where(mask_k[:, None], xn, 0.0).to(b_ptr.dtype.element_ty)
        if PROLOGUE == 2:
            bf = bt.to(ACC)
            bt = (bf * bf).to(b_ptr.dtype.element_ty)
        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
        if HAS_ROWSUM:
            rowsum += tl.sum(a.to(ACC), axis=1)
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT:
        part = part_f32_ptr + split.to(tl.int64) * s_ps + g * s_pg + offs_m * s_pm
        tl.store(part[:, None] + offs_n[None, :], acc, mask=mask)
        if HAS_ROWSUM:
            if pid_n == 0:
                tl.store(part + N, rowsum, mask=mask_m)
    else:
        out = out_ptr + g * s_og + offs_m[:, None] * s_om + offs_n[None, :] * s_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
        if HAS_ROWSUM:
            if pid_n == 0:
                tl.store(rows_ptr + g * s_rg + offs_m, rowsum.to(rows_ptr.dtype.element_ty), mask=mask_m)


@triton.jit(do_not_specialize=["C_OUT", "C_IN", "CHUNKS_PER_BATCH", "CHUNKS", "CHUNKS_PER_PROGRAM", "s_wo", "s_wc",
                            "s_ps", "s_po"])
def _mix_backward_kernel(w_ptr, g_ptr, y_ptr, dy_ptr, part_f32_ptr, C_OUT, C_IN, N, CHUNK, CHUNKS_PER_BATCH, CHUNKS,
                         CHUNKS_PER_PROGRAM, s_wo, s_wc, s_gb, s_go, s_yb, s_yc, s_db, s_dc, s_ps, s_po,
                         HAS_ROWSUM: tl.constexpr, CB: tl.constexpr, BN: tl.constexpr, PRECISION: tl.constexpr):
    """The channel mix's backward for C_out, C_in <= CB in one pass over grad: dy[b] = W^T @ grad[b], and over
    this program's chunks of columns the partial dW = sum grad y^T (part[p, o, c]) and row sums of grad
    (part[p, o, C_IN], the bias gradient). grad, y, dy: (B, C, N) with unit stride along N (features x
    frames, flat); chunk q = (batch q // CHUNKS_PER_BATCH, columns [CHUNK (q % CHUNKS_PER_BATCH), ...)) in
    BN-column tiles (the host keeps CHUNK a multiple of every config's BN; a tile overhanging its chunk is
    masked, so any CHUNK is covered); grid (programs,)."""
    ACC: tl.constexpr = tl.float64 if w_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid = tl.program_id(0)
    offs_c = tl.arange(0, CB)
    mask_o = offs_c < C_OUT
    mask_i = offs_c < C_IN
    # W^T (c, o): the (CB x CB) left operand of every dy tile
    wt = tl.load(w_ptr + offs_c[None, :] * s_wo + offs_c[:, None] * s_wc, mask=mask_i[:, None] & mask_o[None, :],
                 other=0.0)
    acc_w = tl.zeros((CB, CB), dtype=ACC)
    acc_b = tl.zeros((CB,), dtype=ACC)
    q_lo = pid * CHUNKS_PER_PROGRAM
    sub = tl.cdiv(CHUNK, BN)
    for it in range(0, (tl.minimum(q_lo + CHUNKS_PER_PROGRAM, CHUNKS) - q_lo) * sub):
        q = q_lo + it // sub
        b = (q // CHUNKS_PER_BATCH).to(tl.int64)
        offs_in = (it % sub) * BN + tl.arange(0, BN)  # columns of chunk q: the last tile may overhang it
        offs_n = (q % CHUNKS_PER_BATCH) * CHUNK + offs_in
        mask_n = (offs_n < N) & (offs_in < CHUNK)
        g = tl.load(g_ptr + b * s_gb + offs_c[:, None] * s_go + offs_n[None, :], mask=mask_o[:, None] & mask_n[None, :],
                    other=0.0)
        y = tl.load(y_ptr + b * s_yb + offs_c[:, None] * s_yc + offs_n[None, :], mask=mask_i[:, None] & mask_n[None, :],
                    other=0.0)
        dy = tl.dot(wt, g, tl.zeros((CB, BN), dtype=ACC), input_precision=PRECISION)
        tl.store(dy_ptr + b * s_db + offs_c[:, None] * s_dc + offs_n[None, :], dy.to(dy_ptr.dtype.element_ty),
                 mask=mask_i[:, None] & mask_n[None, :])
        acc_w = tl.dot(g, tl.trans(y), acc_w, input_precision=PRECISION)
        if HAS_ROWSUM:
            acc_b += tl.sum(g.to(ACC), axis=1)
    part = part_f32_ptr + pid.to(tl.int64) * s_ps + offs_c[:, None] * s_po
    tl.store(part + offs_c[None, :], acc_w, mask=mask_o[:, None] & mask_i[None, :])
    if HAS_ROWSUM:
        tl.store(part + C_IN, acc_b[:, None], mask=mask_o[:, None])


@triton.jit
def _reduce_segment(part_f32_ptr, out_ptr, rows_ptr, S, L, N1, N, block, BLOCK: tl.constexpr, BS: tl.constexpr):
    """Columns [block BLOCK, ...) of part (S, L) summed over S in a fixed order (BS rows at a time), then cast and
    stored: element l = q * N1 + n goes to out[q * N + n] when n < N, else (the row-sum column, N1 = N + 1) to
    rows[q]."""
    offs = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    rows_s = tl.arange(0, BS)
    acc = tl.zeros((BLOCK,), dtype=part_f32_ptr.dtype.element_ty)
    for s0 in range(0, S, BS):
        tile = tl.load(part_f32_ptr + (s0 + rows_s)[:, None].to(tl.int64) * L + offs[None, :],
                       mask=((s0 + rows_s) < S)[:, None] & mask[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    q = offs // N1
    n = offs % N1
    tl.store(out_ptr + q * N + n, acc.to(out_ptr.dtype.element_ty), mask=mask & (n < N))
    if N1 != N:
        tl.store(rows_ptr + q, acc.to(rows_ptr.dtype.element_ty), mask=mask & (n == N))


@triton.jit(do_not_specialize=["Sa", "La", "N1a", "Na", "BLOCKS_A", "Sb", "Lb", "N1b", "Nb"])
def _reduce_splits_kernel(pa_f32_ptr, oa_ptr, ra_ptr, Sa, La, N1a, Na, BLOCKS_A, pb_f32_ptr, ob_ptr, rb_ptr, Sb, Lb,
                          N1b, Nb, BLOCK: tl.constexpr, BS: tl.constexpr):
    """The split-K partial sums of up to two weight gradients of one backward call in one launch (deterministic:
    each sums its splits in a fixed order); see _reduce_segment. grid (BLOCKS_A + blocks of b,)."""
    pid = tl.program_id(0)
    if pid < BLOCKS_A:
        _reduce_segment(pa_f32_ptr, oa_ptr, ra_ptr, Sa, La, N1a, Na, pid, BLOCK, BS)
    else:
        _reduce_segment(pb_f32_ptr, ob_ptr, rb_ptr, Sb, Lb, N1b, Nb, pid - BLOCKS_A, BLOCK, BS)


# ----------------------------------------------------------------------------------------------
# configs: a short list per kernel, dtype group and shape class (each list is its own autotuner, so a launch
# is gated with the configs it can pick and no others); one deterministic config under the interpreter


def _cfg(BM, BN, BK, warps, stages):
    return triton.Config({"BM": BM, "BN": BN, "BK": BK}, num_warps=warps, num_stages=stages)


# (kernel, dtype group, shape class) -> configs. Dtype groups: "16" (fp16/bf16: tensor cores; wgmma needs
# BM >= 64 rows per warpgroup), "32" (fp32: BK 32 keeps 3 stages inside the A100's 163 KB of shared memory).
# Every list fits both chips' shared memory (the compile gate checks sm_80 and sm_90), and no fp16/bf16 config
# spills on sm_90 at any recorded launch, the odd-stride sweep included (4-warp 64 x 128 x 64 tiles, thin weight-
# gradient tiles with BK 128 and mix-backward column tiles of 128 at C_in/C_out 32 did: 8-2056 B).
CONFIGS: Dict[Tuple[str, str, str], List[triton.Config]] = {
    # position-wise GEMM: M = F_out rows, N = frames (per batch item), K = F_in
    ("pw", "16", "large"): [_cfg(128, 128, 64, 8, 3), _cfg(128, 64, 64, 8, 3)],  # M > 64
    ("pw", "16", "small"): [_cfg(64, 128, 64, 8, 3), _cfg(64, 64, 32, 4, 4)],
    ("pw", "32", "large"): [_cfg(128, 64, 32, 8, 3), _cfg(64, 64, 32, 4, 3)],
    ("pw", "32", "small"): [_cfg(64, 64, 32, 4, 3), _cfg(64, 128, 32, 4, 3)],
    # channel mix: M = C_out, K = C_in, N = F x W (memory-bound: long column tiles)
    ("mix", "16", "thin"): [_cfg(16, 256, 32, 4, 3), _cfg(16, 128, 64, 4, 3)],  # C_out <= 16
    ("mix", "16", "mid"): [_cfg(64, 128, 32, 4, 3), _cfg(64, 256, 32, 8, 3)],  # C_out <= 64
    ("mix", "16", "wide"): [_cfg(128, 128, 64, 8, 3), _cfg(64, 128, 64, 4, 4)],
    ("mix", "32", "thin"): [_cfg(16, 128, 32, 4, 3), _cfg(16, 256, 32, 4, 3)],
    ("mix", "32", "mid"): [_cfg(64, 128, 32, 4, 3), _cfg(64, 64, 32, 4, 3)],
    ("mix", "32", "wide"): [_cfg(128, 64, 32, 8, 3), _cfg(64, 128, 32, 4, 3)],
    # weight gradients: position-wise weights (M = F_out, N = F_in >= 64, K = B x W): wgmma-sized tiles;
    # channel-mix weights and small features (M or N < 64, K long): thin tiles, long K steps
    # (The 8-warp 128 x 128 x 64 tile is gone: on an H200 with triton 3.6 it computed wrong sums in fp16 and
    # bf16, with O(1) errors on 0.2-1.4% of a feed-forward's dW, and the autotuner picked it for 5 of the v4
    # training step's 15 shapes; benchmarks/results/2026-11-26-nvidia-h200-lease2/. The interpreter computes
    # it right. test_every_low_precision_config_on_the_gpu holds every fp16/bf16 config left.)
    ("wg", "16", "gemm"): [_cfg(128, 64, 64, 4, 4)],
    ("wg", "16", "thin"): [_cfg(32, 64, 32, 4, 4), _cfg(64, 64, 32, 4, 4)],
    ("wg", "32", "gemm"): [_cfg(128, 64, 32, 8, 3), _cfg(64, 64, 32, 4, 3)],
    ("wg", "32", "thin"): [_cfg(32, 64, 64, 4, 3), _cfg(64, 64, 32, 4, 3)],
    # the channel mix's fused backward (C_out, C_in <= 64): column tiles of BN (memory-bound)
    ("mixb", "16", "all"): [triton.Config({"BN": 64}, num_warps=4, num_stages=3),
                            triton.Config({"BN": 64}, num_warps=8, num_stages=4)],
    ("mixb", "32", "all"): [triton.Config({"BN": 64}, num_warps=4, num_stages=3),
                            triton.Config({"BN": 128}, num_warps=4, num_stages=2)],
}
# The interpreter's configs: small tiles, so the tests' odd shapes cross tile edges in every dimension.
INTERPRETER_CONFIGS = {"pw": _cfg(32, 32, 16, 4, 1), "mix": _cfg(16, 32, 16, 4, 1), "wg": _cfg(32, 32, 32, 4, 1),
                       "mixb": triton.Config({"BN": 32}, num_warps=4, num_stages=1)}
_KERNELS = {"pw": _positionwise_kernel, "mix": _channel_mix_kernel, "wg": _weight_grad_kernel,
            "mixb": _mix_backward_kernel}
_KEYS = {"pw": ["B", "M", "N", "K"], "mix": ["M", "N", "K"],
         "wg": ["M", "N", "K1", "K0", "K1_PER_SPLIT", "K0_PER_SPLIT"], "mixb": ["C_OUT", "C_IN", "N", "CHUNKS_PER_PROGRAM"]}
# One module attribute per autotuner, _<kernel>_<group>_<shape> (scripts/gpu_check.sh finds them here and dumps
# their picks); forced_config("pw" | "mix" | "wg" | "mixb", config) runs one config whatever the tuner would pick.
_AUTOTUNERS = common.Autotuners(CONFIGS, INTERPRETER_CONFIGS, _KERNELS, _KEYS, globals(), prefix="_")
forced_config = _AUTOTUNERS.forced


def _tuner(kernel: str, dtype: torch.dtype, shape: str):
    return _AUTOTUNERS[(kernel, common.dtype_group(dtype), shape)]


# ----------------------------------------------------------------------------------------------
# launch code

_DUMMIES = {}


def _dummy_f32(device) -> Tensor:
    t = _DUMMIES.get(device)
    if t is None:
        t = _DUMMIES[device] = torch.empty(1, dtype=torch.float32, device=device)
    return t


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
    """(mean, rstd, gamma, beta) and the strides (stats batch, stats channel, gamma c, gamma k, beta c, beta k)
    for the norm prologue (or placeholders).

    mean/rstd are the frame-norm statistics pass's own (B, C, N) outputs, made contiguous here (a no-op for
    them; the kernels read them with unit frame stride); gamma/beta (C, K) are read through their strides."""
    if norm is None:
        return (dummy, dummy, x, x), (0, 0, 0, 0, 0, 0)
    mean, rstd, gamma, beta = norm
    mean, rstd = mean.contiguous(), rstd.contiguous()
    return (mean, rstd, gamma, beta), (mean.stride(0), mean.stride(1), *gamma.stride(), *beta.stride())


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
    norm_ptrs, norm_strides = _norm_args(norm, x, _dummy_f32(x.device))
    mul, grad_mode = sqrelu_grad if sqrelu_grad is not None else (out, GRAD_NONE)
    bias = _bias_or_zeros(bias, x, C, M)

    def grid(meta):
        return triton.cdiv(M, meta["BM"]) * B * triton.cdiv(N, meta["BN"]), C

    _tuner("pw", x.dtype, "small" if M <= 64 else "large")[grid](
        weight, x, bias, out, mul, *norm_ptrs,
        B, M, N, K, *weight.stride(), *x.stride(), *bias.stride(), *out.stride(), *mul.stride(), *norm_strides,
        PROLOGUE=_prologue(norm, square_x), ACTIVATION=activation, SQRELU_GRAD=grad_mode, GROUP=GROUP_M,
        PRECISION=common.dot_precision(x.dtype))
    return out


def channel_mix(y: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, activation: int = ACT_NONE,
                sqrelu_grad: Optional[Tuple[Tensor, int]] = None) -> Tensor:
    """out[b] = act(weight @ y[b] + bias) over channels; y (B, K, F, W) any strides, weight (M, K) any strides;
    sqrelu_grad as ``positionwise``."""
    B, K, F, W = y.shape
    M = weight.shape[0]
    N = F * W
    out = torch.empty((B, M, F, W), device=y.device, dtype=y.dtype)
    mul, grad_mode = sqrelu_grad if sqrelu_grad is not None else (out, GRAD_NONE)
    bias = _bias_or_zeros(bias, y, M)

    def grid(meta):
        return (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]) * B,)

    _tuner("mix", y.dtype, "thin" if M <= 16 else "mid" if M <= 64 else "wide")[grid](
        weight, y, bias, out, mul, M, N, K, W, *weight.stride(), *y.stride(), *bias.stride(), *out.stride(),
        *mul.stride(), ACTIVATION=activation, SQRELU_GRAD=grad_mode, PRECISION=common.dot_precision(y.dtype))
    return out


@functools.lru_cache(maxsize=None)
def _num_sms(device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


# Nominal tiles of the two weight-gradient classes, for the split-K decision (the autotuned tile is chosen
# later; every config handles any split).
_WG_NOMINAL = {"gemm": (128, 128), "thin": (32, 64)}
_K0_CHUNK = 256  # k0 ranges of a split are multiples of this (>= every config's BK)


def _splits(G: int, M: int, N: int, K1: int, K0: int, shape: str, elt: int, device) -> Tuple[int, int, int, int]:
    """(K1 per split, K0 per split, k0 splits, total splits). K is split only when the tiles alone would not
    fill the SMs: up to one program per SM, each split at least 512 long, and the fp32 partials' traffic
    (written and read back: 8 S M N bytes) at most a quarter of the operands' ((M + N) K elt bytes)."""
    BM, BN = _WG_NOMINAL[shape]
    tiles = G * triton.cdiv(M, BM) * triton.cdiv(N, BN)
    sms = _num_sms(device)
    want = 1
    if tiles < sms:  # one full wave (the tiles times the splits at most the SM count)
        K = K1 * K0
        want = max(1, min(sms // tiles, K // 512, (M + N) * K * elt // (32 * M * N)))
    # split k0 (the long flat (feature, frame) index of the channel-mix gradients) in chunks, else k1 (batch)
    s0 = max(1, min(want, K0 // _K0_CHUNK))
    k0_per = triton.cdiv(triton.cdiv(K0, s0), _K0_CHUNK) * _K0_CHUNK
    s0 = triton.cdiv(K0, k0_per)
    s1 = max(1, min(K1, want // s0))
    k1_per = triton.cdiv(K1, s1)
    s1 = triton.cdiv(K1, k1_per)
    return k1_per, k0_per, s0, s1 * s0


@dataclasses.dataclass
class _Partials:
    """fp32 split-K partials part (S, ..., N + rowsum) of a gradient (out (..., N), rows (...) or None), to be
    summed by reduce_partials."""
    part: Tensor
    out: Tensor
    rows: Optional[Tensor]


REDUCE_BLOCK, REDUCE_ROWS = 256, 32


def reduce_partials(jobs: List[_Partials]) -> None:
    """Sum every job's partials into its out/rows (new contiguous tensors in the weight's dtype), two jobs per
    launch (a backward call's two weight gradients: one launch where torch's sum + cast would be four)."""
    for i in range(0, len(jobs), 2):
        pair = jobs[i:i + 2]
        args, blocks = [], []
        for j in pair + pair[:1] * (2 - len(pair)):  # a lone job: the second segment has no blocks
            L = j.part[0].numel()
            N = j.out.shape[-1]
            blocks.append(triton.cdiv(L, REDUCE_BLOCK))
            args.append((j.part, j.out, j.rows if j.rows is not None else j.out, j.part.shape[0], L,
                         N + (j.rows is not None), N))
        if len(pair) == 1:
            blocks[1] = 0
        _reduce_splits_kernel[(blocks[0] + blocks[1],)](*args[0], blocks[0], *args[1], BLOCK=REDUCE_BLOCK,
                                                        BS=REDUCE_ROWS, num_warps=4)


def weight_grad(a: Tensor, b: Tensor, G: int, M: int, N: int, K1: int, K0: int, a_strides, b_strides,
                rowsum: bool, out_dtype, prologue: int = PRO_NONE,
                norm: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
                pending: Optional[List[_Partials]] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """dW (G, M, N) = sum_k A[g, :, k] B'[g, :, k]^T (and sum_k A (G, M)); k = (k1, k0), strides = (g, m|n, k1,
    k0); B' = B, B^2 (PRO_SQUARE) or norm(B) (PRO_NORM: norm = (mean, rstd (K1, G, K0) fp32, gamma, beta
    (G, N)), the frame-norm statistics (B, C, W) and affine (C, F) of a (B, C, F, W) input). With split K and
    ``pending`` given, the partials' sum is appended there (the caller runs reduce_partials) instead of run."""
    shape = "gemm" if min(M, N) >= 64 else "thin"
    k1_per, k0_per, k0_splits, splits = _splits(G, M, N, K1, K0, shape, a.element_size(), a.device)
    dummy = _dummy_f32(a.device)
    # one split: the gradients in the weight's dtype directly; else fp32 partials (the row sums in an extra
    # column), summed in split order by reduce_partials
    out = torch.empty((G, M, N), device=a.device, dtype=out_dtype)
    rows = torch.empty((G, M), device=a.device, dtype=out_dtype) if rowsum else None
    part = (torch.empty((splits, G, M, N + rowsum), device=a.device, dtype=common.stats_dtype(a.dtype))
            if splits > 1 else dummy)
    s_part = part.stride()[:3] if splits > 1 else (0, 0, 0)
    if norm is not None:
        mean, rstd, gamma, beta = norm
        mean, rstd = mean.contiguous(), rstd.contiguous()  # (K1, G, K0): the stats pass's (B, C, W)
        norm_ptrs = (mean, rstd, gamma, beta)
        norm_strides = (mean.stride(1), mean.stride(0), *gamma.stride(), *beta.stride())
    else:
        norm_ptrs, norm_strides = (dummy, dummy, b, b), (0, 0, 0, 0, 0, 0)

    def grid(meta):
        return triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), G, splits

    _tuner("wg", a.dtype, shape)[grid](
        a, b, out, rows if rowsum else out, part, *norm_ptrs, M, N, K1, K0, k1_per, k0_per, k0_splits, *a_strides,
        *b_strides, *norm_strides, *out.stride(), M, *s_part, HAS_ROWSUM=rowsum, PROLOGUE=prologue,
        SPLIT=splits > 1, GROUP=GROUP_M, PRECISION=common.dot_precision(a.dtype))
    if splits == 1:
        return out, rows
    job = _Partials(part, out, rows)
    if pending is None:
        reduce_partials([job])
    else:
        pending.append(job)
    return job.out, job.rows


MIX_BACKWARD_MAX_CHANNELS = 64  # C_out and C_in up to this: the channel mix's backward in one pass
MIX_BACKWARD_CHUNK = 2048  # columns per chunk (a multiple of every config's BN)


def mix_backward(grad: Tensor, y: Tensor, weight: Tensor, rowsum: bool, pending: List[_Partials]
                 ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(dy = weight^T @ grad, d_weight = sum grad y^T, d_bias = sum grad) for a channel mix with
    C_out, C_in <= MIX_BACKWARD_MAX_CHANNELS, reading grad once; grad (B, C_out, F, W) and y (B, C_in, F, W)
    with (F, W) flat (unit frame stride, feature stride W). The weight and bias gradients are filled when the
    caller runs reduce_partials(pending)."""
    B, C_out, F, W = grad.shape
    C_in = y.shape[1]
    N = F * W
    CB = max(16, common.next_pow2(max(C_out, C_in)))
    # about one program per SM, each a run of column chunks (the partials, programs x C_out x (C_in + 1) fp32,
    # are small next to grad and y)
    sms = _num_sms(grad.device)
    # chunks stay multiples of 256 (of every config's BN: halving 1792 gave 224, which BN 64 tiles left 32
    # columns of unwritten dy per chunk on a 132-SM GPU)
    chunk = min(MIX_BACKWARD_CHUNK, triton.cdiv(N, 256) * 256)
    while chunk > 256 and B * triton.cdiv(N, chunk) < sms:
        chunk = triton.cdiv(chunk // 2, 256) * 256
    per_batch = triton.cdiv(N, chunk)
    chunks = B * per_batch
    per_program = triton.cdiv(chunks, min(chunks, sms))
    programs = triton.cdiv(chunks, per_program)
    dy = torch.empty((B, C_in, F, W), device=grad.device, dtype=grad.dtype)
    part = torch.empty((programs, C_out, C_in + rowsum), device=grad.device, dtype=common.stats_dtype(grad.dtype))
    _tuner("mixb", grad.dtype, "all")[(programs,)](
        weight, grad, y, dy, part, C_out, C_in, N, chunk, per_batch, chunks, per_program,
        weight.stride(0), weight.stride(1), grad.stride(0), grad.stride(1), y.stride(0), y.stride(1),
        dy.stride(0), dy.stride(1), part.stride(0), part.stride(1),
        HAS_ROWSUM=rowsum, CB=CB, PRECISION=common.dot_precision(grad.dtype))
    job = _Partials(part, torch.empty((C_out, C_in), device=grad.device, dtype=weight.dtype),
                    torch.empty((C_out,), device=grad.device, dtype=weight.dtype) if rowsum else None)
    pending.append(job)
    return dy, job.out, job.rows


def forward(x: Tensor, weight_pw: Optional[Tensor], weight_dw: Optional[Tensor], bias_pw: Optional[Tensor],
            bias_dw: Optional[Tensor], activation: int = ACT_NONE,
            norm: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None,
            square_x: bool = False) -> Tuple[Tensor, Tensor]:
    """(out, y): the Triton forward; y = the position-wise output when a channel mix follows (saved for the
    mix's weight gradient), else an empty tensor. Activation and an x prologue (the norm, or squaring: the
    layer's input is x^2) optional; the prologues need the position-wise weight."""
    if weight_pw is None:
        if norm is not None or square_x:
            raise ValueError("an x prologue (fused frame norm, squaring) needs a position-wise weight")
        return channel_mix(x, weight_dw, bias_dw, activation=activation), x.new_empty(0)
    if weight_dw is None:
        return (positionwise(x, weight_pw, bias_pw, activation=activation, norm=norm, square_x=square_x),
                x.new_empty(0))
    y = positionwise(x, weight_pw, bias_pw, norm=norm, square_x=square_x)
    return channel_mix(y, weight_dw, bias_dw, activation=activation), y


def _bcfw_strides(t: Tensor):
    """(g = channel, m = feature, k1 = batch, k0 = frame) strides of a (B, C, F, W) tensor."""
    return t.stride(1), t.stride(2), t.stride(0), t.stride(3)


def backward(grad: Tensor, x: Tensor, y: Tensor, weight_pw: Optional[Tensor], weight_dw: Optional[Tensor],
             has_bias_pw: bool, has_bias_dw: bool, sqrelu_input: Optional[str] = None,
             norm: Optional[Tuple[Tensor, Tensor, Tensor, Tensor]] = None) -> List[Optional[Tensor]]:
    """[dx, d_weight_pw, d_weight_dw, d_bias_pw, d_bias_dw] (None where absent); y = the forward's saved
    position-wise output (used when both weights are present).

    sqrelu_input (needs the position-wise weight): the layer takes a squared ReLU's output, saved as x; dx is
    then the gradient w.r.t. the pre-activation z. "h": x is h = relu(z)^2 itself (dx gets the factor
    2 sqrt(h)); "relu": x is a = relu(z) and the layer's input is a^2 (squared as loaded; dx gets the factor 2a).
    norm = (mean, rstd, gamma, beta) (needs the position-wise weight): the layer's input is frame_norm(x) (the
    feed-forward's first linear); its weight gradient normalises x's tiles as it loads them, and dx is the
    gradient w.r.t. norm(x).
    """
    if (sqrelu_input is not None or norm is not None) and weight_pw is None:
        raise ValueError("an x prologue (fused frame norm, squared ReLU input) needs a position-wise weight")
    grad = grad.contiguous()
    B, _, F_out, W = grad.shape
    d_wpw = d_wdw = d_bpw = d_bdw = None
    dy = grad
    pending: List[_Partials] = []  # split-K partials of the weight gradients, summed together at the end
    if weight_dw is not None:
        C_out, C_in = weight_dw.shape
        if weight_pw is None:
            y = x
        # d_weight_dw[o, c] = sum_{b, f, w} grad[b, o, f, w] y[b, c, f, w]: k = (b, (f, w)), flat (f, w)
        if y.stride(3) != 1 or y.stride(2) != W:
            y = y.contiguous()
        if max(C_out, C_in) <= MIX_BACKWARD_MAX_CHANNELS:  # dy and both gradients in one pass over grad
            dy, d_wdw, d_bdw = mix_backward(grad, y, weight_dw, has_bias_dw, pending)
        else:
            d_wdw, d_bdw = weight_grad(grad, y, 1, C_out, C_in, B, F_out * W, (0, grad.stride(1), grad.stride(0), 1),
                                       (0, y.stride(1), y.stride(0), 1), has_bias_dw, weight_dw.dtype,
                                       pending=pending)
            d_wdw = d_wdw[0]
            d_bdw = d_bdw[0] if d_bdw is not None else None
            dy = channel_mix(grad, weight_dw.t())
    if weight_pw is not None:
        C, F_out, F_in = weight_pw.shape
        square_x = sqrelu_input == "relu"
        # d_weight_pw[c] = sum_{b, w} dy[b, c] x'[b, c]^T; k = (b, w), x' = x, x^2 or norm(x)
        prologue = PRO_NORM if norm is not None else PRO_SQUARE if square_x else PRO_NONE
        d_wpw, d_bpw = weight_grad(dy, x, C, F_out, F_in, B, W, _bcfw_strides(dy), _bcfw_strides(x), has_bias_pw,
                                   weight_pw.dtype, prologue=prologue, norm=norm, pending=pending)
        sqrelu_grad = None
        if sqrelu_input is not None:
            sqrelu_grad = (x, GRAD_FROM_RELU if square_x else GRAD_FROM_H)
        dx = positionwise(dy, weight_pw.transpose(1, 2), sqrelu_grad=sqrelu_grad)
    else:
        dx = dy
    reduce_partials(pending)
    return [dx, d_wpw, d_wdw, d_bpw, d_bdw]


# ----------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("ftkernels::multichannel_linear", mutates_args=())
def _mcl_op(x: Tensor, weight_pw: Optional[Tensor], weight_dw: Optional[Tensor], bias_pw: Optional[Tensor],
            bias_dw: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(out, y): y = the position-wise output when both weights are present (saved for backward), else
    empty."""
    return forward(x, weight_pw, weight_dw, bias_pw, bias_dw)


@_mcl_op.register_fake
def _(x, weight_pw, weight_dw, bias_pw, bias_dw):
    B, C, F, W = x.shape
    F_out = weight_pw.shape[1] if weight_pw is not None else F
    out = x.new_empty((B, weight_dw.shape[0] if weight_dw is not None else C, F_out, W))
    y = x.new_empty((B, C, F_out, W)) if weight_pw is not None and weight_dw is not None else x.new_empty(0)
    return out, y


@torch.library.custom_op("ftkernels::multichannel_linear_backward", mutates_args=())
def _mcl_backward_op(grad: Tensor, x: Tensor, y: Tensor, weight_pw: Optional[Tensor], weight_dw: Optional[Tensor],
                     has_bias_pw: bool, has_bias_dw: bool) -> List[Tensor]:
    grads = backward(grad, x, y, weight_pw, weight_dw, has_bias_pw, has_bias_dw)
    return [g if g is not None else x.new_empty(0) for g in grads]


@_mcl_backward_op.register_fake
def _(grad, x, y, weight_pw, weight_dw, has_bias_pw, has_bias_dw):
    # the kernels return new contiguous gradients whatever the inputs' strides (not empty_like's layout)
    like = (x, weight_pw, weight_dw, weight_pw[:, :, 0] if weight_pw is not None and has_bias_pw else None,
            weight_dw[:, 0] if weight_dw is not None and has_bias_dw else None)
    return [x.new_empty(t.shape) if t is not None else x.new_empty(0) for t in like]


def _mcl_setup_context(ctx, inputs, output):
    x, weight_pw, weight_dw, bias_pw, bias_dw = inputs
    _, y = output
    ctx.save_for_backward(x, y, weight_pw, weight_dw)
    ctx.has_bias = (bias_pw is not None, bias_dw is not None)
    ctx.mark_non_differentiable(y)
    ctx.set_materialize_grads(False)  # y is saved-only: no zero-filled gradient for it


def _mcl_backward(ctx, grad, _dy):
    if grad is None:  # the output took no part in the loss
        return None, None, None, None, None
    x, y, weight_pw, weight_dw = ctx.saved_tensors
    dx, d_wpw, d_wdw, d_bpw, d_bdw = _mcl_backward_op(grad, x, y, weight_pw, weight_dw, *ctx.has_bias)
    present = (True, weight_pw is not None, weight_dw is not None, *ctx.has_bias)
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
    return _mcl_op(x, weight_pw, weight_dw, bias_pw, bias_dw)[0]


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
