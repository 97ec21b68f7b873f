"""Static performance report: what the kernels would do on an H100, read from real cubins built on a CPU.

    python -m ftkernels.static_report                          # every preset's bf16 training step on sm_90
    python -m ftkernels.static_report --workload channels32 --markdown report.md --json report.json
    python -m ftkernels.static_report --workload bench: --dtype fp16 --arch 80

**This is static analysis and a prediction, not a measurement.** Nothing here runs on a GPU.

Inputs: the launches a workload makes (:mod:`ftkernels._launch_recorder`, meta tensors, nothing runs),
each built with the specialization Triton's JIT would use (:mod:`ftkernels._compile_gate`). Per runtime
specialization it reports, from the cubin and its ``ptxas -v`` log:

* registers, spill stores/loads (bytes, ``ptxas -v``), shared memory (Triton's metadata);
* occupancy and its limiter (registers / shared / warps / blocks) from :data:`CHIPS` (CUDA occupancy
  calculator rules: registers allocated per warp in units of 256 across 4 sub-partitions, 1 KB shared
  reserved per block);
* the MMA instruction kind and static count from the SASS (``cuobjdump -sass`` that ships with Triton):
  ``wgmma`` (HGMMA), ``mma.sync`` (HMMA), ``FFMA``/``DFMA`` for dots on the CUDA cores, ``-`` for kernels
  without ``tl.dot``;
* per launch: FLOPs (:data:`FLOP_MODELS`, the kernel's executed multiply-adds x 2, recomputation included),
  minimum bytes (every distinct tensor argument read or written once), the roofline lower bound and a
  predicted time (:func:`predict`).

Per workload (a preset's training step) it adds up the launches per op class and sets them beside the same
ops done the plain-PyTorch way (:func:`torch_composition`: cuBLAS matmuls, a compiled norm and elementwise
ops, SDPA for attention). The PyTorch ops that run inside the ftkernels ops (split-K partial sums, zero
biases, the attention's delta) count on the Triton side; so do the zero gradients autograd materialises for
the custom ops' non-differentiable outputs. Everything else in the step (concatenations, interpolation,
residual adds, the loss, the optimizer) is the same on both sides and not modelled.

Hardware and efficiency assumptions (H100 SXM5 80 GB, NVIDIA's datasheet; A100 SXM4 80 GB for sm_80):

* dense bf16/fp16 tensor peak 989 TFLOP/s, TF32 495, fp32 FMA 67, fp64 FMA 33.5; HBM3 3.35 TB/s; 132 SMs.
* achievable: GEMM-class tensor-core work (cuBLAS, or a Triton kernel whose dots lower to ``wgmma``) 70% of
  the dense peak; a kernel whose dots lower to ``mma.sync`` 45% of it (Hopper runs the Ampere-style
  synchronous MMA well below wgmma's rate: FlashAttention-2, mma.sync-based, reaches about 35-40% of the
  H100 peak in the forward pass where FlashAttention-3 with wgmma reaches 60-75%); fp32 dots on the CUDA
  cores 70% of the fp32 peak; SDPA (FlashAttention-2 in PyTorch) 35% of the peak forward, 25% backward;
  memory traffic 80% of HBM bandwidth; 2 us per kernel launch (launch gap and tail).
* On sm_80 (A100: 312 TFLOP/s bf16, 2.04 TB/s, 108 SMs) mma.sync is the native tensor-core path and gets the
  70%; grids there are the ones recorded for an H100's 132 SMs (split-K factors differ slightly on 108).
* Triton launches also pay for their grids: compute is divided by the SM-level wave efficiency
  (programs / (ceil(programs / SMs) x SMs)), bandwidth by min(1, 2 x active SMs / SMs) (an SM is assumed to
  pull at most twice its share of HBM bandwidth). Spills and occupancy are reported, not priced.
* Minimum bytes assume every tensor is read or written once from HBM; re-reads are not modelled, so
  memory-bound predictions are optimistic for kernels that re-read operands, except where
  :data:`REREAD_MODELS` adds them to the predicted time (the chunked frame norm: its second pass over a
  program's frame block hits L2 for the last 50 MB the running programs read, the rest comes from HBM).

Rules (:func:`rule_violations`): on sm_90, a bf16/fp16 kernel with ``tl.dot`` that has no wgmma while one of
its launches is compute-bound (FLOPs / minimum bytes above the ridge point, peak / bandwidth = 295 FLOP/B),
or a bf16/fp16 kernel that spills, is a violation. Memory-bound GEMMs (e.g. a channel mix with a handful of
output channels) may use whatever instruction moves their bytes fastest.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

# ----------------------------------------------------------------------------------------------
# hardware


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    arch: int
    sms: int
    smem_per_sm: int  # bytes available to blocks on one SM
    smem_per_block: int  # opt-in maximum for one block
    peak_tc16: float  # dense bf16/fp16 tensor-core FLOP/s
    peak_tf32: float
    peak_fp32: float  # FFMA
    peak_fp64: float
    hbm: float  # bytes/s
    l2: int
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    sub_partitions: int = 4
    smem_reserved_per_block: int = 1024

    @property
    def ridge(self) -> float:
        """FLOP per byte above which a bf16/fp16 tensor-core kernel is compute-bound."""
        return self.peak_tc16 / self.hbm


CHIPS = {
    80: Chip("A100 SXM4 80GB", 80, 108, 164 * 1024, 163 * 1024, 312e12, 156e12, 19.5e12, 9.7e12, 2.039e12, 40 << 20),
    90: Chip("H100 SXM5 80GB", 90, 132, 228 * 1024, 227 * 1024, 989.4e12, 494.7e12, 66.9e12, 33.5e12, 3.35e12,
             50 << 20),
}

EFF = {
    "wgmma": 0.70,  # of the dense 16-bit peak (also cuBLAS)
    "mma.sync": 0.45,  # of the dense 16-bit peak, on Hopper
    "cublas": 0.70,
    "FFMA": 0.70,  # of the fp32 peak
    "DFMA": 0.70,
    "sdpa_fwd": 0.35,
    "sdpa_bwd": 0.25,
    "memory": 0.80,  # of HBM bandwidth
}
LAUNCH_S = 2e-6
SM_BANDWIDTH_SHARE = 2.0  # one SM pulls at most this many times its share of HBM bandwidth
LOW_PRECISION = ("bf16", "fp16")


# ----------------------------------------------------------------------------------------------
# occupancy


def occupancy(chip: Chip, registers: int, shared: int, num_warps: int) -> Tuple[int, float, str]:
    """(blocks per SM, occupancy = resident warps / max warps, limiter) by the CUDA occupancy rules."""
    regs_per_warp = math.ceil(registers * 32 / chip.reg_unit) * chip.reg_unit
    if regs_per_warp:
        warps_per_part = (chip.regs_per_sm // chip.sub_partitions) // regs_per_warp
        by_regs = (warps_per_part * chip.sub_partitions) // num_warps
    else:
        by_regs = chip.max_blocks_per_sm
    per_block = shared + chip.smem_reserved_per_block
    by_shared = chip.smem_per_sm // per_block if shared <= chip.smem_per_block else 0
    by_warps = chip.max_warps_per_sm // num_warps
    limits = {"registers": by_regs, "shared": by_shared, "warps": by_warps, "blocks": chip.max_blocks_per_sm}
    limiter = min(limits, key=lambda k: (limits[k], ["warps", "blocks", "registers", "shared"].index(k)))
    blocks = limits[limiter]
    return blocks, blocks * num_warps / chip.max_warps_per_sm, limiter


# ----------------------------------------------------------------------------------------------
# SASS instruction kinds


def mma_kind(sass: Dict[str, int], dots: int) -> Tuple[str, int]:
    """(kind, static instruction count) of a kernel's matrix multiplies."""
    if not dots:
        return "-", 0
    count = lambda prefix: sum(n for op, n in sass.items() if op.split(".")[0] == prefix)  # noqa: E731
    for kind, prefix in (("wgmma", "HGMMA"), ("mma.sync", "HMMA"), ("DFMA", "DFMA"), ("FFMA", "FFMA")):
        n = count(prefix)
        if n:
            return kind, n
    return "?", 0


