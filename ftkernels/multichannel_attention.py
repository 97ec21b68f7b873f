"""Multichannel multi-head attention over frames with fused rotary embedding.

    q (B, C, F, Wq); k, v (B, C, F, Wk)  ->  out (B, C, F, Wq)

For every (batch, channel, head h): softmax(rot(Q) rot(K)^T * scale) V over frames, where head h takes
features [h*d, (h+1)*d), d = F / num_heads, and rot is the interleaved-pairs rotary embedding (pairs
(2i, 2i+1) rotated by pos * 10000^(-2i/d), pos = the frame index; q and k each over their own frames).
Memory attention is the same op with k, v from another tensor (Wk != Wq allowed).

Kernels
-------
All three kernels read q, k, v, dO in the model layout in place through their strides: a head's (W, d)
matrix is the (d, W) feature-major slab of features [h*d, (h+1)*d), so a tile of frames is loaded as
``base + feature * stride_F + frame * stride_W`` (coalesced along frames, no transposes or copies) and
the output / gradients are written straight into (B, C, F, W) tensors. Grid (frame blocks, C * H, B).

Head dims 1..128 are padded to ``BLOCK_D = max(16, next_pow2(d))`` (the tl.dot minimum is 16) with
masked loads (zeros in the pad columns contribute nothing to the dot products, pad columns are not stored).
Blocks (BM query frames x BN key frames), 4 warps, 2 stages: 64 x 64 for BLOCK_D <= 64; for BLOCK_D = 128
64 x 32 (forward, dq) and 32 x 64 (dk/dv), and in fp32 32 x 32 (dq) and 16 x 64 (dk/dv), so the tiles fit
sm_80's shared memory (``_blocks``; the compile gate checks every one). Padded frames are
masked (keys to -inf scores, padded query rows to zero probability in backward).

Rotary is fused into the tile loads: each q/k tile is loaded twice, as-is and with the pair-partner
permutation (column i ^ 1), and rotated as rot[i] = x[i] cos(a) + sign(i) x[i ^ 1] sin(a), sign(even) = -1,
with cos/sin read from (frames, d / 2) tables computed once per shape from float64 angles (cached; a few
KiB that stay in L2). Table loads replace per-tile ``tl.cos``/``tl.sin``: the K tiles are re-rotated for
every query block, and full-range trig on the CUDA cores would compete with the tensor-core dots.
Rotated tiles are cast back to the input dtype before tl.dot (as the reference rotates in that dtype).

``_mca_fwd_kernel``   FlashAttention-2 forward: one program per query block loops over all key blocks
                      with the online softmax in fp32 (scores in base 2: scale * log2(e) folded into the
                      score scaling, ``tl.exp2``), P cast to v's dtype for P @ V; stores out and the
                      base-2 log-sum-exp (B, C, H, Wq) fp32 for backward.
``_mca_bwd_dkdv_kernel``  one program per key block iterates over the query blocks, recomputing P^T from
                      the saved log-sum-exp: dV += P^T dO, dK_rot += dS^T Q_rot, dS = P (dP - delta).
``_mca_bwd_dq_kernel``    one program per query block iterates over the key blocks: dQ_rot += dS K_rot.
Every output element is owned by exactly one program, so backward is deterministic (no atomics).
delta = rowsum(dO * O) is a small torch reduction. The gradient goes back through the rotation with
its transpose (the rotation is orthogonal): the rot-space accumulator is split into its (even, odd)
columns with ``tl.reshape``/``tl.split``, rotated by -angle and re-interleaved with ``tl.join``.

Layouts: q, k, v, dO (and out, in the torch reduction for delta) are read through their strides; the
log-sum-exp is the forward's own contiguous output, made contiguous on the host in backward (a no-op for
it); the rotary tables are cached contiguous tensors. out, dq, dk, dv are new contiguous tensors.

Softmax statistics are fp32 whatever the input dtype (fp64 in the interpreter when the inputs are fp64,
the test oracle); accumulators are fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import functools
import math
import numbers
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from ftkernels import _common as common
from ftkernels import reference
from ftkernels._common import Specialization, spec
from ftkernels.multichannel_linear import MultichannelLinear

LOG2E = 1.4426950408889634
PRECISION = "ieee"
MAX_HEAD_DIM = 128
BLOCK_DS = (16, 32, 64, 128)


def _blocks(block_d: int, kernel: str = "fwd", fp32: bool = False) -> Tuple[int, int, int, int]:
    """(BM, BN, num_warps, num_stages) of a kernel ("fwd", "dkdv", "dq") for a padded head dim.

    BLOCK_D = 128 takes smaller frame blocks so fp32 tiles fit sm_80's shared memory (the dk/dv kernel
    keeps K, V and two accumulators resident and streams (BM x 128) Q and dO tiles). In fp32 with rotary
    the half-precision blocks need 172 KB of sm_80's 163 KB, so fp32 takes 16-row (dk/dv) and 32-row (dq)
    blocks (119 KB and 135 KB).
    """
    if block_d <= 64:
        return 64, 64, 4, 2
    if kernel == "dkdv":
        return (16 if fp32 else 32), 64, 4, 2
    if kernel == "dq" and fp32:
        return 32, 32, 4, 2
    return 64, 32, 4, 2


@triton.jit
def _head_base(b, c, h, D, s_b, s_c, s_f):
    """Element offset of head h's first feature in (batch b, channel c): features [h*D, (h+1)*D)."""
    return b.to(tl.int64) * s_b + c.to(tl.int64) * s_c + (h * D).to(tl.int64) * s_f


