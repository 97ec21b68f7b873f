"""Frame norm: layer norm over the features of every (batch, channel, frame), per-channel affine.

    x (B, C, F, W) -> y (B, C, F, W);  weight, bias (C, F)
    y[b,c,:,w] = (x[b,c,:,w] - mean) * rstd * weight[c] + bias[c]

Kernels
-------
The features axis is strided (stride W in a contiguous tensor) while frames are contiguous, so a program
takes a tile of columns -- BW neighbouring frames (coalesced along frames) of BC channels of one batch item --
and reduces over the features. Statistics are taken relative to a shift, each frame's first feature: x - shift
is exact for x near it (Sterbenz), so a large common offset such as a magnitude spectrogram's never enters the
sums and costs no digits, and the variance is a centred sum of squares (no E[x^2] - E[x]^2 cancellation).

* **Resident** (F up to 1024 forward and backward: next_pow2(F) x BW <= 16K forward, 8K backward): the
  whole (F x BW) block is loaded once and kept in registers (8 warps, about 64 values a thread); the
  statistics are the two-pass algorithm on it, y is written from it. One read of x forward; one read of dy
  and x backward. BW = 16K / F (16 frames at F = 1024, up to 64), so the model's level-0 launches
  (C = 2-4, B = 8, W = 256) run 256-512 programs, about 2-4 per SM of an H100.
* **Chunked** (larger F): x is streamed in BF-feature chunks; the statistics pass merges each chunk's mean
  and centred sum of squares with Chan et al.'s parallel update; y (and dx) are written by a second pass that
  walks the chunks backwards, so its first chunks are the ones the first pass left in L2. Every chunk loop
  is software-pipelined (``tl.range(num_stages=STAGES)``, 2 stages): the next chunk's loads are in flight as
  cp.async copies (LDGSTS in the sm_80/sm_90 SASS) while this one is reduced. Channels-last chunks hold 8K
  elements forward, 4K backward, at 16 warps (fewer, longer chunks; about 16 values a thread in flight).

``_frame_norm_fwd_kernel`` stores mean/rstd (B, C, W) fp32 (fp64 for the float64 interpreter oracle) for
backward and the feed-forward's fused-norm prologue (``STORE_Y=False``), or reads them (``LOAD_STATS``: the
feed-forward's backward re-normalising x: one streamed pass). y is written in x's dtype, or in ``out_dtype``
and channels-last (memory order B, F, W, C) for a cuDNN convolution under autocast: then the tile holds 16
channels x 16 frames (fewer channels: more frames) so that the reads of x (contiguous along frames) and the
writes of y (contiguous along channels) both stay coalesced; Triton moves the tile between the two layouts
through shared memory. ``_frame_norm_bwd_kernel`` picks the same tiles when dy is channels-last (a conv's
input gradient).

``_frame_norm_bwd_kernel``: per column, dx = rstd * (g - mean_F(g) - xhat * mean_F(g * xhat)), g = dy * weight;
each program also sums dy * xhat and dy over its frames into one row of an fp32 partial buffer (B * groups, 2,
C, F) (a resident program takes several frame blocks while the grid keeps 132 programs: fewer rows), and
``_partial_sum_kernel`` adds the rows in order into dweight/dbias in x's dtype (deterministic, no atomics).

Tiles are chosen per F, C and layout (:func:`fwd_tiles`, :func:`bwd_tiles`), never by timing, so a result does
not depend on which GPU or autotuning run produced it (the reduction order is part of the tile).

Layouts: x, dy, weight and bias are read through their strides (views cost no copy; a missing weight/bias
is one cached element broadcast through zero strides). mean/rstd are this module's own contiguous outputs;
passed back in (backward, the feed-forward) they are made contiguous on the host, a no-op for them.
y is contiguous (or channels-last), dx contiguous, dweight, dbias new tensors. mean/rstd are saved-only
outputs: autograd hands backward None for them (no zero-filled gradients).
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from ftkernels import _common as common
from ftkernels import reference

# ----------------------------------------------------------------------------------------------
# kernels
#
# Every kernel works on a tile of columns: BC channels x BW frames of one batch item (a column = one
# (b, c, w): one frame's F features). BC = 1 when frames are the contiguous axis (x's natural layout),
# BC = 16 when a channels-last tensor is read or written (y for a channels-last conv, its gradient dy), so
# both sides stay coalesced: Triton moves the tile between the two layouts through shared memory.


@triton.jit
def _frame_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_f32_ptr, rstd_f32_ptr, C, F, W, eps,
                           s_xb, s_xc, s_xf, s_xw, s_wc, s_wf, s_bc, s_bf, s_yb, s_yc, s_yf, s_yw,
                           STORE_Y: tl.constexpr, LOAD_STATS: tl.constexpr, RESIDENT: tl.constexpr,
                           BF: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr, STAGES: tl.constexpr = 2):
    """grid (W-blocks, C-blocks, B). Statistics mean/rstd (B, C, W) contiguous fp32: computed and stored, or
    with LOAD_STATS read from an earlier pass. RESIDENT (BF >= F): the whole (F x BC x BW) block is loaded
    once and kept on chip, y is written from it (one read of x); otherwise x is streamed in BF-feature
    chunks, twice when y is written (the second pass walks the chunks backwards, so its first chunks are
    the ones the first pass left in L2). y is written in y_ptr's dtype through its strides."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid_w = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    offs_c = pid_c * BC + tl.arange(0, BC)
    offs_w = pid_w * BW + tl.arange(0, BW)
    mask_cw = (offs_c[:, None] < C) & (offs_w[None, :] < W)  # (BC, BW) columns
    x_col = x_ptr + b.to(tl.int64) * s_xb + offs_c[:, None].to(tl.int64) * s_xc + offs_w[None, :] * s_xw
    stat = (b * C + offs_c[:, None]).to(tl.int64) * W + offs_w[None, :]
    if LOAD_STATS:
        shift = tl.load(mean_f32_ptr + stat, mask=mask_cw, other=0.0).to(ACC)
        mean_s = tl.zeros((BC, BW), dtype=ACC)
        rstd = tl.load(rstd_f32_ptr + stat, mask=mask_cw, other=0.0).to(ACC)
    else:
        # Statistics relative to a shift, the frame's first feature: x - shift is exact for x near it
        # (Sterbenz), so a large common offset (magnitude spectrograms) never enters the sums and costs no
        # digits; the centred sum of squares never subtracts E[x]^2 from E[x^2].
        shift = tl.load(x_col, mask=mask_cw, other=0.0).to(ACC)
        if RESIDENT:
            # the two-pass algorithm on the block held in registers: mean, then the sum of squared deviations
            offs_f = tl.arange(0, BF)
            m = (offs_f[:, None, None] < F) & mask_cw[None, :, :]
            xs = tl.load(x_col[None, :, :] + offs_f[:, None, None] * s_xf, mask=m, other=0.0).to(ACC)
            xs = tl.where(m, xs - shift[None, :, :], 0.0)
            mean_s = tl.sum(xs, axis=0) / F
            d = tl.where(m, xs - mean_s[None, :, :], 0.0)
            m2 = tl.sum(d * d, axis=0)
        else:
            # one streamed pass: per chunk, the mean and centred sum of squares of its BF features (two-pass
            # in registers), merged into the running ones with Chan et al.'s parallel update
            mean_s = tl.zeros((BC, BW), dtype=ACC)
            m2 = tl.zeros((BC, BW), dtype=ACC)
            for f0 in tl.range(0, F, BF, num_stages=STAGES):
                offs_f = f0 + tl.arange(0, BF)
                m = (offs_f[:, None, None] < F) & mask_cw[None, :, :]
                xs = tl.load(x_col[None, :, :] + offs_f[:, None, None] * s_xf, mask=m, other=0.0).to(ACC)
                xs = tl.where(m, xs - shift[None, :, :], 0.0)
                n_a = f0  # features merged so far; counts are ints, promoted to ACC by the ACC factor before them
                n_b = tl.minimum(F - f0, BF)
                mean_b = tl.sum(xs, axis=0) / n_b
                d = tl.where(m, xs - mean_b[None, :, :], 0.0)
                delta = mean_b - mean_s
                mean_s += delta * n_b / (n_a + n_b)
                m2 += tl.sum(d * d, axis=0) + delta * delta * n_a * n_b / (n_a + n_b)
        rstd = 1.0 / tl.sqrt(m2 / F + eps)
        tl.store(mean_f32_ptr + stat, shift + mean_s, mask=mask_cw)
        tl.store(rstd_f32_ptr + stat, rstd, mask=mask_cw)
    if STORE_Y:
        y_col = y_ptr + b.to(tl.int64) * s_yb + offs_c[:, None].to(tl.int64) * s_yc + offs_w[None, :] * s_yw
        if RESIDENT and not LOAD_STATS:
            g = tl.load(w_ptr + offs_c[None, :, None] * s_wc + offs_f[:, None, None] * s_wf,
                        mask=(offs_f[:, None, None] < F) & (offs_c[None, :, None] < C), other=0.0).to(ACC)
            bt = tl.load(b_ptr + offs_c[None, :, None] * s_bc + offs_f[:, None, None] * s_bf,
                         mask=(offs_f[:, None, None] < F) & (offs_c[None, :, None] < C), other=0.0).to(ACC)
            y = d * rstd[None, :, :] * g + bt
            tl.store(y_col[None, :, :] + offs_f[:, None, None] * s_yf, y.to(y_ptr.dtype.element_ty), mask=m)
        else:
            n_chunks = tl.cdiv(F, BF)
            for i in tl.range(0, n_chunks, num_stages=STAGES):
                offs_f = (n_chunks - 1 - i) * BF + tl.arange(0, BF)
                mask_fc = (offs_f[:, None, None] < F) & (offs_c[None, :, None] < C)
                m = (offs_f[:, None, None] < F) & mask_cw[None, :, :]
                x = tl.load(x_col[None, :, :] + offs_f[:, None, None] * s_xf, mask=m, other=0.0).to(ACC)
                g = tl.load(w_ptr + offs_c[None, :, None] * s_wc + offs_f[:, None, None] * s_wf, mask=mask_fc,
                            other=0.0).to(ACC)
                bt = tl.load(b_ptr + offs_c[None, :, None] * s_bc + offs_f[:, None, None] * s_bf, mask=mask_fc,
                             other=0.0).to(ACC)
                y = ((x - shift[None, :, :]) - mean_s[None, :, :]) * rstd[None, :, :] * g + bt
                tl.store(y_col[None, :, :] + offs_f[:, None, None] * s_yf, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _frame_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_f32_ptr, rstd_f32_ptr, dx_ptr, part_f32_ptr,
                           C, F, W, W_BLOCKS, s_gb, s_gc, s_gf, s_gw, s_xb, s_xc, s_xf, s_xw, s_wc, s_wf,
                           s_db, s_dc, s_df, s_dw,
                           RESIDENT: tl.constexpr, BF: tl.constexpr, BC: tl.constexpr, BW: tl.constexpr,
                           STAGES: tl.constexpr = 2):
    """grid (W-groups, C-blocks, B): a program takes W_BLOCKS consecutive BW-frame blocks (RESIDENT) or one.
    dx = rstd * (g - mean_F(g) - xhat * mean_F(g * xhat)), g = dy * weight. RESIDENT: dy and x loaded once
    per block and kept on chip; otherwise streamed twice in BF chunks. The program's partial d weight =
    sum dy * xhat and d bias = sum dy over its frames go to row (b * W-groups + pid, 0 / 1, c, :) of the fp32
    buffer (B * W-groups, 2, C, F), summed afterwards (deterministic, no atomics)."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    pid_w = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    offs_c = pid_c * BC + tl.arange(0, BC)
    mask_c = offs_c < C
    part = (b * tl.num_programs(0) + pid_w).to(tl.int64) * 2 * C * F
    dw_base = part_f32_ptr + part + offs_c[None, :] * F
    db_base = dw_base + C * F
    g_b = dy_ptr + b.to(tl.int64) * s_gb + offs_c[:, None].to(tl.int64) * s_gc
    x_b = x_ptr + b.to(tl.int64) * s_xb + offs_c[:, None].to(tl.int64) * s_xc
    d_b = dx_ptr + b.to(tl.int64) * s_db + offs_c[:, None].to(tl.int64) * s_dc
    if RESIDENT:
        offs_f = tl.arange(0, BF)
        mask_fc = (offs_f[:, None] < F) & mask_c[None, :]
        gamma = tl.load(w_ptr + offs_c[None, :] * s_wc + offs_f[:, None] * s_wf, mask=mask_fc, other=0.0).to(ACC)
        dw_acc = tl.zeros((BF, BC), dtype=ACC)
        db_acc = tl.zeros((BF, BC), dtype=ACC)
        for j in range(W_BLOCKS):
            offs_w = (pid_w * W_BLOCKS + j) * BW + tl.arange(0, BW)
            mask_cw = mask_c[:, None] & (offs_w[None, :] < W)
            stat = (b * C + offs_c[:, None]).to(tl.int64) * W + offs_w[None, :]
            mean = tl.load(mean_f32_ptr + stat, mask=mask_cw, other=0.0).to(ACC)
            rstd = tl.load(rstd_f32_ptr + stat, mask=mask_cw, other=0.0).to(ACC)
            m = (offs_f[:, None, None] < F) & mask_cw[None, :, :]
            dy = tl.load(g_b[None, :, :] + offs_f[:, None, None] * s_gf + offs_w[None, None, :] * s_gw, mask=m,
                         other=0.0).to(ACC)
            x = tl.load(x_b[None, :, :] + offs_f[:, None, None] * s_xf + offs_w[None, None, :] * s_xw, mask=m,
                        other=0.0).to(ACC)
            xhat = tl.where(m, (x - mean[None, :, :]) * rstd[None, :, :], 0.0)
            g = dy * gamma[:, :, None]
            mean_g = tl.sum(g, axis=0) / F
            mean_gx = tl.sum(g * xhat, axis=0) / F
            dx = rstd[None, :, :] * (g - mean_g[None, :, :] - xhat * mean_gx[None, :, :])
            tl.store(d_b[None, :, :] + offs_f[:, None, None] * s_df + offs_w[None, None, :] * s_dw,
                     dx.to(dx_ptr.dtype.element_ty), mask=m)
            dw_acc += tl.sum(dy * xhat, axis=2)
            db_acc += tl.sum(dy, axis=2)
        tl.store(dw_base + offs_f[:, None], dw_acc, mask=mask_fc)
        tl.store(db_base + offs_f[:, None], db_acc, mask=mask_fc)
    else:
        offs_w = pid_w * BW + tl.arange(0, BW)
        mask_cw = mask_c[:, None] & (offs_w[None, :] < W)
        stat = (b * C + offs_c[:, None]).to(tl.int64) * W + offs_w[None, :]
        mean = tl.load(mean_f32_ptr + stat, mask=mask_cw, other=0.0).to(ACC)
        rstd = tl.load(rstd_f32_ptr + stat, mask=mask_cw, other=0.0).to(ACC)
        g_col = g_b + offs_w[None, :] * s_gw
        x_col = x_b + offs_w[None, :] * s_xw
        sum_g = tl.zeros((BC, BW), dtype=ACC)
        sum_gx = tl.zeros((BC, BW), dtype=ACC)
        n_chunks = tl.cdiv(F, BF)
        for i in tl.range(0, n_chunks, num_stages=STAGES):
            offs_f = i * BF + tl.arange(0, BF)
            mask_fc = (offs_f[:, None] < F) & mask_c[None, :]
            m = (offs_f[:, None, None] < F) & mask_cw[None, :, :]
            dy = tl.load(g_col[None, :, :] + offs_f[:, None, None] * s_gf, mask=m, other=0.0).to(ACC)
            x = tl.load(x_col[None, :, :] + offs_f[:, None, None] * s_xf, mask=m, other=0.0).to(ACC)
            xhat = tl.where(m, (x - mean[None, :, :]) * rstd[None, :, :], 0.0)
            gamma = tl.load(w_ptr + offs_c[None, :] * s_wc + offs_f[:, None] * s_wf, mask=mask_fc,
                            other=0.0).to(ACC)
            g = dy * gamma[:, :, None]
            sum_g += tl.sum(g, axis=0)
            sum_gx += tl.sum(g * xhat, axis=0)
            tl.store(dw_base + offs_f[:, None], tl.sum(dy * xhat, axis=2), mask=mask_fc)
            tl.store(db_base + offs_f[:, None], tl.sum(dy, axis=2), mask=mask_fc)
        mean_g = sum_g / F
        mean_gx = sum_gx / F
        d_col = d_b + offs_w[None, :] * s_dw
        for i in tl.range(0, n_chunks, num_stages=STAGES):  # backwards: the last chunks of pass 1 are still in L2
            offs_f = (n_chunks - 1 - i) * BF + tl.arange(0, BF)
            mask_fc = (offs_f[:, None] < F) & mask_c[None, :]
            m = (offs_f[:, None, None] < F) & mask_cw[None, :, :]
            dy = tl.load(g_col[None, :, :] + offs_f[:, None, None] * s_gf, mask=m, other=0.0).to(ACC)
            x = tl.load(x_col[None, :, :] + offs_f[:, None, None] * s_xf, mask=m, other=0.0).to(ACC)
            xhat = (x - mean[None, :, :]) * rstd[None, :, :]
            gamma = tl.load(w_ptr + offs_c[None, :] * s_wc + offs_f[:, None] * s_wf, mask=mask_fc,
                            other=0.0).to(ACC)
            dx = rstd[None, :, :] * (dy * gamma[:, :, None] - mean_g[None, :, :] - xhat * mean_gx[None, :, :])
            tl.store(d_col[None, :, :] + offs_f[:, None, None] * s_df, dx.to(dx_ptr.dtype.element_ty), mask=m)


@triton.jit
def _partial_sum_kernel(part_f32_ptr, dw_ptr, db_ptr, ROWS, N, BR: tl.constexpr, BN: tl.constexpr):
    """dweight, dbias (N = C * F, contiguous, their dtype) = the sums over ROWS of the backward's partials
    (ROWS, 2, N) fp32, BR rows at a time, the blocks in row order (deterministic)."""
    ACC: tl.constexpr = tl.float64 if part_f32_ptr.dtype.element_ty == tl.float64 else tl.float32
    offs = tl.program_id(0) * BN + tl.arange(0, BN)
    rows = tl.arange(0, BR)
    dw = tl.zeros((BN,), dtype=ACC)
    db = tl.zeros((BN,), dtype=ACC)
    for r0 in range(0, ROWS, BR):
        m = ((r0 + rows)[:, None] < ROWS) & (offs[None, :] < N)
        block = part_f32_ptr + (r0 + rows)[:, None].to(tl.int64) * 2 * N + offs[None, :]
        dw += tl.sum(tl.load(block, mask=m, other=0.0), axis=0)
        db += tl.sum(tl.load(block + N, mask=m, other=0.0), axis=0)
    tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=offs < N)
    tl.store(db_ptr + offs, db.to(db_ptr.dtype.element_ty), mask=offs < N)


# ----------------------------------------------------------------------------------------------
# launch code: tiles per feature count and layout

RESIDENT_FWD = 16384  # x elements a forward program holds on chip (64 fp32 values a thread at 8 warps)
RESIDENT_BWD = 8192  # dy and x elements each a backward program holds on chip
CHANNEL_BLOCK = 16  # channels per tile when a channels-last tensor is read or written (32 B of bf16)
# backward: W-blocks are grouped per program (fewer partial rows to write and sum) while the grid keeps one
# program per SM of an H100 (132; one resident 8-warp program per SM keeps ~32 KB of loads in flight)
TARGET_PROGRAMS = 132
SUM_ROWS, SUM_BLOCK = 16, 128  # partial sums: rows x (C * F) columns per step


@dataclasses.dataclass(frozen=True)
class Tiles:
    BF: int  # features per chunk (all of them, padded to a power of two, when resident)
    BC: int  # channels per tile
    BW: int  # frames per tile
    resident: bool
    num_warps: int
    maxnreg: Optional[int] = None  # registers a thread may use (ptxas spills beyond), None: as ptxas likes

    def constexprs(self) -> dict:
        return dict(RESIDENT=self.resident, BF=self.BF, BC=self.BC, BW=self.BW)

    def options(self) -> dict:
        return dict(num_warps=self.num_warps, **({"maxnreg": self.maxnreg} if self.maxnreg else {}))


def _warps(elements: int, lo: int = 4, hi: int = 8) -> int:
    """About 64 on-chip values a thread."""
    return max(lo, min(hi, elements // 2048))


def _channel_tile(C: int) -> Tuple[int, int]:
    """(BC, BW) of a channels-last tile: up to CHANNEL_BLOCK channels of 16 frames (a 32-64 B row of x along
    frames, BC x 16 contiguous elements of the channels-last tensor)."""
    return min(CHANNEL_BLOCK, triton.next_power_of_2(C)), 16


def _channels_last_tiles(Fp: int, C: int, resident: int, chunk: int, warp_scale: int) -> Tiles:
    """Tiles of (BC channels x BW frames) for a channels-last y (forward) or dy (backward): the tile changes layout
    through shared memory, so it is resident up to half the plain ``resident`` size, else streamed in chunks of
    ``chunk`` elements; warps sized from ``warp_scale`` x the resident tile's elements."""
    BC, BW = _channel_tile(C)
    if Fp * BC * BW <= resident // 2:
        return Tiles(Fp, BC, BW, True, _warps(warp_scale * Fp * BC * BW))
    return Tiles(min(Fp, chunk // (BC * BW)), BC, BW, False, 16)


def fwd_tiles(F: int, C: int = 1, channels_last: bool = False, load_stats: bool = False,
              itemsize: int = 2) -> Tiles:
    """Forward tiles for F features and C channels of ``itemsize``-byte x; ``channels_last``: y is a
    channels-last tensor; ``load_stats``: the statistics are given, x is streamed once in chunks of 2K
    elements over the same columns."""
    if load_stats:
        t = fwd_tiles(F, C, channels_last, itemsize=itemsize)
        return Tiles(min(t.BF, max(1, 2048 // (t.BC * t.BW))), t.BC, t.BW, False, 4)
    Fp = triton.next_power_of_2(F)
    if channels_last:  # y changes layout on its way out
        return _channels_last_tiles(Fp, C, RESIDENT_FWD, chunk=8192, warp_scale=2)
    if Fp * 16 <= RESIDENT_FWD:
        BW = max(16, min(64, RESIDENT_FWD // Fp))
        warps = _warps(Fp * BW)
        # 16-bit x at 8 warps: ptxas takes 110-130 registers, 128 fits two programs on an SM without spilling
        # (fp32 x spills under that cap on sm_80)
        return Tiles(Fp, 1, BW, True, warps, 128 if warps == 8 and itemsize == 2 else None)
    return Tiles(32, 1, 64, False, 4)


def bwd_tiles(F: int, C: int = 1, channels_last: bool = False) -> Tiles:
    """Backward tiles for F features and C channels; ``channels_last``: dy is a channels-last tensor."""
    Fp = triton.next_power_of_2(F)
    if channels_last:  # dy changes layout on its way in
        return _channels_last_tiles(Fp, C, RESIDENT_BWD, chunk=4096, warp_scale=4)
    if Fp * 8 <= RESIDENT_BWD:
        BW = max(8, min(64, RESIDENT_BWD // Fp))
        return Tiles(Fp, 1, BW, True, _warps(2 * Fp * BW, hi=16))
    return Tiles(32, 1, 64, False, 4)


def _is_channels_last(t: Tensor) -> bool:
    """Channels are t's contiguous axis (and there is more than one)."""
    return t.shape[1] > 1 and t.stride(1) == 1 and t.stride(3) != 1


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


def _empty_y(x: Tensor, out_dtype: Optional[torch.dtype], channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(x.shape, device=x.device, dtype=out_dtype or x.dtype, memory_format=fmt)


def forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, store_y: bool = True,
            saved_stats: Optional[Tuple[Tensor, Tensor]] = None, out_dtype: Optional[torch.dtype] = None,
            channels_last: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """(y or an empty tensor, mean (B, C, W) fp32, rstd (B, C, W) fp32). y is contiguous in x's dtype, or in
    ``out_dtype`` and channels-last (memory order B, F, W, C) with ``channels_last``. ``saved_stats`` =
    (mean, rstd) from an earlier pass skips the statistics."""
    B, C, F, W = x.shape
    w, b = _affine(x, weight, bias)
    y = _empty_y(x, out_dtype, channels_last) if store_y else x
    if saved_stats is not None:
        mean, rstd = (t.contiguous() for t in saved_stats)
    else:
        mean = torch.empty((B, C, W), device=x.device, dtype=common.stats_dtype(x.dtype))
        rstd = torch.empty_like(mean)
    t = fwd_tiles(F, C, store_y and channels_last and C > 1, saved_stats is not None, x.element_size())
    grid = (triton.cdiv(W, t.BW), triton.cdiv(C, t.BC), B)
    _frame_norm_fwd_kernel[grid](
        x, w, b, y, mean, rstd, C, F, W, eps, *x.stride(), *w.stride(), *b.stride(), *y.stride(), STORE_Y=store_y,
        LOAD_STATS=saved_stats is not None, **t.constexprs(), **t.options())
    return (y if store_y else x.new_empty(0)), mean, rstd


def stats(x: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """mean, rstd (B, C, W) fp32 only: the feed-forward applies the norm inside its first matmul."""
    _, mean, rstd = forward(x, None, None, eps, store_y=False)
    return mean, rstd


def _w_blocks(B: int, c_blocks: int, n_wb: int) -> int:
    """W-blocks per backward program (a power of two): the most that keep TARGET_PROGRAMS programs."""
    k = 1
    while k * 2 <= n_wb and B * c_blocks * triton.cdiv(n_wb, k * 2) >= TARGET_PROGRAMS:
        k *= 2
    return k


def backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor) -> List[Tensor]:
    """[dx (x's dtype, contiguous), dweight (C, F), dbias (C, F) in x's dtype]. dy may be channels-last."""
    B, C, F, W = x.shape
    w, _ = _affine(x, weight, None)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    t = bwd_tiles(F, C, _is_channels_last(dy))
    n_wb, n_cb = triton.cdiv(W, t.BW), triton.cdiv(C, t.BC)
    per = _w_blocks(B, n_cb, n_wb) if t.resident else 1
    groups = triton.cdiv(n_wb, per)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    part = torch.empty((B * groups, 2, C, F), device=x.device, dtype=common.stats_dtype(x.dtype))
    _frame_norm_bwd_kernel[(groups, n_cb, B)](dy, x, w, mean, rstd, dx, part, C, F, W, per, *dy.stride(),
                                              *x.stride(), *w.stride(), *dx.stride(), **t.constexprs(),
                                              **t.options())
    dw, db = x.new_empty((C, F)), x.new_empty((C, F))
    _partial_sum_kernel[(triton.cdiv(C * F, SUM_BLOCK),)](part, dw, db, B * groups, C * F, BR=SUM_ROWS,
                                                          BN=SUM_BLOCK, num_warps=4)
    return [dx, dw, db]


# ----------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("ftkernels::frame_norm", mutates_args=())
def _frame_norm_op(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                   out_dtype: Optional[torch.dtype] = None, channels_last: bool = False
                   ) -> Tuple[Tensor, Tensor, Tensor]:
    return forward(x, weight, bias, eps, out_dtype=out_dtype, channels_last=channels_last)


@_frame_norm_op.register_fake
def _(x, weight, bias, eps, out_dtype=None, channels_last=False):
    B, C, F, W = x.shape
    stat = x.new_empty((B, C, W), dtype=common.stats_dtype(x.dtype))
    return _empty_y(x, out_dtype, channels_last), stat, torch.empty_like(stat)


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
    x, weight, bias, eps, _, _ = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    # mean/rstd are saved-only outputs: autograd passes None for their gradients instead of zero-filled
    # (B, C, W) tensors, and a y nobody used gives None too
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _frame_norm_backward_op(dy, x, weight, mean, rstd)
    return dx, (dw if weight is not None else None), (db if ctx.has_bias else None), None, None, None


_frame_norm_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public API

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(x, weight, bias, eps, out_dtype=None, memory_format=torch.contiguous_format) -> None:
    common.check_tensor(x, "x", 4, "(B, C, F, W)")
    common.check_nonempty(x, "x", "(B, C, F, W)")
    C, F = x.shape[1], x.shape[2]
    common.check_shape(weight, "weight", (C, F), "(C, F)")
    common.check_shape(bias, "bias", (C, F), "(C, F)")
    common.check_same(x, {"weight": weight, "bias": bias})
    common.check_eps(eps)
    if out_dtype is not None and not (out_dtype in OUT_DTYPES or out_dtype == x.dtype):
        raise TypeError(f"out_dtype must be None (x's dtype) or one of {OUT_DTYPES}, got {out_dtype!r}")
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(f"memory_format must be torch.contiguous_format or torch.channels_last, got "
                         f"{memory_format!r}")


def frame_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, eps: float = 1e-5,
               backend: Optional[str] = None, *, out_dtype: Optional[torch.dtype] = None,
               memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """Layer norm over features of each frame. x (B, C, F, W); weight, bias (C, F) -> (B, C, F, W).

    Statistics in fp32 whatever the input dtype. Under autocast the affine parameters follow x's dtype.
    The result is in x's dtype and contiguous, or in ``out_dtype`` and/or ``memory_format`` =
    ``torch.channels_last`` (what a cuDNN convolution under autocast reads): the kernel writes it so
    directly, no cast or layout copy follows.
    """
    if isinstance(x, Tensor) and x.is_floating_point() and common.autocast_dtype(x.device.type) is not None:
        weight = weight.to(x.dtype) if isinstance(weight, Tensor) else weight
        bias = bias.to(x.dtype) if isinstance(bias, Tensor) else bias
    check_inputs(x, weight, bias, eps, out_dtype, memory_format)
    if out_dtype == x.dtype:
        out_dtype = None
    channels_last = memory_format == torch.channels_last
    if not common.use_triton(x, backend, "frame_norm"):
        y = reference.frame_norm(x, weight, bias, eps)
        return y.to(dtype=out_dtype or x.dtype, memory_format=memory_format) if out_dtype or channels_last else y
    common.kernel_dtype_ok(x)
    return _frame_norm_op(x, weight, bias, float(eps), out_dtype, channels_last)[0]


class FrameNorm(common.BackendAttribute, nn.Module):
    """Layer norm over each frame's features with per-channel affine (C, F). (B, C, F, W) -> same.
    ``forward(x, out_dtype=None, memory_format=torch.contiguous_format)`` as :func:`frame_norm`."""

    def __init__(self, channels: int, features: int, eps: float = 1e-5, backend: Optional[str] = None):
        super().__init__()
        channels, features = common.check_positive_int(channels, "channels"), common.check_positive_int(features,
                                                                                                        "features")
        common.check_eps(eps)
        self.eps = eps
        self.backend = backend
        self.weight = nn.Parameter(torch.ones(channels, features))
        self.bias = nn.Parameter(torch.zeros(channels, features))

    def forward(self, x: Tensor, out_dtype: Optional[torch.dtype] = None,
                memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
        return frame_norm(x, self.weight, self.bias, self.eps, backend=self.backend, out_dtype=out_dtype,
                          memory_format=memory_format)

    def extra_repr(self) -> str:
        return f"channels={self.weight.shape[0]}, features={self.weight.shape[1]}, eps={self.eps}"