def sass_summary(sass: Dict[str, int]) -> Dict[str, int]:
    pick = lambda *prefixes: sum(n for op, n in sass.items() if op.split(".")[0] in prefixes)  # noqa: E731
    return {"HGMMA": pick("HGMMA"), "HMMA": pick("HMMA"), "FFMA": pick("FFMA"), "DFMA": pick("DFMA"),
            "cp.async": pick("LDGSTS"), "TMA": pick("UTMALDG", "UBLKCP"), "local ld/st": pick("LDL", "STL"),
            "instructions": sum(sass.values())}


# ----------------------------------------------------------------------------------------------
# per-launch FLOPs and bytes


def _val(d):
    return d[1] if d[0] in ("i", "f", "b", "s") else None


def _shape(d) -> List[int]:
    return d[2] if d and d[0] == "T" else []


def _numel(d) -> int:
    return math.prod(_shape(d)) if d and d[0] == "T" else 0


def _attn(mults: int) -> Callable:
    """mults x 2 x WQ x WK x D per (batch, channel, head): the attention kernels' dot products."""
    def flops(a, grid):
        return 2 * mults * _val(a["WQ"]) * _val(a["WK"]) * _val(a["D"]) * _val(a["C"]) * _val(a["H"]) * grid[2]
    return flops


