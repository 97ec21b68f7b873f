"""Multichannel multi-head attention over frames with fused rotary embedding.

    q (B, C, F, Wq); k, v (B, C, F, Wk)  ->  out (B, C, F, Wq)

For every (batch, channel, head h): softmax(rot(Q) rot(K)^T * scale) V over frames, where head h takes
features [h*d, (h+1)*d), d = F / num_heads, and rot is the interleaved-pairs rotary embedding (pairs
(2i, 2i+1) rotated by pos * 10000^(-2i/d), or by pos * rotary_freqs[i] from a stored table such as the
v4 checkpoint's; pos = the frame index, q and k each over their own frames).
Memory attention is the same op with k, v from another tensor (Wk != Wq allowed).

Kernels
-------
All three kernels read q, k, v, dO in the model layout in place through their strides: a head's (W, d)
matrix is the (d, W) feature-major slab of features [h*d, (h+1)*d), so a tile of frames is loaded as
``base + feature * stride_F + frame * stride_W`` (coalesced along frames, no transposes or copies) and
the output / gradients are written straight into (B, C, F, W) tensors. Grid (frame blocks, C * H, B).

Rotary on de-interleaved parts: a q/k tile is loaded once, as its even and its odd features (two
(frames, BLOCK_H) parts, BLOCK_H = max(16, next_pow2(ceil(d / 2)))), rotated elementwise in fp32
((x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)) and cast back to the input dtype (as the reference
rotates), and the scores are two split-K dots, Q0 K0^T + Q1 K1^T. Gradients w.r.t. the rotated q/k
are accumulated as even/odd parts and rotated back with the transpose when stored. cos/sin come from
(frames, pairs) fp32 tables: the default angles from float64 (cached per shape), a stored table's angles
rounded in its dtype as upstream's rotary computes them (cached per frequency tensor while it lives
unmodified); pairs beyond the table (an odd head dim's last feature) are not rotated. Table loads
replace per-tile trig, which would compete with the tensor-core dots. v and dO tiles are padded to
BLOCK_D = max(16, next_pow2(d)) with masked loads; padded key frames score -inf, padded query rows get
zero probability in backward.

``_mca_fwd_kernel``   FlashAttention-2 forward: one program per query block loops over all key blocks
                      with the online softmax in fp32 (scores in base 2: scale * log2(e) folded into the
                      score scaling, ``tl.exp2``), P cast to v's dtype for P @ V; stores out and the
                      base-2 log-sum-exp (B, C, H, Wq) fp32 for backward.
``_mca_bwd_dq_kernel``    runs first. One program per query block: delta = rowsum(dO * O) (stored for the
                      dk/dv kernel), then over the key blocks dQ_rot += dS K_rot, dS = P (dP - delta). At
                      BLOCK_D = 128 with rotary it also stores its rotated q block (``PRE_ROTATED_Q_BLOCK_DS``):
                      rotating the q tiles inside the dk/dv loop spills there.
``_mca_bwd_dkdv_kernel``  one program per key block iterates over the query blocks, recomputing P^T from
                      the saved log-sum-exp: dV += P^T dO, dK_rot += dS^T Q_rot.
Every output element is owned by exactly one program, so backward is deterministic (no atomics).

Tiles: ``@triton.autotune`` over a short config list (query block BM, key block BN, warps, stages) per
kernel, head-dim class (BLOCK_D 128 / 64 / <= 32) and dtype group (fp16/bf16: query blocks of 64-128 rows
for wgmma; fp32: tiles that fit sm_80's shared memory), keyed on (D, WQ, WK, PRECISION); the compile
gate builds every config of every recorded launch. Under the interpreter one deterministic config with
unequal small blocks (``INTERPRETER_CONFIGS``); the tests force every GPU config through it too.
fp32 dots follow torch's TF32 setting (``PRECISION`` = ``_common.dot_precision``, chosen at launch).

Layouts: q, k, v, dO, out are read through their strides; the log-sum-exp is the forward's own contiguous
output (made contiguous on the host in backward: a no-op for it); the rotary tables and delta are
contiguous. out, dq, dk, dv are new contiguous tensors. lse is marked non-differentiable and unused output
gradients arrive as None: backward materialises no zero gradients.

Softmax statistics are fp32 whatever the input dtype (fp64 in the interpreter when the inputs are fp64,
the test oracle); accumulators are fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import functools
import math
import numbers
import weakref
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from ftkernels import _common as common
from ftkernels import reference
from ftkernels.multichannel_linear import MultichannelLinear

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
# Head-dim blocks whose dk/dv kernel reads a rotated copy of q that the dq kernel writes (the dk/dv kernel's
# in-loop rotation of q tiles spills at these).
PRE_ROTATED_Q_BLOCK_DS = (128,)


# ----------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _head_base(b, c, h, D, s_b, s_c, s_f):
    """Element offset of head h's first feature in (batch b, channel c): features [h*D, (h+1)*D)."""
    return b.to(tl.int64) * s_b + c.to(tl.int64) * s_c + (h * D).to(tl.int64) * s_f