@triton.jit
def _rot_tile(x_ptr, base, offs_d, offs_w, s_f, s_w, mask, d, cos_f32_ptr, sin_f32_ptr, ROTARY: tl.constexpr,
              FRAMES_FIRST: tl.constexpr):
    """Load a (frames, BLOCK_D) tile (FRAMES_FIRST) or its transpose (BLOCK_D, frames), rotary applied.

    Element (w, i) sits at base + i * s_f + w * s_w; cos/sin of pair i // 2 at frame w are entry
    w * (d // 2) + i // 2 of the (frames, d // 2) tables. Returns the tile in x's dtype.
    """
    if FRAMES_FIRST:
        dd = offs_d[None, :]
        ww = offs_w[:, None]
    else:
        dd = offs_d[:, None]
        ww = offs_w[None, :]
    x = tl.load(x_ptr + base + dd * s_f + ww * s_w, mask=mask, other=0.0)
    if ROTARY:
        # pair partner i ^ 1 (same mask: d is even); rotation math in fp32 (fp64 for fp64 inputs)
        xp = tl.load(x_ptr + base + (dd ^ 1) * s_f + ww * s_w, mask=mask, other=0.0)
        t = ww * (d // 2) + dd // 2
        cs = tl.load(cos_f32_ptr + t, mask=mask, other=1.0)
        sn = tl.load(sin_f32_ptr + t, mask=mask, other=0.0)
        sign = tl.where((dd % 2) == 0, -1.0, 1.0)
        x = (x * cs + sign * xp * sn).to(x_ptr.dtype.element_ty)
    return x


@triton.jit
def _unrot(acc, offs_w, d, W, cos_f32_ptr, sin_f32_ptr, ROTARY: tl.constexpr, BW: tl.constexpr,
           BLOCK_D: tl.constexpr):
    """Apply the inverse rotation (angle -a) to a (BW, BLOCK_D) gradient w.r.t. the rotated tile."""
    if ROTARY:
        x = tl.reshape(acc, (BW, BLOCK_D // 2, 2))
        x0, x1 = tl.split(x)
        j = tl.arange(0, BLOCK_D // 2)
        t = offs_w[:, None] * (d // 2) + j[None, :]
        m = (offs_w[:, None] < W) & (j[None, :] < d // 2)
        cs = tl.load(cos_f32_ptr + t, mask=m, other=1.0)
        sn = tl.load(sin_f32_ptr + t, mask=m, other=0.0)
        y0 = x0 * cs + x1 * sn
        y1 = x1 * cs - x0 * sn
        acc = tl.reshape(tl.join(y0, y1), (BW, BLOCK_D))
    return acc


@triton.jit
def _mca_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_f32_ptr, cos_f32_ptr, sin_f32_ptr, C, H, D, WQ, WK, qk_scale,
                    s_qb, s_qc, s_qf, s_qw, s_kb, s_kc, s_kf, s_kw, s_vb, s_vc, s_vf, s_vw,
                    s_ob, s_oc, s_of, s_ow,
                    ROTARY: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr,
                    PRECISION: tl.constexpr):
    """grid (cdiv(WQ, BM), C * H, B); lse (B, C, H, WQ) contiguous, base-2 units; qk_scale = scale*log2(e)."""
    pid_m = tl.program_id(0)
    ch = tl.program_id(1)
    b = tl.program_id(2)
    c = ch // H
    h = ch % H
    dt = q_ptr.dtype.element_ty
    zero = tl.zeros([1], dtype=dt)  # promotes fp32 statistics to fp64 for fp64 inputs (interpreter oracle)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < WQ
    mask_d = offs_d < D
    q_base = _head_base(b, c, h, D, s_qb, s_qc, s_qf)
    k_base = _head_base(b, c, h, D, s_kb, s_kc, s_kf)
    v_base = _head_base(b, c, h, D, s_vb, s_vc, s_vf)
    q = _rot_tile(q_ptr, q_base, offs_d, offs_m, s_qf, s_qw, mask_m[:, None] & mask_d[None, :], D, cos_f32_ptr,
                  sin_f32_ptr, ROTARY, True)

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32) + zero
    l_i = tl.zeros([BM], dtype=tl.float32) + zero
    acc = tl.zeros([BM, BLOCK_D], dtype=tl.float32) + zero[:, None]
    for n0 in range(0, WK, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < WK
        kt = _rot_tile(k_ptr, k_base, offs_d, offs_n, s_kf, s_kw, mask_d[:, None] & mask_n[None, :], D, cos_f32_ptr,
                       sin_f32_ptr, ROTARY,
                       False)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + v_base + offs_d[None, :] * s_vf + offs_n[:, None] * s_vw,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(dt), v, input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_base = _head_base(b, c, h, D, s_ob, s_oc, s_of)
    tl.store(o_ptr + o_base + offs_d[None, :] * s_of + offs_m[:, None] * s_ow, out.to(dt),
             mask=mask_m[:, None] & mask_d[None, :])
    stat = (b * C * H + ch).to(tl.int64) * WQ + offs_m
    tl.store(lse_f32_ptr + stat, (m_i + tl.log2(l_i)).to(lse_f32_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _mca_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_f32_ptr, delta_f32_ptr, cos_f32_ptr, sin_f32_ptr,
                         dk_ptr, dv_ptr,
                         C, H, D, WQ, WK, qk_scale, scale,
                         s_qb, s_qc, s_qf, s_qw, s_kb, s_kc, s_kf, s_kw, s_vb, s_vc, s_vf, s_vw,
                         s_gb, s_gc, s_gf, s_gw, s_dkb, s_dkc, s_dkf, s_dkw, s_dvb, s_dvc, s_dvf, s_dvw,
                         ROTARY: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr,
                         PRECISION: tl.constexpr):
    """grid (cdiv(WK, BN), C * H, B): dk, dv of one key block, looping over all query blocks."""
    pid_n = tl.program_id(0)
    ch = tl.program_id(1)
    b = tl.program_id(2)
    c = ch // H
    h = ch % H
    dt = q_ptr.dtype.element_ty
    zero = tl.zeros([1], dtype=dt)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < WK
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    q_base = _head_base(b, c, h, D, s_qb, s_qc, s_qf)
    k_base = _head_base(b, c, h, D, s_kb, s_kc, s_kf)
    v_base = _head_base(b, c, h, D, s_vb, s_vc, s_vf)
    g_base = _head_base(b, c, h, D, s_gb, s_gc, s_gf)
    k = _rot_tile(k_ptr, k_base, offs_d, offs_n, s_kf, s_kw, mask_nd, D, cos_f32_ptr, sin_f32_ptr, ROTARY,
                  True)  # (BN, BLOCK_D)
    v = tl.load(v_ptr + v_base + offs_d[None, :] * s_vf + offs_n[:, None] * s_vw, mask=mask_nd, other=0.0)
    dk = tl.zeros([BN, BLOCK_D], dtype=tl.float32) + zero[:, None]
    dv = tl.zeros([BN, BLOCK_D], dtype=tl.float32) + zero[:, None]
    stat_base = (b * C * H + ch).to(tl.int64) * WQ
    for m0 in range(0, WQ, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < WQ
        mask_dm = mask_d[:, None] & mask_m[None, :]
        qt = _rot_tile(q_ptr, q_base, offs_d, offs_m, s_qf, s_qw, mask_dm, D, cos_f32_ptr, sin_f32_ptr, ROTARY,
                       False)  # (BLOCK_D, BM)
        lse = tl.load(lse_f32_ptr + stat_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_f32_ptr + stat_base + offs_m, mask=mask_m, other=0.0)
        st = tl.dot(k, qt, input_precision=PRECISION) * qk_scale  # (BN, BM)
        pt = tl.exp2(st - lse[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)
        do = tl.load(do_ptr + g_base + offs_d[None, :] * s_gf + offs_m[:, None] * s_gw,
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BM, BLOCK_D)
        dv += tl.dot(pt.to(dt), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, BM)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(dt), tl.trans(qt), input_precision=PRECISION)
    dk = _unrot(dk * scale, offs_n, D, WK, cos_f32_ptr, sin_f32_ptr, ROTARY, BN, BLOCK_D)
    dk_base = _head_base(b, c, h, D, s_dkb, s_dkc, s_dkf)
    dv_base = _head_base(b, c, h, D, s_dvb, s_dvc, s_dvf)
    tl.store(dk_ptr + dk_base + offs_d[None, :] * s_dkf + offs_n[:, None] * s_dkw, dk.to(dt), mask=mask_nd)
    tl.store(dv_ptr + dv_base + offs_d[None, :] * s_dvf + offs_n[:, None] * s_dvw, dv.to(dt), mask=mask_nd)


@triton.jit
def _mca_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_f32_ptr, delta_f32_ptr, cos_f32_ptr, sin_f32_ptr, dq_ptr,
                       C, H, D, WQ, WK, qk_scale, scale,
                       s_qb, s_qc, s_qf, s_qw, s_kb, s_kc, s_kf, s_kw, s_vb, s_vc, s_vf, s_vw,
                       s_gb, s_gc, s_gf, s_gw, s_dqb, s_dqc, s_dqf, s_dqw,
                       ROTARY: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr):
    """grid (cdiv(WQ, BM), C * H, B): dq of one query block, looping over all key blocks."""
    pid_m = tl.program_id(0)
    ch = tl.program_id(1)
    b = tl.program_id(2)
    c = ch // H
    h = ch % H
    dt = q_ptr.dtype.element_ty
    zero = tl.zeros([1], dtype=dt)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < WQ
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    q_base = _head_base(b, c, h, D, s_qb, s_qc, s_qf)
    k_base = _head_base(b, c, h, D, s_kb, s_kc, s_kf)
    v_base = _head_base(b, c, h, D, s_vb, s_vc, s_vf)
    g_base = _head_base(b, c, h, D, s_gb, s_gc, s_gf)
    q = _rot_tile(q_ptr, q_base, offs_d, offs_m, s_qf, s_qw, mask_md, D, cos_f32_ptr, sin_f32_ptr, ROTARY,
                  True)  # (BM, BLOCK_D)
    do = tl.load(do_ptr + g_base + offs_d[None, :] * s_gf + offs_m[:, None] * s_gw, mask=mask_md, other=0.0)
    stat = (b * C * H + ch).to(tl.int64) * WQ + offs_m
    lse = tl.load(lse_f32_ptr + stat, mask=mask_m, other=0.0)
    delta = tl.load(delta_f32_ptr + stat, mask=mask_m, other=0.0)
    dq = tl.zeros([BM, BLOCK_D], dtype=tl.float32) + zero[:, None]
    for n0 in range(0, WK, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < WK
        mask_dn = mask_d[:, None] & mask_n[None, :]
        kt = _rot_tile(k_ptr, k_base, offs_d, offs_n, s_kf, s_kw, mask_dn, D, cos_f32_ptr, sin_f32_ptr, ROTARY,
                       False)  # (BLOCK_D, BN)
        vt = tl.load(v_ptr + v_base + offs_d[:, None] * s_vf + offs_n[None, :] * s_vw, mask=mask_dn, other=0.0)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(dt), tl.trans(kt), input_precision=PRECISION)
    dq = _unrot(dq * scale, offs_m, D, WQ, cos_f32_ptr, sin_f32_ptr, ROTARY, BM, BLOCK_D)
    dq_base = _head_base(b, c, h, D, s_dqb, s_dqc, s_dqf)
    tl.store(dq_ptr + dq_base + offs_d[None, :] * s_dqf + offs_m[:, None] * s_dqw, dq.to(dt), mask=mask_md)


# ----------------------------------------------------------------------------------------------
# launch code


def _block_d(d: int) -> int:
    return max(16, common.next_pow2(d))


@functools.lru_cache(maxsize=64)
def _rotary_tables(frames: int, d: int, device: torch.device, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """cos, sin (frames, d // 2) of the rotary angles, from float64 angles; fp32 (fp64 for the fp64 oracle)."""
    ang = reference.rotary_angles(frames, d, device)
    return ang.cos().to(common.stats_dtype(dtype)).contiguous(), ang.sin().to(common.stats_dtype(dtype)).contiguous()


def _tables(q: Tensor, k: Tensor, d: int, rotary: bool) -> Tuple[Tensor, Tensor]:
    if not rotary:
        dummy = torch.empty(1, device=q.device, dtype=common.stats_dtype(q.dtype))
        return dummy, dummy
    return _rotary_tables(max(q.shape[3], k.shape[3]), d, q.device, q.dtype)


def forward(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float, rotary: bool) -> Tuple[Tensor, Tensor]:
    """(out (B, C, F, Wq), lse (B, C, H, Wq) base-2 log-sum-exp, fp32)."""
    B, C, F, WQ = q.shape
    WK = k.shape[3]
    D = F // num_heads
    BD = _block_d(D)
    BM, BN, warps, stages = _blocks(BD)
    out = torch.empty((B, C, F, WQ), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, C, num_heads, WQ), device=q.device, dtype=common.stats_dtype(q.dtype))
    _mca_fwd_kernel[(triton.cdiv(WQ, BM), C * num_heads, B)](
        q, k, v, out, lse, *_tables(q, k, D, rotary), C, num_heads, D, WQ, WK, float(scale) * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        ROTARY=bool(rotary), BM=BM, BN=BN, BLOCK_D=BD, PRECISION=PRECISION, num_warps=warps, num_stages=stages)
    return out, lse


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, num_heads: int, scale: float,
             rotary: bool) -> Tuple[Tensor, Tensor, Tensor]:
    B, C, F, WQ = q.shape
    WK = k.shape[3]
    D = F // num_heads
    BD = _block_d(D)
    sd = common.stats_dtype(q.dtype)
    lse = lse.contiguous()  # the forward's own (B, C, H, WQ) output: a no-op for it
    delta = (do.to(sd) * out.to(sd)).reshape(B, C, num_heads, D, WQ).sum(3).contiguous()
    dq = torch.empty((B, C, F, WQ), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, C, F, WK), device=q.device, dtype=q.dtype)
    dv = torch.empty_like(dk)
    tables = _tables(q, k, D, rotary)
    common_args = (C, num_heads, D, WQ, WK, float(scale) * LOG2E, float(scale),
                   *q.stride(), *k.stride(), *v.stride(), *do.stride())
    BM, BN, warps, stages = _blocks(BD, "dkdv", q.dtype in (torch.float32, torch.float64))
    _mca_bwd_dkdv_kernel[(triton.cdiv(WK, BN), C * num_heads, B)](
        q, k, v, do, lse, delta, *tables, dk, dv, *common_args, *dk.stride(), *dv.stride(), ROTARY=bool(rotary), BM=BM,
        BN=BN, BLOCK_D=BD, PRECISION=PRECISION, num_warps=warps, num_stages=stages)
    BM, BN, warps, stages = _blocks(BD, "dq", q.dtype in (torch.float32, torch.float64))
    _mca_bwd_dq_kernel[(triton.cdiv(WQ, BM), C * num_heads, B)](
        q, k, v, do, lse, delta, *tables, dq, *common_args, *dq.stride(), ROTARY=bool(rotary), BM=BM, BN=BN, BLOCK_D=BD,
        PRECISION=PRECISION, num_warps=warps, num_stages=stages)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("ftkernels::multichannel_attention", mutates_args=())
def _mca_op(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float, rotary: bool) -> Tuple[Tensor, Tensor]:
    return forward(q, k, v, num_heads, scale, rotary)


@_mca_op.register_fake
def _(q, k, v, num_heads, scale, rotary):
    B, C, F, WQ = q.shape
    return q.new_empty((B, C, F, WQ)), q.new_empty((B, C, num_heads, WQ), dtype=common.stats_dtype(q.dtype))


@torch.library.custom_op("ftkernels::multichannel_attention_backward", mutates_args=())
def _mca_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                     scale: float, rotary: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return backward(do, q, k, v, out, lse, num_heads, scale, rotary)


@_mca_backward_op.register_fake
def _(do, q, k, v, out, lse, num_heads, scale, rotary):
    B, C, F, WQ = q.shape
    WK = k.shape[3]
    return q.new_empty((B, C, F, WQ)), q.new_empty((B, C, F, WK)), q.new_empty((B, C, F, WK))


def _setup_context(ctx, inputs, output):
    q, k, v, num_heads, scale, rotary = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.num_heads, ctx.scale, ctx.rotary = num_heads, scale, rotary
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None
    dq, dk, dv = _mca_backward_op(dout, q, k, v, out, lse, ctx.num_heads, ctx.scale, ctx.rotary)
    return dq, dk, dv, None, None, None


_mca_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public API


def check_inputs(q, k, v, num_heads, scale, rotary) -> None:
    common.check_tensor(q, "q", 4, "(B, C, F, Wq)")
    common.check_tensor(k, "k", 4, "(B, C, F, Wk)")
    common.check_tensor(v, "v", 4, "(B, C, F, Wk)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        common.check_nonempty(t, name, "(B, C, F, W)")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; q, k and v must share a device")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; q, k and v must share a dtype")
        if tuple(t.shape[:3]) != tuple(q.shape[:3]):
            raise ValueError(f"{name} must have shape (B, C, F, Wk) with (B, C, F) = {tuple(q.shape[:3])} as q, "
                             f"got {tuple(t.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the same shape as k {tuple(k.shape)}, got {tuple(v.shape)}")
    if isinstance(num_heads, bool) or not isinstance(num_heads, numbers.Integral):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    F = q.shape[2]
    if num_heads < 1 or F % num_heads != 0:
        raise ValueError(f"num_heads must be a positive divisor of the feature count F={F}, got {num_heads}")
    d = F // num_heads
    if rotary and d % 2 != 0:
        raise ValueError(f"rotary needs an even head dim, got F / num_heads = {F} / {num_heads} = {d}; "
                         "change num_heads or pass rotary=False")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale!r}")


def multichannel_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: Optional[float] = None,
                           rotary: bool = True, backend: Optional[str] = None) -> Tensor:
    """Per (batch, channel, head) softmax attention over frames, rotary on q and k.

    q (B, C, F, Wq); k, v (B, C, F, Wk) -> (B, C, F, Wq). Head h uses features [h*d, (h+1)*d), d = F / num_heads;
    scale defaults to 1/sqrt(d). Softmax in fp32 whatever the input dtype.
    """
    if all(isinstance(t, Tensor) for t in (q, k, v)):
        q, k, v = common.autocast_inputs(q, k, v)
    check_inputs(q, k, v, num_heads, scale, rotary)
    num_heads = int(num_heads)
    d = q.shape[2] // num_heads
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not common.use_triton(q, backend, "multichannel_attention"):
        return reference.multichannel_attention(q, k, v, num_heads, scale, bool(rotary))
    common.kernel_dtype_ok(q, "q")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got F / num_heads = {d}; "
                         "use more heads or backend='reference'")
    return _mca_op(q, k, v, num_heads, scale, bool(rotary))[0]


class MultichannelMultiheadAttention(common.BackendAttribute, nn.Module):
    """Multichannel multi-head attention (the frame transformer's): q/k/v/out projections are
    ``MultichannelLinear(channels, channels, features, features, depthwise=True)`` (position-wise and
    depth-wise), attention over frames with rotary embedding. (B, C, F, W) [, mem (B, C, F, Wm)] -> (B, C, F, W).

    ``scale`` defaults to 1/sqrt(features) as in the seed model (not 1/sqrt(head_dim)).
    """

    def __init__(self, channels: int, num_heads: int, features: int, rotary: bool = True,
                 scale: Optional[float] = None, bias: bool = False, backend: Optional[str] = None):
        super().__init__()
        channels, features = common.check_positive_int(channels, "channels"), common.check_positive_int(features,
                                                                                                        "features")
        num_heads = common.check_positive_int(num_heads, "num_heads")
        if features % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} must divide features={features}")
        if rotary and (features // num_heads) % 2 != 0:
            raise ValueError(f"rotary needs an even head dim, got features / num_heads = {features} / {num_heads} = "
                             f"{features // num_heads}; change num_heads or pass rotary=False")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                                  or not math.isfinite(scale)):
            raise ValueError(f"scale must be finite float or None, got {scale!r}")
        self.channels, self.num_heads, self.features = channels, num_heads, features
        self.rotary = rotary
        self.scale = 1.0 / math.sqrt(features) if scale is None else float(scale)
        self.backend = backend

        def proj():
            return MultichannelLinear(channels, channels, features, features, depthwise=True, bias=bias,
                                      backend=backend)

        self.q_proj, self.k_proj, self.v_proj, self.out_proj = proj(), proj(), proj(), proj()

    def forward(self, x: Tensor, mem: Optional[Tensor] = None) -> Tensor:
        src = x if mem is None else mem
        a = multichannel_attention(self.q_proj(x), self.k_proj(src), self.v_proj(src), self.num_heads, self.scale,
                                   self.rotary, backend=self.backend)
        return self.out_proj(a)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_heads={self.num_heads}, features={self.features}, "
                f"rotary={self.rotary}, scale={self.scale:.4g}")


# ----------------------------------------------------------------------------------------------
# compile gate: every specialization the launch code above can pick


def compile_specializations() -> List[Specialization]:
    out = []
    floats_fwd = ("qk_scale",)
    floats_bwd = ("qk_scale", "scale")
    for dt in ("fp32", "fp16", "bf16"):
        for bd in BLOCK_DS:
            for rot in (False, True):
                for kernel, name, floats in (("fwd", "_mca_fwd_kernel", floats_fwd),
                                             ("dkdv", "_mca_bwd_dkdv_kernel", floats_bwd),
                                             ("dq", "_mca_bwd_dq_kernel", floats_bwd)):
                    BM, BN, warps, stages = _blocks(bd, kernel, dt == "fp32")
                    cx = dict(ROTARY=rot, BM=BM, BN=BN, BLOCK_D=bd, PRECISION=PRECISION)
                    out.append(spec(__name__, name, dt, cx, floats=floats, num_warps=warps, num_stages=stages))
    return out