# kernel function name -> FLOPs(bound args, grid). Executed multiply-adds x 2 (recomputation included);
# elementwise kernels count their arithmetic per element roughly (they are memory-bound either way).
FLOP_MODELS: Dict[str, Callable[[Dict[str, list], List[int]], float]] = {
    "_positionwise_kernel": lambda a, g: 2 * _val(a["K"]) * _numel(a["out_ptr"]),
    "_channel_mix_kernel": lambda a, g: 2 * _val(a["K"]) * _numel(a["out_ptr"]),
    "_weight_grad_kernel": lambda a, g: 2 * _val(a["M"]) * _val(a["N"]) * _val(a["K1"]) * _val(a["K0"]) * g[1],
    # dy = W^T grad and dW = grad y^T over B x N columns
    "_mix_backward_kernel": lambda a, g: 4 * _val(a["C_OUT"]) * _val(a["C_IN"]) * _val(a["N"])
    * (_val(a["CHUNKS"]) // _val(a["CHUNKS_PER_BATCH"])),
    "_frame_norm_fwd_kernel": lambda a, g: 8 * _val(a["F"]) * _val(a["W"]) * _val(a["C"]) * g[2],
    "_frame_norm_bwd_kernel": lambda a, g: 12 * _val(a["F"]) * _val(a["W"]) * _val(a["C"]) * g[2],
    "_partial_sum_kernel": lambda a, g: 2 * _val(a["ROWS"]) * _val(a["N"]),
    "_squared_relu_fwd_kernel": lambda a, g: 2 * _val(a["N"]),
    "_squared_relu_bwd_kernel": lambda a, g: 3 * _val(a["N"]),
    "_mca_fwd_kernel": _attn(2),  # S = QK^T, O = PV
    "_mca_bwd_dkdv_kernel": _attn(4),  # S, dV = P^T dO, dP = dO V^T, dK = dS^T Q
    "_mca_bwd_dq_kernel": _attn(3),  # S, dP, dQ = dS K
}


def kernel_name(qualified: str) -> str:
    return qualified.split(":")[-1].split(".")[-1]


def launch_flops(launch) -> Optional[float]:
    model = FLOP_MODELS.get(kernel_name(launch.kernel))
    return float(model(launch.args, launch.grid)) if model else None


def launch_bytes(launch) -> int:
    """Every distinct tensor argument (same storage, offset, shape and strides = same tensor) once."""
    seen = set()
    total = 0
    for d in launch.args.values():
        if d[0] != "T":
            continue
        key = (d[6], d[4], tuple(d[2]), tuple(d[3]))
        if key not in seen:
            seen.add(key)
            total += math.prod(d[2]) * d[5]
    return total


def _frame_norm_rereads(a: Dict[str, list], grid: List[int], chip: "Chip", blocks_per_sm: int) -> float:
    """The chunked frame-norm kernels stream each program's (F x BC x BW) block of x (and dy) twice: the
    second pass walks the chunks backwards, so of what the concurrently running programs read, the last L2
    capacity's worth is still in L2; the rest comes from HBM again. The resident kernels read once."""
    fwd = "STORE_Y" in a
    if _val(a["RESIDENT"]) or (fwd and (_val(a["LOAD_STATS"]) or not _val(a["STORE_Y"]))):
        return 0.0
    tensors = [a["x_ptr"]] + ([] if fwd else [a["dy_ptr"]])
    itemsize = sum(d[5] for d in tensors)
    block = _val(a["F"]) * _val(a["BC"]) * _val(a["BW"]) * itemsize
    programs = math.prod(grid)
    live = min(programs, max(blocks_per_sm, 1) * chip.sms) * block
    hit = min(1.0, chip.l2 / live) if live else 1.0
    return _numel(a["x_ptr"]) * itemsize * (1.0 - hit)


# kernel function name -> bytes a launch reads again from HBM beyond launch_bytes (args, grid, chip, blocks/SM)
REREAD_MODELS: Dict[str, Callable[[Dict[str, list], List[int], "Chip", int], float]] = {
    "_frame_norm_fwd_kernel": _frame_norm_rereads,
    "_frame_norm_bwd_kernel": _frame_norm_rereads,
}


def peak_for(chip: Chip, dtype: str) -> float:
    """The best rate the hardware has for dots in this dtype (fp32 dots are 'ieee': CUDA-core FMA)."""
    return {"bf16": chip.peak_tc16, "fp16": chip.peak_tc16, "fp32": chip.peak_fp32, "fp64": chip.peak_fp64}.get(
        dtype, chip.peak_fp32)


def _compute_rate(chip: Chip, kind: str, dtype: str) -> float:
    if kind == "wgmma" or (kind == "mma.sync" and chip.arch < 90):  # before Hopper mma.sync is the native path
        return chip.peak_tc16 * EFF["wgmma"]
    if kind == "mma.sync":
        return chip.peak_tc16 * EFF["mma.sync"]
    if kind == "DFMA":
        return chip.peak_fp64 * EFF["DFMA"]
    return chip.peak_fp32 * EFF["FFMA"]


def roofline(chip: Chip, flops: float, nbytes: float, dtype: str, gemm: bool) -> float:
    """Lower bound: the hardware's best dot rate for the dtype and full HBM bandwidth."""
    t_mem = nbytes / chip.hbm
    return max(flops / peak_for(chip, dtype), t_mem) if gemm else t_mem


def predict(chip: Chip, flops: float, nbytes: float, kind: str, dtype: str, programs: int) -> float:
    """Predicted time of one Triton launch (see the module docstring for every assumption)."""
    waves = math.ceil(programs / chip.sms) if programs else 1
    wave_eff = programs / (waves * chip.sms) if programs else 1.0
    bw_fill = min(1.0, SM_BANDWIDTH_SHARE * min(programs, chip.sms) / chip.sms) if programs else 1.0
    t_mem = nbytes / (chip.hbm * EFF["memory"] * bw_fill)
    t_cmp = flops / (_compute_rate(chip, kind, dtype) * wave_eff) if kind != "-" else 0.0
    return max(t_mem, t_cmp) + LAUNCH_S


def _memory_time(chip: Chip, nbytes: float) -> float:
    return nbytes / (chip.hbm * EFF["memory"]) + LAUNCH_S


# ----------------------------------------------------------------------------------------------
# the plain-PyTorch composition of each op (from the op call's argument shapes)


@dataclasses.dataclass
class Piece:
    what: str
    kind: str  # "gemm" | "sdpa_fwd" | "sdpa_bwd" | "memory"
    flops: float
    nbytes: float


def _t(args, name):
    d = args.get(name)
    return d if d and d[0] == "T" and math.prod(d[2]) > 0 else None


def _bytes(*ds) -> float:
    return float(sum(math.prod(d[2]) * d[5] for d in ds if d))


def _linear_pieces(x, w_pw, w_dw, bias: bool, backward: bool, grad=None) -> List[Piece]:
    """torch.matmul(weight_pw, x) (one batched GEMM) then the channel mix as a GEMM over channels;
    biases fused in cuBLAS epilogues (forward) or a reduction over the gradient (backward)."""
    B, C, Fi, W = x[2]
    e = x[5]
    Fo = w_pw[2][1] if w_pw else Fi
    Co = w_dw[2][0] if w_dw else C
    y = B * C * Fo * W * e
    out = B * Co * Fo * W * e
    xin = B * C * Fi * W * e
    wpw = _bytes(w_pw)
    wdw = _bytes(w_dw)
    p = []
    if not backward:
        if w_pw:
            p.append(Piece("bmm weight_pw @ x", "gemm", 2 * B * C * Fo * Fi * W, xin + wpw + y))
        if w_dw:
            p.append(Piece("mm weight_dw @ y", "gemm", 2 * B * Co * C * Fo * W, y + wdw + out))
        return p
    if w_dw:
        p.append(Piece("dy = weight_dw^T @ grad", "gemm", 2 * B * Co * C * Fo * W, out + wdw + y))
        p.append(Piece("d weight_dw = grad @ y^T", "gemm", 2 * B * Co * C * Fo * W, out + y + wdw))
        if bias:
            p.append(Piece("d bias_dw (reduction)", "memory", B * Co * Fo * W, out))
    if w_pw:
        p.append(Piece("dx = weight_pw^T @ dy", "gemm", 2 * B * C * Fo * Fi * W, y + wpw + xin))
        p.append(Piece("d weight_pw = dy @ x^T", "gemm", 2 * B * C * Fo * Fi * W, y + xin + wpw))
        if bias:
            p.append(Piece("d bias_pw (reduction)", "memory", B * C * Fo * W, y))
    return p


def _with_shape(d, shape):
    return ["T", d[1], list(shape), [], 0, d[5], -1]


ITEMSIZE = {"fp64": 8, "fp32": 4, "fp16": 2, "bf16": 2}


def _norm_pieces(x, backward: bool, out_dtype: Optional[str] = None, dy=None) -> List[Piece]:
    """A compiled norm: forward reads x and writes y (statistics in registers; a cast to ``out_dtype`` and a
    channels-last layout fused into that write, as inductor does for a conv's input); backward reads dy and x
    for dx in one kernel and again for d weight/d bias in a second (what inductor generates for a layer
    norm)."""
    n = _bytes(x)
    numel = n / x[5]
    if backward:
        g = _bytes(dy) if dy else n
        return [Piece("compiled norm backward: dx", "memory", 12 * numel, g + 2 * n),
                Piece("compiled norm backward: d weight, d bias", "memory", 4 * numel, g + n)]
    return [Piece("compiled norm", "memory", 8 * numel, n + numel * ITEMSIZE.get(out_dtype, x[5]))]


def _ffn_pieces(a, backward: bool) -> List[Piece]:
    x = _t(a, "x")
    w1, w2, d1, d2 = (_t(a, n) for n in ("weight1_pw", "weight2_pw", "weight1_dw", "weight2_dw"))
    norm = bool(_val(a["norm"]))
    B, C, F, W = x[2]
    C1 = d1[2][0] if d1 else C
    H = w1[2][1]
    h = _with_shape(x, (B, C1, H, W))
    hb = _bytes(h)
    bias1 = _t(a, "bias1_pw") is not None or bool(a.get("has_bias1_pw", ["b", False])[1])
    bias2 = _t(a, "bias2_pw") is not None or bool(a.get("has_bias2_pw", ["b", False])[1])
    p = []
    if not backward:
        if norm:
            p += _norm_pieces(x, False)
        p += _linear_pieces(x, w1, d1, bias1, False)
        p.append(Piece("compiled relu^2", "memory", 2 * hb / x[5], 2 * hb))
        p += _linear_pieces(h, w2, d2, bias2, False)
        return p
    p += _linear_pieces(h, w2, d2, bias2, True)
    p.append(Piece("compiled relu^2 backward", "memory", 3 * hb / x[5], 3 * hb))
    p += _linear_pieces(x, w1, d1, bias1, True)
    if norm:
        p += _norm_pieces(x, True)
    return p


def _attention_pieces(a, backward: bool) -> List[Piece]:
    """SDPA on (B*C, H, W, d) views: transposes in and out (rotary fused into the q/k transposes by compile)."""
    q, k = _t(a, "q"), _t(a, "k")
    H = _val(a["num_heads"])
    B, C, F, WQ = q[2]
    WK = k[2][3]
    d = F // H
    qb, kb = _bytes(q), _bytes(k)
    fl = 4 * B * C * H * WQ * WK * d
    if not backward:
        return [Piece("q, k, v to heads (+rotary)", "memory", 0, 2 * (qb + 2 * kb)),
                Piece("SDPA forward", "sdpa_fwd", fl, qb + 2 * kb + qb),
                Piece("out to (B, C, F, W)", "memory", 0, 2 * qb)]
    return [Piece("dout to heads", "memory", 0, 2 * qb),
            Piece("SDPA backward", "sdpa_bwd", 2.5 * fl, 2 * qb + 2 * kb + qb + qb + 2 * kb),
            Piece("dq, dk, dv to (B, C, F, W) (+rotary)", "memory", 0, 2 * (qb + 2 * kb))]


def torch_composition(call: dict) -> List[Piece]:
    """The plain-PyTorch way to do one recorded custom-op call, as kernels with FLOPs and bytes."""
    op = call["op"].split("::")[-1]
    a = call["args"]
    backward = op.endswith("_backward")
    base = op[: -len("_backward")] if backward else op
    if base == "multichannel_linear":
        x = _t(a, "x")
        has_bias = any(bool(a.get(n, ["b", False])[1]) for n in ("has_bias_pw", "has_bias_dw")) or \
            (_t(a, "bias_pw") is not None) or (_t(a, "bias_dw") is not None)
        return _linear_pieces(x, _t(a, "weight_pw"), _t(a, "weight_dw"), has_bias, backward)
    if base == "frame_norm":
        out_dtype = a.get("out_dtype")
        return _norm_pieces(_t(a, "x"), backward, out_dtype[1] if out_dtype and out_dtype[0] == "dtype" else None,
                            _t(a, "dy"))
    if base == "squared_relu":  # torch.compile fuses relu and square: one read and one write each way
        x = _t(a, "x")
        n = _bytes(x)
        if backward:
            return [Piece("compiled relu^2 backward", "memory", 3 * n / x[5], 2 * n + _bytes(_t(a, "dy")))]
        return [Piece("compiled relu^2", "memory", 2 * n / x[5], 2 * n)]
    if base == "squared_relu_ffn":
        return _ffn_pieces(a, backward)
    if base == "multichannel_attention":
        return _attention_pieces(a, backward)
    raise KeyError(f"no PyTorch-composition model for op {call['op']}")


def piece_time(chip: Chip, piece: Piece, dtype: str) -> float:
    t_mem = piece.nbytes / (chip.hbm * EFF["memory"])
    if piece.kind == "gemm":
        rate = (chip.peak_tc16 if dtype in LOW_PRECISION else chip.peak_fp32) * EFF["cublas"]
    elif piece.kind in ("sdpa_fwd", "sdpa_bwd"):
        rate = (chip.peak_tc16 if dtype in LOW_PRECISION else chip.peak_fp32) * EFF[piece.kind]
    else:
        return t_mem + LAUNCH_S
    return max(piece.flops / rate, t_mem) + LAUNCH_S


def op_class(op: str) -> str:
    base = op.split("::")[-1]
    return base[: -len("_backward")] if base.endswith("_backward") else base


# ----------------------------------------------------------------------------------------------
# building the analysis


def record(path: str, only: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[str]] = None) -> None:
    from ftkernels import _compile_gate
    _compile_gate.record_launches(path, only, dtypes)