@triton.jit
def _qk_parts(x_ptr, base, offs_w, mask_w, s_f, s_w, D, cos_f32_ptr, sin_f32_ptr, NP,
              ROTARY: tl.constexpr, BLOCK_H: tl.constexpr, FRAMES_FIRST: tl.constexpr):
    """The even and the odd features (x[2j], x[2j+1], j < BLOCK_H) of a q/k tile of frames ``offs_w``,
    each (frames, BLOCK_H) (FRAMES_FIRST) or transposed (BLOCK_H, frames), rotated when ROTARY:
    (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin) in fp32 (fp64 for fp64 inputs), cast back to x's dtype.

    Element (w, i) sits at base + i * s_f + w * s_w; cos/sin of pair j at frame w are entry w * NP + j of the
    (frames, NP) tables; pairs j >= NP (an odd head dim's last feature) are not rotated.
    """
    j = tl.arange(0, BLOCK_H)
    if FRAMES_FIRST:
        jj = j[None, :]
        ww = offs_w[:, None]
        mw = mask_w[:, None]
    else:
        jj = j[:, None]
        ww = offs_w[None, :]
        mw = mask_w[None, :]
    p0 = x_ptr + base + (2 * jj) * s_f + ww * s_w
    x0 = tl.load(p0, mask=mw & (2 * jj < D), other=0.0)
    x1 = tl.load(p0 + s_f, mask=mw & (2 * jj + 1 < D), other=0.0)
    if ROTARY:
        t = ww * NP + jj
        mt = mw & (jj < NP)
        cs = tl.load(cos_f32_ptr + t, mask=mt, other=1.0)
        sn = tl.load(sin_f32_ptr + t, mask=mt, other=0.0)
        y0 = x0 * cs - x1 * sn
        y1 = x1 * cs + x0 * sn
        x0 = y0.to(x_ptr.dtype.element_ty)
        x1 = y1.to(x_ptr.dtype.element_ty)
    return x0, x1


@triton.jit
def _store_parts(ptr, base, offs_w, mask_w, s_f, s_w, D, g0, g1, cos_f32_ptr, sin_f32_ptr, NP,
                 ROTARY: tl.constexpr, BLOCK_H: tl.constexpr):
    """Store a gradient held as (frames, BLOCK_H) even/odd parts w.r.t. the rotated features, rotated back
    (the transpose of the rotation: g0 cos + g1 sin, g1 cos - g0 sin) into features 2j and 2j + 1."""
    j = tl.arange(0, BLOCK_H)
    jj = j[None, :]
    ww = offs_w[:, None]
    mw = mask_w[:, None]
    if ROTARY:
        t = ww * NP + jj
        mt = mw & (jj < NP)
        # ".cg": not the same load as the prologue's rotation of this tile, so the compiler does not keep
        # that tile's cos/sin live in registers across the main loop to reuse them here
        cs = tl.load(cos_f32_ptr + t, mask=mt, other=1.0, cache_modifier=".cg")
        sn = tl.load(sin_f32_ptr + t, mask=mt, other=0.0, cache_modifier=".cg")
        r0 = g0 * cs + g1 * sn
        r1 = g1 * cs - g0 * sn
        g0 = r0
        g1 = r1
    p0 = ptr + base + (2 * jj) * s_f + ww * s_w
    dt = ptr.dtype.element_ty
    tl.store(p0, g0.to(dt), mask=mw & (2 * jj < D))
    tl.store(p0 + s_f, g1.to(dt), mask=mw & (2 * jj + 1 < D))


