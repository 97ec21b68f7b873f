"""Static estimate: fuse the v4 attention's (1, 3) depth-wise frame conv into its projection GEMM, or not?

    python -m benchmarks.frame_conv_roofline [--preset v4] [--batch 8] [--frames 256] [--arch 90]

STATIC ANALYSIS AND PREDICTION, not a timing. Every q/k/v projection of the v4 attention is
``conv(pw(x))``: a position-wise multichannel linear (per channel an F x F GEMM over the frames) and a
depth-wise ``Conv2d(C, C, (1, 3), groups=C)`` over frames. The conv commutes with the GEMM (it mixes frames with
per-channel scalars, the GEMM mixes features), so it could run as a prologue of the projection kernel.

The model below prices, per projection shape recorded from one forward of the preset (built on the meta
device, nothing executed), with :mod:`ftkernels.static_report`'s chip constants and efficiencies:

* ``gemm``: the projection GEMM forward + backward (dx and dW: 3 x 2 F^2 FLOP per element) on wgmma;
* ``separate``: what the separate conv costs beyond the GEMM (cuDNN depth-wise, memory-bound): forward reads u =
  pw(x) and writes q (2 + 2 B/elt in bf16), backward reads dq and u and writes du (6 B/elt): 10 B/elt;
* ``prologue``: the fused design's extra work. wgmma takes only its A operand from registers, so the conv runs
  on the frame-major A tile (out^T = conv(x)^T W^T): three shifted loads and three fp32 FMAs per A element,
  repeated by every program along F_out (F / BN of them, BN = 128); the backward needs it twice (conv^T on dq
  for dx, conv on x for dW) plus the conv weight's reduction over (W^T dq) * shifted x. Priced as fp32 FMAs on
  the CUDA cores, not overlapped with the tensor cores (an upper bound: wgmma is asynchronous) - and the bytes
  the fusion saves are the ``separate`` column.

The fusion saves at most ``separate`` and costs up to ``prologue``; both are printed against the preset's
whole predicted step when ``--step-ms`` (the ops' total from the static report) is given: that total, plus the
v4 blocks' other convolutions (cuDNN, priced at the wgmma efficiency), plus the frame convs.
"""
from __future__ import annotations

import argparse
import collections
import math
from typing import Dict, Tuple

import torch

from ftkernels import static_report as sr

BYTES_SEPARATE = 10  # bf16: forward 2 + 2, backward 2 + 2 + 2 bytes per element (see the module docstring)
BN = 128  # output-feature tile of the projection kernel


def projection_shapes(preset: str, batch: int, frames: int) -> Dict[Tuple[int, ...], int]:
    """{input shape (B, C, F, W) of a FrameConvProjection: count} in one forward of ``preset``."""
    from frame_transformer.model import PRESETS, FrameConvProjection, FrameTransformer

    cfg = PRESETS[preset]
    with torch.device("meta"):
        net = FrameTransformer(cfg, backend="reference")
    shapes: Dict[Tuple[int, ...], int] = collections.Counter()
    for mod in net.modules():
        if isinstance(mod, FrameConvProjection):
            mod.register_forward_hook(lambda m, inp, out: shapes.update([tuple(inp[0].shape)]))
    with torch.no_grad():
        net(torch.empty(batch, 2, cfg.n_fft // 2, frames, device="meta"))
    return dict(shapes)


def block_conv_seconds(preset: str, batch: int, frames: int, chip: sr.Chip) -> float:
    """The other torch convolutions of one training step (the v4 blocks' 3x3 and 1x1 convs, cuDNN), forward +
    backward (3x the forward FLOPs) at the wgmma efficiency: the part of a v4 step the static report's op
    totals leave out, for the share column."""
    from frame_transformer.model import PRESETS, FrameConvProjection, FrameTransformer

    cfg = PRESETS[preset]
    with torch.device("meta"):
        net = FrameTransformer(cfg, backend="reference")
    frame_convs = {id(m.conv) for m in net.modules() if isinstance(m, FrameConvProjection)}
    flops = []
    for mod in net.modules():
        if isinstance(mod, torch.nn.Conv2d) and id(mod) not in frame_convs:
            mod.register_forward_hook(lambda m, inp, out: flops.append(
                2 * out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]))
    with torch.no_grad():
        net(torch.empty(batch, 2, cfg.n_fft // 2, frames, device="meta"))
    return 3 * sum(flops) / (chip.peak_tc16 * sr.EFF["wgmma"])


def estimate(shape: Tuple[int, ...], count: int, chip: sr.Chip) -> Dict[str, float]:
    """Seconds (forward + backward, all ``count`` projections of ``shape``) for the three columns."""
    B, C, F, W = shape
    elements = B * C * F * W * count
    gemm = 3 * 2 * F * elements / (chip.peak_tc16 * sr.EFF["wgmma"])
    separate = BYTES_SEPARATE * elements / (chip.hbm * sr.EFF["memory"]) + 2 * count * sr.LAUNCH_S
    # forward 1 + backward 2 prologue applications, 3 FMAs each, per program along F_out; + the weight reduction
    fmas = (3 * 3 * math.ceil(F / BN) + 3) * elements
    prologue = 2 * fmas / (chip.peak_fp32 * sr.EFF["FFMA"])
    return dict(gemm=gemm, separate=separate, prologue=prologue)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="v4", help="a v4-architecture preset (default: v4)")
    p.add_argument("--batch", type=int, default=8, help="batch size (default: 8)")
    p.add_argument("--frames", type=int, default=256, help="frames per crop (default: 256)")
    p.add_argument("--arch", type=int, default=90, choices=sorted(sr.CHIPS), help="chip (default: 90, H100)")
    p.add_argument("--step-ms", type=float, default=None,
                   help="the preset's predicted bf16 step from ftkernels.static_report, for the share column")
    args = p.parse_args(argv)
    chip = sr.CHIPS[args.arch]
    shapes = projection_shapes(args.preset, args.batch, args.frames)
    if not shapes:
        p.error(f"preset {args.preset!r} has no frame-conv projections (it is not a v4-architecture preset)")
    print(f"STATIC ESTIMATE ({chip.name}, bf16, forward + backward) - a prediction, not a timing")
    print(f"{'projection input':>22} {'count':>5} {'GEMM ms':>8} {'separate conv ms':>17} {'fused prologue ms':>18}")
    total = collections.Counter()
    for shape, count in sorted(shapes.items()):
        e = estimate(shape, count, chip)
        total.update(e)
        print(f"{str(shape):>22} {count:>5} {e['gemm'] * 1e3:8.3f} {e['separate'] * 1e3:17.3f} "
              f"{e['prologue'] * 1e3:18.3f}")
    print(f"{'total':>22} {sum(shapes.values()):>5} {total['gemm'] * 1e3:8.3f} {total['separate'] * 1e3:17.3f} "
          f"{total['prologue'] * 1e3:18.3f}")
    if args.step_ms:
        convs = block_conv_seconds(args.preset, args.batch, args.frames, chip) * 1e3
        step = args.step_ms + convs + total["separate"] * 1e3
        print(f"step: {args.step_ms:.1f} ms of ftkernels ops (the static report) + {convs:.1f} ms of block convs + "
              f"{total['separate'] * 1e3:.1f} ms of frame convs = {step:.1f} ms; the separate frame convs are "
              f"{100 * total['separate'] * 1e3 / step:.1f}% of it, the most a fusion could save "
              f"(less its prologue: {100 * (total['separate'] - total['prologue']) * 1e3 / step:.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