def gate(launches_path: str, json_out: str, archs: Sequence[int] = (80, 90), jobs: Optional[int] = None,
         sass_archs: Optional[Sequence[int]] = None) -> subprocess.CompletedProcess:
    """Run the compile gate (a subprocess without TRITON_INTERPRET) on a recording; writes ``json_out``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "ftkernels._compile_gate", "--launches", launches_path, "--json", json_out,
           "--arch", *map(str, archs), "--sass-arch", *map(str, sass_archs or archs),
           "--jobs", str(jobs or os.cpu_count() or 2)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


_GATE_CACHE: Dict[str, Tuple[subprocess.CompletedProcess, str]] = {}


def cached_gate(launches_path: str) -> Tuple[subprocess.CompletedProcess, str]:
    """The compile gate on a recording (sm_80 and sm_90), run once per process: (process result, its JSON)."""
    if launches_path not in _GATE_CACHE:
        out = os.path.join(os.path.dirname(launches_path), "gate.json")
        _GATE_CACHE[launches_path] = (gate(launches_path, out, sass_archs=(90,)), out)
    return _GATE_CACHE[launches_path]


@dataclasses.dataclass
class Spec:
    """One built specialization with its resources (one arch)."""
    key: str
    kernel: str
    label: str
    dtype: str
    arch: int
    num_warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    blocks_per_sm: int
    occupancy: float
    limiter: str
    mma: str
    mma_count: int
    dots: int
    sass: Dict[str, int]
    launches: List[int]


class Analysis:
    """A recording plus the gate's builds: per-spec resources, per-launch costs, per-workload predictions."""

    def __init__(self, recording: dict, gate_json: dict):
        from ftkernels._compile_gate import Build
        from ftkernels._launch_recorder import Launch
        self.launches = [Launch.from_json(x) for x in recording["launches"]]
        self.ops = recording["ops"]
        self.fills = recording.get("fills", [])
        self.skipped = recording.get("skipped", {})
        self.failures = gate_json.get("failures", [])
        self.specs: List[Spec] = []
        self.spec_of: Dict[Tuple[int, int], Spec] = {}  # (launch index, arch) -> spec
        self._picked: Dict[int, set] = {}
        for bd, r in zip(gate_json["builds"], gate_json["results"]):
            b = Build(**bd)
            if "error" in r:
                continue
            chip = CHIPS[b.arch]
            blocks, occ, lim = occupancy(chip, r["registers"], r["shared"], r["num_warps"])
            kind, n = mma_kind(r["sass"], r["dots"]) if r.get("sass") is not None else ("n/a", 0)
            s = Spec(b.key, b.kernel, b.label(), b.dtype, b.arch, r["num_warps"], r["registers"], r["spill_stores"],
                     r["spill_loads"], r["shared"], blocks, occ, lim, kind, n, r["dots"], r.get("sass") or {},
                     b.launches)
            self.specs.append(s)
            for i in b.launches:
                self.spec_of[(i, b.arch)] = s

    # ---- per launch
    def launch_cost(self, i: int, arch: int) -> dict:
        l = self.launches[i]
        chip = CHIPS[arch]
        s = self.spec_of.get((i, arch))
        flops = launch_flops(l)
        nbytes = launch_bytes(l)
        programs = math.prod(l.grid)
        gemm = bool(s and s.dots)
        f = flops or 0.0
        kind = s.mma if s else "?"
        reread = REREAD_MODELS.get(kernel_name(l.kernel))
        rereads = reread(l.args, l.grid, chip, s.blocks_per_sm if s else 1) if reread else 0.0
        return {"launch": i, "kernel": kernel_name(l.kernel), "op": l.op, "flops": flops, "bytes": nbytes,
                "reread_bytes": rereads, "intensity": (f / nbytes) if nbytes else 0.0, "programs": programs,
                "gemm": gemm, "roofline_s": roofline(chip, f, nbytes, s.dtype if s else l.dtype, gemm),
                "predicted_s": predict(chip, f if gemm else 0.0, nbytes + rereads, kind if gemm else "-", l.dtype,
                                       programs),
                "spec": s.key if s else None}

    def workloads(self) -> List[str]:
        seen = []
        for l in self.launches:
            if l.workload not in seen:
                seen.append(l.workload)
        return seen

    def select(self, workload: str, dtype: str) -> List[int]:
        """The launches of a workload in a dtype, every config of an autotuned call (the recorder records one
        launch per config so that the gate builds them all; predictions count :meth:`picked` ones only)."""
        return [i for i, l in enumerate(self.launches) if l.workload == workload and l.dtype == dtype]

    def picked(self, arch: int) -> set:
        """The launches that count in predictions: every launch, except that of an autotuned call's configs
        (recorded one after another, config 0 first) only the one with the lowest predicted time counts,
        standing for the autotuner's pick (it times them all on the GPU and keeps the fastest)."""
        if arch not in self._picked:
            keep, group = set(), []

            def close():
                if group:
                    keep.add(min(group, key=lambda i: self.launch_cost(i, arch)["predicted_s"]))
                group.clear()

            for i, l in enumerate(self.launches):
                if l.autotune is None or l.autotune == 0:
                    close()
                if l.autotune is None:
                    keep.add(i)
                else:
                    group.append(i)
            close()
            self._picked[arch] = keep
        return self._picked[arch]

    # ---- per workload
    def step_prediction(self, workload: str, dtype: str, arch: int) -> dict:
        """Per op class: Triton launches (+ PyTorch work inside the ops) vs the plain-PyTorch composition."""
        chip = CHIPS[arch]
        classes: Dict[str, Dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        picked = self.picked(arch)
        for i in self.select(workload, dtype):
            if i not in picked:
                continue
            c = self.launch_cost(i, arch)
            row = classes[op_class(c["op"]) if c["op"] else "(outside ops)"]
            row["triton_s"] += c["predicted_s"]
            row["roofline_s"] += c["roofline_s"]
            row["launches"] += 1
            row["flops"] += c["flops"] or 0.0
        for call in self.ops:
            if call["workload"] != workload or call["dtype"] != dtype:
                continue
            row = classes[op_class(call["op"])]
            for name, nbytes in call.get("torch_ops", []):
                row["torch_inside_s"] += _memory_time(chip, nbytes)
                row["torch_inside_kernels"] += 1
            for p in torch_composition(call):
                row["pytorch_s"] += piece_time(chip, p, dtype)
                row["pytorch_kernels"] += 1
        fills = [f for f in self.fills if f["workload"] == workload and f["dtype"] == dtype]
        zero = {"count": len([f for f in fills if f["op"].startswith("zero")]),
                "bytes": sum(f["bytes"] for f in fills if f["op"].startswith("zero"))}
        zero["s"] = sum(_memory_time(chip, f["bytes"]) for f in fills if f["op"].startswith("zero"))
        total_triton = sum(r["triton_s"] + r["torch_inside_s"] for r in classes.values()) + zero["s"]
        total_pytorch = sum(r["pytorch_s"] for r in classes.values())
        return {"workload": workload, "dtype": dtype, "arch": arch, "chip": chip.name,
                "classes": {k: dict(v) for k, v in sorted(classes.items())}, "zero_grad_fills": zero,
                "triton_s": total_triton, "pytorch_s": total_pytorch,
                "roofline_s": sum(r["roofline_s"] for r in classes.values())}

    def spec_rows(self, indices: Iterable[int], arch: int) -> List[dict]:
        """One row per specialization used by these launches (autotuned calls: the predicted pick), with the
        launches' total FLOPs/bytes/times."""
        rows: Dict[str, dict] = {}
        picked = self.picked(arch)
        for i in indices:
            s = self.spec_of.get((i, arch))
            if s is None or i not in picked:
                continue
            c = self.launch_cost(i, arch)
            r = rows.get(s.key)
            if r is None:
                r = rows[s.key] = {"spec": s, "launches": 0, "flops": 0.0, "bytes": 0, "roofline_s": 0.0,
                                   "predicted_s": 0.0, "max_intensity": 0.0}
            r["launches"] += 1
            r["flops"] += c["flops"] or 0.0
            r["bytes"] += c["bytes"]
            r["roofline_s"] += c["roofline_s"]
            r["predicted_s"] += c["predicted_s"]
            r["max_intensity"] = max(r["max_intensity"], c["intensity"])
        return sorted(rows.values(), key=lambda r: -r["predicted_s"])


# ----------------------------------------------------------------------------------------------
# rules


@dataclasses.dataclass(frozen=True)
class Violation:
    rule: str  # "no-wgmma" | "spills"
    kernel: str
    dtype: str
    config: str  # the kernel's tile constexprs and launch options (divisibility variants collapse)
    detail: str = dataclasses.field(default="", compare=False)

    def key(self) -> str:
        return f"{self.rule} {self.kernel}[{self.dtype}; {self.config}]"


def _config(constexprs: Dict[str, Any], options: Dict[str, Any]) -> str:
    cx = ",".join(f"{k}={v}" for k, v in constexprs.items())
    opt = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
    return f"{cx}; {opt}"


def rule_violations(analysis: "Analysis", gate_json: dict, arch: int = 90) -> List[Violation]:
    """The rules of the module docstring over every recorded launch on ``arch``; one violation per (rule,
    kernel, dtype, tile constexprs, launch options), the worst case in its detail."""
    chip = CHIPS[arch]
    builds = {bd["key"]: bd for bd in gate_json["builds"]}
    found: Dict[str, Violation] = {}
    for s in analysis.specs:
        if s.arch != arch or s.dtype not in LOW_PRECISION:
            continue
        bd = builds[s.key]
        from ftkernels._compile_gate import Build
        config = _config(Build(**bd).meta(), bd["options"])
        name = kernel_name(s.kernel)
        if s.spill_stores or s.spill_loads:
            v = Violation("spills", name, s.dtype, config,
                          f"{s.spill_stores} B spill stores, {s.spill_loads} B spill loads, {s.registers} registers")
            old = found.get(v.key())
            if old is None or int(old.detail.split()[0]) < s.spill_stores:
                found[v.key()] = v
        if s.dots and s.mma != "wgmma":
            worst = max((analysis.launch_cost(i, arch)["intensity"] for i in s.launches), default=0.0)
            if worst > chip.ridge:
                v = Violation("no-wgmma", name, s.dtype, config,
                              f"{s.mma} x{s.mma_count}; up to {worst:.0f} FLOP/B > ridge {chip.ridge:.0f}")
                old = found.get(v.key())
                if old is None or float(old.detail.split("up to ")[1].split()[0]) < worst:
                    found[v.key()] = v
    return sorted(found.values(), key=Violation.key)


def load_known(path: str) -> List[str]:
    with open(path) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


# ----------------------------------------------------------------------------------------------
# rendering


def _si(x: float, unit: str) -> str:
    for div, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f} {p}{unit}"
    return f"{x:.0f} {unit}"


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