@triton.jit
def _mca_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_f32_ptr, cos_f32_ptr, sin_f32_ptr, C, H, D, NP, WQ, WK, qk_scale,
                    s_qb, s_qc, s_qf, s_qw, s_kb, s_kc, s_kf, s_kw, s_vb, s_vc, s_vf, s_vw,
                    s_ob, s_oc, s_of, s_ow,
                    ROTARY: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr):
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
    q0, q1 = _qk_parts(q_ptr, q_base, offs_m, mask_m, s_qf, s_qw, D, cos_f32_ptr, sin_f32_ptr, NP, ROTARY, BLOCK_H,
                       True)  # (BM, BLOCK_H) each

    m_i = tl.full([BM], float("-inf"), dtype=tl.float32) + zero
    l_i = tl.zeros([BM], dtype=tl.float32) + zero
    acc = tl.zeros([BM, BLOCK_D], dtype=tl.float32) + zero[:, None]
    for n0 in range(0, WK, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < WK
        k0, k1 = _qk_parts(k_ptr, k_base, offs_n, mask_n, s_kf, s_kw, D, cos_f32_ptr, sin_f32_ptr, NP, ROTARY,
                           BLOCK_H, False)  # (BLOCK_H, BN) each
        s = tl.dot(q0, k0, input_precision=PRECISION)
        s = tl.dot(q1, k1, s, input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + v_base + offs_d[None, :] * s_vf + offs_n[:, None] * s_vw,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(p.to(dt), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    o_base = _head_base(b, c, h, D, s_ob, s_oc, s_of)
    tl.store(o_ptr + o_base + offs_d[None, :] * s_of + offs_m[:, None] * s_ow, out.to(dt),
             mask=mask_m[:, None] & mask_d[None, :])
    stat = (b * C * H + ch).to(tl.int64) * WQ + offs_m
    tl.store(lse_f32_ptr + stat, (m_i + tl.log2(l_i)).to(lse_f32_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _mca_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_f32_ptr, delta_f32_ptr, cos_f32_ptr, sin_f32_ptr,
                       dq_ptr, qr_ptr, C, H, D, NP, WQ, WK, qk_scale, scale,
                       s_qb, s_qc, s_qf, s_qw, s_kb, s_kc, s_kf, s_kw, s_vb, s_vc, s_vf, s_vw,
                       s_ob, s_oc, s_of, s_ow, s_gb, s_gc, s_gf, s_gw, s_dqb, s_dqc, s_dqf, s_dqw,
                       ROTARY: tl.constexpr, STORE_QR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                       PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """grid (cdiv(WQ, BM), C * H, B): delta = rowsum(dO * O) of one query block (stored for the dk/dv
    kernel, which runs after this one) and its dq, looping over all key blocks. STORE_QR: also store the
    rotated q block into qr (B, C, F, WQ) contiguous, for the dk/dv kernel."""
    pid_m = tl.program_id(0)
    ch = tl.program_id(1)
    b = tl.program_id(2)
    c = ch // H
    h = ch % H
    dt = q_ptr.dtype.element_ty
    sd = lse_f32_ptr.dtype.element_ty
    zero = tl.zeros([1], dtype=dt)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < WQ
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    q_base = _head_base(b, c, h, D, s_qb, s_qc, s_qf)
    k_base = _head_base(b, c, h, D, s_kb, s_kc, s_kf)
    v_base = _head_base(b, c, h, D, s_vb, s_vc, s_vf)
    o_base = _head_base(b, c, h, D, s_ob, s_oc, s_of)
    g_base = _head_base(b, c, h, D, s_gb, s_gc, s_gf)
    do = tl.load(do_ptr + g_base + offs_d[None, :] * s_gf + offs_m[:, None] * s_gw, mask=mask_md, other=0.0)
    o = tl.load(o_ptr + o_base + offs_d[None, :] * s_of + offs_m[:, None] * s_ow, mask=mask_md, other=0.0)
    stat = (b * C * H + ch).to(tl.int64) * WQ + offs_m
    delta = tl.sum(do.to(sd) * o.to(sd), axis=1)
    tl.store(delta_f32_ptr + stat, delta, mask=mask_m)
    lse = tl.load(lse_f32_ptr + stat, mask=mask_m, other=0.0)
    q0, q1 = _qk_parts(q_ptr, q_base, offs_m, mask_m, s_qf, s_qw, D, cos_f32_ptr, sin_f32_ptr, NP, ROTARY, BLOCK_H,
                       True)  # (BM, BLOCK_H) each
    if STORE_QR:
        qr_base = (b * C + c).to(tl.int64) * H * D * WQ + (h * D).to(tl.int64) * WQ
        _store_parts(qr_ptr, qr_base, offs_m, mask_m, WQ, 1, D, q0, q1, cos_f32_ptr, sin_f32_ptr, NP, False, BLOCK_H)
    dq0 = tl.zeros([BM, BLOCK_H], dtype=tl.float32) + zero[:, None]
    dq1 = tl.zeros([BM, BLOCK_H], dtype=tl.float32) + zero[:, None]
    for n0 in range(0, WK, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_n = offs_n < WK
        k0, k1 = _qk_parts(k_ptr, k_base, offs_n, mask_n, s_kf, s_kw, D, cos_f32_ptr, sin_f32_ptr, NP, ROTARY,
                           BLOCK_H, False)  # (BLOCK_H, BN) each
        vt = tl.load(v_ptr + v_base + offs_d[:, None] * s_vf + offs_n[None, :] * s_vw,
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q0, k0, input_precision=PRECISION)
        s = tl.dot(q1, k1, s, input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(dt)
        dq0 = tl.dot(ds, tl.trans(k0), dq0, input_precision=PRECISION)
        dq1 = tl.dot(ds, tl.trans(k1), dq1, input_precision=PRECISION)
    dq_base = _head_base(b, c, h, D, s_dqb, s_dqc, s_dqf)
    _store_parts(dq_ptr, dq_base, offs_m, mask_m, s_dqf, s_dqw, D, dq0 * scale, dq1 * scale, cos_f32_ptr, sin_f32_ptr,
                 NP, ROTARY, BLOCK_H)


@triton.jit
def _mca_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_f32_ptr, delta_f32_ptr, cos_f32_ptr, sin_f32_ptr,
                         dk_ptr, dv_ptr, C, H, D, NP, WQ, WK, qk_scale, scale,
                         s_qb, s_qc, s_qf, s_qw, s_kb, s_kc, s_kf, s_kw, s_vb, s_vc, s_vf, s_vw,
                         s_gb, s_gc, s_gf, s_gw, s_dkb, s_dkc, s_dkf, s_dkw, s_dvb, s_dvc, s_dvf, s_dvw,
                         ROTARY: tl.constexpr, ROTATE_Q: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """grid (cdiv(WK, BN), C * H, B): dk, dv of one key block, looping over all query blocks. q is rotated
    here when ROTATE_Q, else it is the dq kernel's rotated copy (ROTARY without ROTATE_Q)."""
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
    k0, k1 = _qk_parts(k_ptr, k_base, offs_n, mask_n, s_kf, s_kw, D, cos_f32_ptr, sin_f32_ptr, NP, ROTARY, BLOCK_H,
                       True)  # (BN, BLOCK_H) each
    v = tl.load(v_ptr + v_base + offs_d[None, :] * s_vf + offs_n[:, None] * s_vw, mask=mask_nd, other=0.0)
    dk0 = tl.zeros([BN, BLOCK_H], dtype=tl.float32) + zero[:, None]
    dk1 = tl.zeros([BN, BLOCK_H], dtype=tl.float32) + zero[:, None]
    dv = tl.zeros([BN, BLOCK_D], dtype=tl.float32) + zero[:, None]
    stat_base = (b * C * H + ch).to(tl.int64) * WQ
    for m0 in range(0, WQ, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_m = offs_m < WQ
        q0, q1 = _qk_parts(q_ptr, q_base, offs_m, mask_m, s_qf, s_qw, D, cos_f32_ptr, sin_f32_ptr, NP, ROTATE_Q,
                           BLOCK_H, False)  # (BLOCK_H, BM) each
        lse = tl.load(lse_f32_ptr + stat_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_f32_ptr + stat_base + offs_m, mask=mask_m, other=0.0)
        st = tl.dot(k0, q0, input_precision=PRECISION)
        st = tl.dot(k1, q1, st, input_precision=PRECISION) * qk_scale  # (BN, BM)
        pt = tl.exp2(st - lse[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)
        do = tl.load(do_ptr + g_base + offs_d[None, :] * s_gf + offs_m[:, None] * s_gw,
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BM, BLOCK_D)
        dv = tl.dot(pt.to(dt), do, dv, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # (BN, BM)
        dst = (pt * (dpt - delta[None, :])).to(dt)
        dk0 = tl.dot(dst, tl.trans(q0), dk0, input_precision=PRECISION)
        dk1 = tl.dot(dst, tl.trans(q1), dk1, input_precision=PRECISION)
    dv_base = _head_base(b, c, h, D, s_dvb, s_dvc, s_dvf)
    tl.store(dv_ptr + dv_base + offs_d[None, :] * s_dvf + offs_n[:, None] * s_dvw, dv.to(dt), mask=mask_nd)
    dk_base = _head_base(b, c, h, D, s_dkb, s_dkc, s_dkf)
    _store_parts(dk_ptr, dk_base, offs_n, mask_n, s_dkf, s_dkw, D, dk0 * scale, dk1 * scale, cos_f32_ptr, sin_f32_ptr,
                 NP, ROTARY, BLOCK_H)


# ----------------------------------------------------------------------------------------------
# configs: a short list per kernel, head-dim class and dtype group, each list its own autotuner (so a launch
# is gated with exactly the configs it can pick); one deterministic config under the interpreter


def _cfg(BM, BN, warps, stages):
    return triton.Config({"BM": BM, "BN": BN}, num_warps=warps, num_stages=stages)


KERNELS = ("fwd", "dq", "dkdv")
# head-dim classes by BLOCK_D = max(16, next_pow2(d)): "128" (d 65..128), "64" (33..64), "32" (d <= 32)
HEAD_CLASSES = ("128", "64", "32")
# (kernel, head-dim class, dtype group) -> configs. Dtype groups: "16" (fp16/bf16: wgmma wants >= 64 rows per
# warpgroup), "32" (fp32: tiles sized for the A100's 163 KB of shared memory). BM = query frames, BN = key frames.
CONFIGS: Dict[Tuple[str, str, str], List[triton.Config]] = {
    ("fwd", "128", "16"): [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 2)],
    ("fwd", "64", "16"): [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 2)],
    ("fwd", "32", "16"): [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 2)],
    ("dq", "128", "16"): [_cfg(64, 64, 8, 2), _cfg(64, 32, 8, 2)],
    ("dq", "64", "16"): [_cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2)],
    ("dq", "32", "16"): [_cfg(128, 64, 8, 2), _cfg(64, 32, 4, 2)],
    ("dkdv", "128", "16"): [_cfg(16, 128, 8, 2), _cfg(16, 64, 4, 2)],
    ("dkdv", "64", "16"): [_cfg(32, 128, 8, 2), _cfg(16, 64, 4, 2)],
    ("dkdv", "32", "16"): [_cfg(32, 128, 8, 2), _cfg(16, 64, 4, 2)],
    ("fwd", "128", "32"): [_cfg(32, 32, 8, 2), _cfg(32, 16, 4, 2)],
    ("fwd", "64", "32"): [_cfg(64, 64, 8, 2), _cfg(32, 32, 4, 2)],
    ("fwd", "32", "32"): [_cfg(64, 64, 8, 2), _cfg(32, 32, 4, 2)],
    ("dq", "128", "32"): [_cfg(32, 32, 8, 2), _cfg(64, 16, 8, 2)],
    ("dq", "64", "32"): [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2)],
    ("dq", "32", "32"): [_cfg(64, 32, 8, 2), _cfg(32, 32, 4, 2)],
    ("dkdv", "128", "32"): [_cfg(16, 32, 8, 2), _cfg(16, 16, 4, 2)],
    ("dkdv", "64", "32"): [_cfg(16, 32, 4, 2), _cfg(16, 64, 8, 2)],
    ("dkdv", "32", "32"): [_cfg(16, 32, 4, 2), _cfg(16, 64, 8, 2)],
}
# The interpreter's configs: small, unequal query and key blocks, so the tests' odd frame counts cross tile
# edges on both sides.
INTERPRETER_CONFIGS = {"fwd": _cfg(32, 16, 4, 1), "dq": _cfg(32, 16, 4, 1), "dkdv": _cfg(16, 32, 4, 1)}
_KERNELS = {"fwd": _mca_fwd_kernel, "dq": _mca_bwd_dq_kernel, "dkdv": _mca_bwd_dkdv_kernel}
# One module attribute per autotuner, _tuned_<kernel>_<head class>_<group> (scripts/gpu_check.sh finds them here
# and dumps their picks); forced_config("fwd" | "dq" | "dkdv", config) runs one config whatever the tuner would pick.
_TUNED = common.Autotuners(CONFIGS, INTERPRETER_CONFIGS, _KERNELS, ["D", "WQ", "WK", "PRECISION"], globals(),
                           prefix="_tuned_")
forced_config = _TUNED.forced


def _head_class(block_d: int) -> str:
    return str(max(32, block_d))


def _launch(kernel: str, dtype: torch.dtype, block_d: int, grid, *args, **kwargs):
    _TUNED[(kernel, _head_class(block_d), common.dtype_group(dtype))][grid](*args, **kwargs)


# ----------------------------------------------------------------------------------------------
# launch code


def _block_d(d: int) -> int:
    return max(16, common.next_pow2(d))


def _block_h(d: int) -> int:
    """Width of one part (the even or the odd features): tl.dot needs K >= 16."""
    return max(16, common.next_pow2((d + 1) // 2))


@functools.lru_cache(maxsize=64)
def _theta_tables(frames: int, d: int, device: torch.device, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """cos, sin (frames, d // 2) of the default rotary angles pos * 10000^(-2i/d), from float64 angles; fp32
    (fp64 for the fp64 oracle)."""
    ang = reference.rotary_angles(frames, d, device)
    return ang.cos().to(common.stats_dtype(dtype)).contiguous(), ang.sin().to(common.stats_dtype(dtype)).contiguous()


def _freq_tables_uncached(freqs: Tensor, frames: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    ang = reference.rotary_freq_angles(freqs, frames).double()  # the angles rounded as upstream's, exact trig
    return ang.cos().to(common.stats_dtype(dtype)).contiguous(), ang.sin().to(common.stats_dtype(dtype)).contiguous()


# id(freqs) -> (weak reference to freqs, {(frames, dtype, data_ptr, version): (cos, sin)})
_FREQ_TABLES: Dict[int, Tuple[weakref.ref, Dict[tuple, Tuple[Tensor, Tensor]]]] = {}


def _freq_tables(freqs: Tensor, frames: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """cos, sin (frames, n) of the angles pos * freqs[i] (rounded in freqs' dtype, at least fp32, as upstream's
    rotary), cached per freqs tensor while it lives and is not modified (its version counter and storage)."""
    try:
        key = (frames, dtype, freqs.data_ptr(), freqs._version)
    except RuntimeError:  # inference tensors have no version counter; meta tensors no data
        return _freq_tables_uncached(freqs, frames, dtype)
    slot = _FREQ_TABLES.get(id(freqs))
    if slot is None or slot[0]() is not freqs:
        i = id(freqs)

        def forget(ref, i=i):
            if i in _FREQ_TABLES and _FREQ_TABLES[i][0] is ref:
                del _FREQ_TABLES[i]
        slot = _FREQ_TABLES[i] = (weakref.ref(freqs, forget), {})
    tables = slot[1]
    if key not in tables:
        stale = [k for k in tables if k[1:] != key[1:] or len(tables) >= 8]
        for k in stale:
            del tables[k]
        tables[key] = _freq_tables_uncached(freqs, frames, dtype)
    return tables[key]


def _tables(q: Tensor, k: Tensor, d: int, rotary: bool, freqs: Optional[Tensor]) -> Tuple[Tensor, Tensor, int]:
    """(cos, sin, number of rotated pairs) for the kernels; dummies and 0 pairs without rotary."""
    if not rotary:
        dummy = torch.empty(1, device=q.device, dtype=common.stats_dtype(q.dtype))
        return dummy, dummy, 0
    frames = max(q.shape[3], k.shape[3])
    if freqs is not None and freqs.shape[0] == 0:  # head dim 1: nothing to rotate
        return _tables(q, k, d, False, None)
    if freqs is None:
        return (*_theta_tables(frames, d, q.device, q.dtype), d // 2)
    return (*_freq_tables(freqs, frames, q.dtype), freqs.shape[0])


def _meta(q: Tensor, d: int, n_pairs: int) -> dict:
    return dict(ROTARY=n_pairs > 0, BLOCK_H=_block_h(d), BLOCK_D=_block_d(d), PRECISION=common.dot_precision(q.dtype))


def forward(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float, rotary: bool,
            rotary_freqs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(out (B, C, F, Wq), lse (B, C, H, Wq) base-2 log-sum-exp, fp32)."""
    B, C, F, WQ = q.shape
    WK = k.shape[3]
    D = F // num_heads
    out = torch.empty((B, C, F, WQ), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, C, num_heads, WQ), device=q.device, dtype=common.stats_dtype(q.dtype))
    cos, sin, n_pairs = _tables(q, k, D, rotary, rotary_freqs)
    _launch("fwd", q.dtype, _block_d(D), lambda m: (triton.cdiv(WQ, m["BM"]), C * num_heads, B),
            q, k, v, out, lse, cos, sin, C, num_heads, D, n_pairs, WQ, WK, float(scale) * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), **_meta(q, D, n_pairs))
    return out, lse


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, num_heads: int, scale: float,
             rotary: bool, rotary_freqs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    B, C, F, WQ = q.shape
    WK = k.shape[3]
    D = F // num_heads
    lse = lse.contiguous()  # the forward's own (B, C, H, WQ) output: a no-op for it
    delta = torch.empty_like(lse)  # written by the dq kernel, read by the dk/dv kernel
    dq = torch.empty((B, C, F, WQ), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, C, F, WK), device=q.device, dtype=q.dtype)
    dv = torch.empty_like(dk)
    cos, sin, n_pairs = _tables(q, k, D, rotary, rotary_freqs)
    meta = _meta(q, D, n_pairs)
    sizes = (C, num_heads, D, n_pairs, WQ, WK, float(scale) * LOG2E, float(scale))
    pre_rotate = n_pairs > 0 and _block_d(D) in PRE_ROTATED_Q_BLOCK_DS
    qr = torch.empty_like(dq) if pre_rotate else dq  # dq: an unused placeholder
    _launch("dq", q.dtype, _block_d(D), lambda m: (triton.cdiv(WQ, m["BM"]), C * num_heads, B),
            q, k, v, out, do, lse, delta, cos, sin, dq, qr, *sizes, *q.stride(), *k.stride(), *v.stride(),
            *out.stride(), *do.stride(), *dq.stride(), STORE_QR=pre_rotate, **meta)
    q_in = qr if pre_rotate else q
    _launch("dkdv", q.dtype, _block_d(D), lambda m: (triton.cdiv(WK, m["BN"]), C * num_heads, B),
            q_in, k, v, do, lse, delta, cos, sin, dk, dv, *sizes, *q_in.stride(), *k.stride(), *v.stride(),
            *do.stride(), *dk.stride(), *dv.stride(), ROTATE_Q=n_pairs > 0 and not pre_rotate, **meta)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# torch.library registration


@torch.library.custom_op("ftkernels::multichannel_attention", mutates_args=())
def _mca_op(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: float, rotary: bool,
            rotary_freqs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    return forward(q, k, v, num_heads, scale, rotary, rotary_freqs)


@_mca_op.register_fake
def _(q, k, v, num_heads, scale, rotary, rotary_freqs=None):
    B, C, F, WQ = q.shape
    return q.new_empty((B, C, F, WQ)), q.new_empty((B, C, num_heads, WQ), dtype=common.stats_dtype(q.dtype))


@torch.library.custom_op("ftkernels::multichannel_attention_backward", mutates_args=())
def _mca_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, num_heads: int,
                     scale: float, rotary: bool, rotary_freqs: Optional[Tensor] = None
                     ) -> Tuple[Tensor, Tensor, Tensor]:
    return backward(do, q, k, v, out, lse, num_heads, scale, rotary, rotary_freqs)


@_mca_backward_op.register_fake
def _(do, q, k, v, out, lse, num_heads, scale, rotary, rotary_freqs=None):
    B, C, F, WQ = q.shape
    WK = k.shape[3]
    return q.new_empty((B, C, F, WQ)), q.new_empty((B, C, F, WK)), q.new_empty((B, C, F, WK))


def _setup_context(ctx, inputs, output):
    q, k, v, num_heads, scale, rotary, rotary_freqs = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, rotary_freqs)
    ctx.num_heads, ctx.scale, ctx.rotary = num_heads, scale, rotary
    # lse is saved for backward only: no gradient flows into it, and autograd must not allocate a zero
    # gradient for it (nor for out when only lse were used): unused output gradients arrive as None
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, rotary_freqs = ctx.saved_tensors
    if dout is None:
        return None, None, None, None, None, None, None
    dq, dk, dv = _mca_backward_op(dout, q, k, v, out, lse, ctx.num_heads, ctx.scale, ctx.rotary, rotary_freqs)
    return dq, dk, dv, None, None, None, None


_mca_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# public API


def check_inputs(q, k, v, num_heads, scale, rotary, rotary_freqs=None) -> None:
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
    if rotary_freqs is not None:
        if not rotary:
            raise ValueError("rotary_freqs was given but rotary=False; pass rotary=True to rotate q and k by it")
        if not isinstance(rotary_freqs, Tensor):
            raise TypeError(f"rotary_freqs must be a torch.Tensor of shape (head_dim // 2,), "
                            f"got {type(rotary_freqs).__name__}")
        if rotary_freqs.dim() != 1 or rotary_freqs.shape[0] != d // 2:
            raise ValueError(f"rotary_freqs must have shape (head_dim // 2,) = ({d // 2},) for F / num_heads = "
                             f"{F} / {num_heads} = {d}, got {tuple(rotary_freqs.shape)}")
        if not rotary_freqs.is_floating_point():
            raise TypeError(f"rotary_freqs must be a floating tensor, got {rotary_freqs.dtype}")
        if rotary_freqs.device != q.device:
            raise ValueError(f"rotary_freqs is on {rotary_freqs.device} but q is on {q.device}; they must share a "
                             "device")
        if rotary_freqs.requires_grad and torch.is_grad_enabled():
            raise ValueError("rotary_freqs requires grad, but no gradient flows to the rotary frequencies; pass "
                             "rotary_freqs.detach() (or a buffer)")
    elif rotary and d % 2 != 0:
        raise ValueError(f"rotary needs an even head dim, got F / num_heads = {F} / {num_heads} = {d}; "
                         "change num_heads, pass rotary=False, or pass rotary_freqs (an odd head dim's last "
                         "feature is then not rotated)")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        if not math.isfinite(float(scale)):
            raise ValueError(f"scale must be finite, got {scale!r}")


def multichannel_attention(q: Tensor, k: Tensor, v: Tensor, num_heads: int, scale: Optional[float] = None,
                           rotary: bool = True, backend: Optional[str] = None,
                           rotary_freqs: Optional[Tensor] = None) -> Tensor:
    """Per (batch, channel, head) softmax attention over frames, rotary on q and k.

    q (B, C, F, Wq); k, v (B, C, F, Wk) -> (B, C, F, Wq). Head h uses features [h*d, (h+1)*d), d = F / num_heads;
    scale defaults to 1/sqrt(d). Softmax in fp32 whatever the input dtype.

    Rotary rotates the feature pairs (2i, 2i+1) of every head by the angle ``frame * freq_i``: by default
    ``freq_i = 10000^(-2i/d)`` in float64; ``rotary_freqs`` (d // 2,) gives the frequencies instead (e.g. a
    checkpoint's stored table: the angles are then rounded in its dtype, at least fp32, as upstream's rotary
    computes them, and an odd head dim's last feature is not rotated). No gradient flows to ``rotary_freqs``.
    """
    if all(isinstance(t, Tensor) for t in (q, k, v)):
        q, k, v = common.autocast_inputs(q, k, v)
    check_inputs(q, k, v, num_heads, scale, rotary, rotary_freqs)
    num_heads = int(num_heads)
    d = q.shape[2] // num_heads
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not common.use_triton(q, backend, "multichannel_attention"):
        return reference.multichannel_attention(q, k, v, num_heads, scale, bool(rotary), rotary_freqs)
    common.kernel_dtype_ok(q, "q")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"the Triton kernels take head dims up to {MAX_HEAD_DIM}, got F / num_heads = {d}; "
                         "use more heads or backend='reference'")
    return _mca_op(q, k, v, num_heads, scale, bool(rotary), rotary_freqs)[0]


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