CLASS_NAMES = {"multichannel_linear": "multichannel linear", "squared_relu_ffn": "squared-ReLU feed-forward",
               "frame_norm": "frame norm", "squared_relu": "squared ReLU (v4 conv blocks)", "multichannel_attention": "attention"}


def spec_table(rows: List[dict]) -> List[str]:
    out = ["| kernel (specialization) | launches | regs | spills st/ld B | shared KB | occupancy (limiter) | "
           "MMA (static count) | FLOPs | min bytes | max FLOP/B | roofline ms | predicted ms |",
           "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        s = r["spec"]
        out.append(f"| `{s.label}` | {r['launches']} | {s.registers} | {s.spill_stores}/{s.spill_loads} | "
                   f"{s.shared / 1024:.1f} | {s.occupancy * 100:.0f}% ({s.limiter}) | {s.mma} ({s.mma_count}) | "
                   f"{_si(r['flops'], 'FLOP')} | {_si(r['bytes'], 'B')} | {r['max_intensity']:.0f} | "
                   f"{_ms(r['roofline_s'])} | {_ms(r['predicted_s'])} |")
    return out


def step_table(p: dict) -> List[str]:
    out = ["| op class | Triton launches | Triton predicted ms | + PyTorch inside the ops ms | roofline ms | "
           "plain PyTorch kernels | plain PyTorch predicted ms | PyTorch / Triton |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for cls, r in p["classes"].items():
        tri = r.get("triton_s", 0.0) + r.get("torch_inside_s", 0.0)
        pt = r.get("pytorch_s", 0.0)
        out.append(f"| {CLASS_NAMES.get(cls, cls)} | {int(r.get('launches', 0))} | {_ms(r.get('triton_s', 0.0))} | "
                   f"{_ms(r.get('torch_inside_s', 0.0))} ({int(r.get('torch_inside_kernels', 0))} kernels) | "
                   f"{_ms(r.get('roofline_s', 0.0))} | {int(r.get('pytorch_kernels', 0))} | {_ms(pt)} | "
                   f"{pt / tri if tri else 0:.2f}x |")
    z = p["zero_grad_fills"]
    out.append(f"| zero gradients autograd fills for the custom ops | {z['count']} fills | | {_ms(z['s'])} "
               f"({_si(z['bytes'], 'B')}) | | | | |")
    out.append(f"| **total (ops only)** | | | **{_ms(p['triton_s'])}** | {_ms(p['roofline_s'])} | | "
               f"**{_ms(p['pytorch_s'])}** | {p['pytorch_s'] / p['triton_s'] if p['triton_s'] else 0:.2f}x |")
    return out


def render_markdown(analysis: Analysis, workloads: Sequence[str], dtype: str, arch: int,
                    violations: Sequence[Violation], title: str = "") -> str:
    chip = CHIPS[arch]
    lines = [f"## {title or 'Static analysis and prediction'} ({chip.name}, sm_{arch}, {dtype})", "",
             "> **Static analysis and prediction, not a measurement.** Registers, spills and shared memory come "
             "from `ptxas -v` and Triton's metadata for the cubin each launch would run (built on a CPU with the "
             "JIT's runtime specialization); MMA kinds from the SASS; times from the roofline model and the "
             "efficiency assumptions in `ftkernels/static_report.py`.", ""]
    for w in workloads:
        idx = analysis.select(w, dtype)
        if not idx:
            continue
        p = analysis.step_prediction(w, dtype, arch)
        lines += [f"### {w}", "",
                  f"Predicted time of the ftkernels ops: **{_ms(p['triton_s'])} ms**; the same ops as plain "
                  f"PyTorch (cuBLAS, compiled norm/elementwise, SDPA): **{_ms(p['pytorch_s'])} ms**; roofline "
                  f"lower bound of the Triton launches {_ms(p['roofline_s'])} ms.", ""]
        lines += step_table(p) + [""]
        lines += ["Per runtime specialization (sorted by predicted time):", ""]
        lines += spec_table(analysis.spec_rows(idx, arch)) + [""]
    lines += [f"### Rule violations (sm_{arch}, every recorded workload)", ""]
    if violations:
        lines += [f"- `{v.key()}`: {v.detail}" for v in violations]
    else:
        lines.append("none")
    return "\n".join(lines) + "\n"


def to_json(analysis: Analysis, workloads: Sequence[str], dtype: str, arch: int,
            violations: Sequence[Violation]) -> dict:
    out = {"chip": dataclasses.asdict(CHIPS[arch]), "efficiency": EFF, "launch_s": LAUNCH_S, "workloads": {},
           "violations": [dict(dataclasses.asdict(v), key=v.key()) for v in violations]}
    for w in workloads:
        idx = analysis.select(w, dtype)
        if not idx:
            continue
        rows = analysis.spec_rows(idx, arch)
        out["workloads"][w] = {
            "prediction": analysis.step_prediction(w, dtype, arch),
            "specializations": [{**{k: v for k, v in dataclasses.asdict(r["spec"]).items() if k != "launches"},
                                 "sass": sass_summary(r["spec"].sass),
                                 **{k: v for k, v in r.items() if k != "spec"}} for r in rows],
        }
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def analyze(only: Optional[Sequence[str]], dtypes: Sequence[str], archs: Sequence[int], jobs: Optional[int],
            launches: Optional[str] = None, gate_json: Optional[str] = None) -> Tuple[Analysis, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        if launches is None:
            launches = os.path.join(tmp, "launches.json")
            record(launches, only, dtypes)
        if gate_json is None:
            gate_json = os.path.join(tmp, "gate.json")
            r = gate(launches, gate_json, archs, jobs)
            if not os.path.exists(gate_json):
                raise RuntimeError(f"the compile gate failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
        from ftkernels._launch_recorder import load_raw
        rec = load_raw(launches)
        with open(gate_json) as f:
            gj = json.load(f)
    return Analysis(rec, gj), gj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Static performance report of the Triton kernels (static analysis "
                                             "and prediction; nothing runs on a GPU).")
    ap.add_argument("--workload", nargs="*", default=["step:"],
                    help="workloads whose label contains one of these (default: every preset's training step; "
                         "e.g. channels32, step:default, bench:, sweep)")
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--arch", type=int, default=90, choices=sorted(CHIPS))
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--launches", help="reuse a recording (python -m ftkernels._launch_recorder)")
    ap.add_argument("--gate-json", help="reuse a compile-gate result (python -m ftkernels._compile_gate --json)")
    ap.add_argument("--markdown", help="write the report as markdown here")
    ap.add_argument("--json", help="write the report as JSON here")
    a = ap.parse_args(argv)
    analysis, gj = analyze(a.workload, [a.dtype], [a.arch], a.jobs, a.launches, a.gate_json)
    workloads = [w for w in analysis.workloads() if any(s in w for s in a.workload)]
    violations = rule_violations(analysis, gj, a.arch) if a.arch == 90 else []
    md = render_markdown(analysis, workloads, a.dtype, a.arch, violations)
    print(md)
    for f in analysis.failures:
        print("GATE FAILURE", f, file=sys.stderr)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(to_json(analysis, workloads, a.dtype, a.arch, violations), f, indent=1, default=str)
    return 1 if analysis.failures else 0


if __name__ == "__main__":
    sys.exit(main())
