"""Train the FrameTransformer vocal remover on a voxaug library.

examples:
  frame-transformer-train
      demo: synthesises a small library under runs/synth_data and trains the tiny model in runs/demo
  frame-transformer-train --instrumentals I --vocals V --val-instrumentals VI --val-vocals VV --out runs/real
      your audio: folders of instrumental tracks and vocal stems (any file names; mixed at random, "voxaug")
  frame-transformer-train --out runs/real --resume
      continue the run in runs/real exactly where its checkpoint stopped
  frame-transformer-train --out runs/real --resume --epochs 40 --lr 2e-4
      extend a run; options given on the command line replace the saved ones (the change is logged)
  torchrun --nproc_per_node N -m frame_transformer.train ...
      DistributedDataParallel (NCCL on GPUs, gloo on the CPU)

"python -m frame_transformer.train" and "python train.py" (in the repository) run the same command.

Loss: L1 between X * mask and Y (magnitudes scaled as --normalize says; v4 models: below the Nyquist bin, as
upstream). Linear warmup to --lr, then polynomial decay to --min-lr-ratio * --lr at the last step. The schedule
is a function of the global step and of the current options: resuming with other --epochs/--curriculum/--lr/
--warmup-steps recomputes it, so the run continues with the rate a run started with those options would have at
that step (extending a finished run with linear decay and twice the epochs resumes at half the peak rate).

Recipes (every option's default depends on --preset; see -h). The all-linear presets (tiny, default, micro):
AdamW, items scaled by their own maximum, one crop size for --epochs. The v4 presets follow upstream's train4.py
(kingoomieiii/frame-transformer @ 7bdd31d) and its voxaug dataset: Adam at 1e-4 without weight decay, gradient
norm clipped at 0.5, a curriculum of crop sizes (v4: 256 frames for 400000 steps at batch 3 x accumulation 3,
then 512 frames for 500000 steps at batch 1 x 8; upstream switches by epoch, at 0-based epoch 26 of 40, and
states those step counts in its --steps default), items scaled by their source song's maximum and clipped to
[0, 1], the target clipped to the mixture (--normalize song --clip-target; frame_transformer/data.py says exactly
how), upstream's augmentation probabilities (--augment upstream), warmup lr/3, 2lr/3, lr (upstream's
--warmup_steps 2 is our 3), then linear decay. Upstream's decay (to 1e-12, power 1) ends after (first-stage
steps per epoch x 40 - 2) steps, which is not its run's length (the second stage has more steps per epoch; its
rate then dips slightly below 0 and stays there); ours reaches 0 at the curriculum's last step. Upstream trains
in fp16 with a GradScaler; on CUDA this trains under bf16 autocast (no scaler needed).

--init-from PATH starts a new run from a model's weights (an upstream v4 state_dict as train4.py saves it, a
converted one, or a train.py checkpoint): the architecture comes from the file, the optimizer and schedule start
fresh. --resume continues a run (weights, optimizer, schedule, data position, RNG).

Everything lives in --out: checkpoint.pt (model, optimizer, step, position in the epoch, RNG states, options;
written atomically), log.csv, train.log, loss.png (+ TensorBoard in tb/ if installed), the spectrogram cache.
A new run refuses an --out that already holds one (continue it with --resume, or --overwrite).
Checkpoints are written after every epoch, every --save-every-minutes / --save-every-steps, at the end, and on
Ctrl-C or SIGTERM (then the run stops with exit status 130 / 143; a second Ctrl-C stops without saving).
Resuming a mid-epoch checkpoint continues bitwise identically on the same device and process count, across
curriculum stages too.

Every validation (after each epoch, on --val-items fixed mixes of --val-cropsize frames) reports L1, the vocals
SDR as BSS-eval v4 computes it (museval's image SDR on 1 s windows, the median over an item's windows where no
source is silent, then the median over items: what frame_transformer.evaluate reports per track, here per
validation item), the vocals uSDR (mean over items) and the mask's statistics. A collapsed run (validation L1
unchanged and the mask stuck at 0 or 1: the separator passes everything through) stops with its likely cause.
Exit status: 0 done, 1 unexpected error, 2 bad command line or data, 3 training failed (collapse, non-finite
losses), 130/143 interrupted.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import glob
import math
import os
import random
import signal
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from frame_transformer import audio
from frame_transformer.data import AUGMENTATIONS, NORMALIZATIONS, DataError, ResumableDistributedSampler, \
    SpectrogramCache, build_dataset, collect_files
from frame_transformer.metrics import batch_sdr, bss_eval_v4_sdr
from frame_transformer.model import PRESETS, FrameTransformer, ModelConfig, preset

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = 2
EXIT_USAGE, EXIT_FAILED, EXIT_SIGINT, EXIT_SIGTERM = 2, 3, 130, 143


class UsageError(Exception):
    """A mistake on the command line or in the data: one line for the user, exit status 2."""


class TrainingFailed(Exception):
    """The run cannot usefully go on (collapse, non-finite losses): one line, exit status 3."""


# ---------------------------------------------------------------------------------------------------------------
# 1. options: command line, per-preset defaults, merging with a resumed checkpoint
# ---------------------------------------------------------------------------------------------------------------
# Training defaults per model preset (options left unset on the command line). Measured on speech-over-instruments
# audio (issue 10): tiny at lr 2e-3 with 20 warmup steps drove every mask logit to about +30 within 25 steps and
# the run never came back (sigmoid saturated: its gradient is ~1e-13; vocals all zeros), because about half of the
# spectrogram bins want a mask >= 1 (silences between words, items without vocals, phase cancellation) and a high
# rate follows that pull before the model tells voice from instruments. lr 1e-3 with 20 warmup steps saturated too;
# 5e-4 and 1e-3 with 100 warmup steps learned on every seed tried. The default preset keeps the seed's 1e-4 / 2000.
_LINEAR = dict(optimizer="adamw", weight_decay=0.01, clip=1.0, accum=1, normalize="crop", clip_target=False,
               augment="standard", curriculum="none")
# upstream's train4.py @ 7bdd31d (module docstring); cropsize/epochs/batch_size/accum apply with --curriculum none
_V4 = dict(optimizer="adam", weight_decay=0.0, clip=0.5, normalize="song", clip_target=True, augment="upstream",
           lr=1e-4, warmup_steps=3)
PRESET_DEFAULTS: Dict[str, dict] = {
    "micro": dict(_LINEAR, cropsize=32, epochs=4, batch_size=4, lr=5e-4, warmup_steps=50, epoch_size=128),
    "tiny": dict(_LINEAR, cropsize=64, epochs=12, batch_size=4, lr=5e-4, warmup_steps=100, epoch_size=256),
    "default": dict(_LINEAR, cropsize=256, epochs=100, batch_size=8, lr=1e-4, warmup_steps=2000, epoch_size=8000),
    "linear": dict(_LINEAR, cropsize=256, epochs=100, batch_size=8, lr=1e-4, warmup_steps=2000, epoch_size=8000),
    "v4": dict(_V4, curriculum="256:400000:3:3,512:500000:1:8", epoch_size=18000, cropsize=256, epochs=50,
               batch_size=3, accum=3),
    # upstream's recipe at CPU scale (800 steps, ~7 min): crops 64 then 128 frames (n_fft 256, hop 128) and a rate
    # for a short schedule: on speech-over-instruments audio (README) lr 5e-4 reached a median test vocals SDR of
    # 1.59 / 1.76 dB (seeds 0 / 1), upstream's 1e-4 1.05 / 1.56 dB (the mixture itself: -14.54 dB)
    "v4-tiny": dict(_V4, curriculum="64:600:3:1,128:200:1:3", epoch_size=240, cropsize=64, epochs=8, batch_size=3,
                    accum=1, lr=5e-4),
    "v4-micro": dict(_V4, curriculum="16:60:3:1,32:20:1:3", epoch_size=48, cropsize=16, epochs=4, batch_size=3,
                     accum=1),
}
# options that define the model or its input: a resumed run cannot change them
ARCHITECTURE = ("preset", "channels", "n_fft", "num_heads", "expansion", "num_attention_maps", "channel_mults",
                "levels", "dropout", "sr", "hop")
# set by a curriculum's stages: given on the command line beside a curriculum they are an error
STAGE_OPTIONS = ("cropsize", "batch_size", "accum", "epochs")
# never taken from the checkpoint: they describe this invocation, not the run
NOT_SAVED = ("resume", "out", "overwrite", "stop_after_steps", "no_progress", "inject_nan_at", "threads", "device",
             "workers", "log_every_steps")
DATA_FOLDERS = ("instrumentals", "vocals", "pairs", "val_instrumentals", "val_vocals", "val_pairs", "synth_dir",
                "cache_dir", "init_from")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of training: crop frames, micro-batch, accumulation, and its optimizer steps (None: the single
    stage of a run without a curriculum, which lasts --epochs)."""
    cropsize: int
    batch_size: int
    accum: int
    steps: Optional[int] = None

    @property
    def items(self) -> int:
        """Items per optimizer step and process."""
        return self.batch_size * self.accum

    def __str__(self) -> str:
        return f"crop {self.cropsize} frames, batch {self.batch_size} x accum {self.accum}"


def parse_curriculum(text: str) -> List[Stage]:
    """"CROP:STEPS:BATCH[:ACCUM],..." -> stages ([] for "none"); ValueError naming the bad stage."""
    if text is None or text.strip().lower() == "none":
        return []
    stages = []
    for part in text.split(","):
        fields = part.strip().split(":")
        try:
            values = [int(f) for f in fields]
        except ValueError:
            values = []
        if len(values) not in (3, 4) or min(values) < 1:
            raise ValueError(f"stage {part.strip()!r} is not CROP:STEPS:BATCH[:ACCUM] with positive integers "
                             f"(e.g. 256:400000:3:3,512:500000:1:8, or none)")
        crop, steps, batch = values[:3]
        stages.append(Stage(crop, batch, values[3] if len(values) == 4 else 1, steps))
    return stages


def _curriculum(s: str) -> str:
    try:
        stages = parse_curriculum(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return ",".join(f"{t.cropsize}:{t.steps}:{t.batch_size}:{t.accum}" for t in stages) or "none"


def _int_list(s: str) -> List[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def prog() -> str:
    """``frame-transformer-train`` (console script) or ``train.py`` (python -m frame_transformer.train, the shim)."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return name if name in ("frame-transformer-train", "train.py") else "frame-transformer-train"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends ``(default: X)`` where the help does not say it."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default is argparse.SUPPRESS:
            return h
        if action.default is False:
            return h + " (default: off)"
        return h + " (default: %(default)s)"


def preset_defaults_help(key: str) -> str:
    """"default per --preset: micro, tiny 0.0005; default, linear, v4, v4-tiny, v4-micro 0.0001" (presets with the
    same default grouped, in PRESET_DEFAULTS' order)."""
    groups: Dict[str, List[str]] = {}
    for name, d in PRESET_DEFAULTS.items():
        v = d[key]
        groups.setdefault("on" if v is True else "off" if v is False else str(v), []).append(name)
    return "default per --preset: " + "; ".join(f"{', '.join(names)} {v}" for v, names in groups.items())


def build_parser() -> argparse.ArgumentParser:
    pd = preset_defaults_help

    p = _Parser(prog=prog(), description=__doc__, formatter_class=_HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--instrumentals", metavar="DIR", help="folder of instrumental tracks (default: none: the demo)")
    g.add_argument("--vocals", metavar="DIR", help="folder of vocal stems, mixed at random with the instrumentals "
                   "(default: none; required with --instrumentals)")
    g.add_argument("--pairs", metavar="DIR", help="folder with mixtures/ and instrumentals/ of matching file names "
                   "(default: none)")
    g.add_argument("--val-instrumentals", metavar="DIR", help="held-out instrumentals for validation "
                   "(default: fixed plain mixes of the training files)")
    g.add_argument("--val-vocals", metavar="DIR", help="held-out vocals for validation (default: as above)")
    g.add_argument("--val-pairs", metavar="DIR", help="held-out pairs folder for validation (default: none)")
    g.add_argument("--synth-dir", metavar="DIR", default="runs/synth_data",
                   help="where the demo library is synthesised when no data folders are given")
    g.add_argument("--synth-tracks", type=int, default=16, help="demo library: number of tracks")
    g.add_argument("--synth-seconds", type=float, default=8.0, help="demo library: seconds per track")
    g.add_argument("--cache-dir", metavar="DIR", help="spectrogram cache (default: OUT/cache)")
    g.add_argument("--sr", type=int, help="sample rate (default: 16000 for the demo data, else 44100)")
    g.add_argument("--hop", type=int, help="STFT hop (default: n_fft // 2)")
    g.add_argument("--cropsize", type=int,
                   help="frames per training item, without a curriculum (" + pd("cropsize") + ")")
    g.add_argument("--epoch-size", type=int,
                   help="items per epoch; voxaug mixes are unlimited (" + pd("epoch_size") + ")")
    g.add_argument("--val-items", type=int, default=32, help="validation items (fixed mixes)")
    g.add_argument("--val-cropsize", type=int, help="frames per validation item (default: the largest training crop)")
    g.add_argument("--normalize", choices=NORMALIZATIONS,
                   help="item scale: crop = the item's own mixture maximum; song = its source song's maximum taken "
                        "before mixing, then clipped to [0, 1] (upstream v4; frame_transformer/data.py) ("
                        + pd("normalize") + ")")
    g.add_argument("--clip-target", action=argparse.BooleanOptionalAction,
                   help="clip the target to the mixture, Y = min(Y, X): no bin asks for a mask above 1 (upstream v4) ("
                        + pd("clip_target") + ")")
    g.add_argument("--augment", choices=sorted(AUGMENTATIONS),
                   help="voxaug augmentation probabilities: standard (this project's) or upstream (its v4 dataset) ("
                        + pd("augment") + ")")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="model and training recipe: v4 (the seed's published model, upstream's recipe), v4-tiny "
                        "(v4 at CPU size), v4-micro (tests); the all-linear network: default = linear (n_fft 2048), "
                        "tiny (CPU), micro (tests) (default: the --init-from model's; else default for real data "
                        "on CUDA, else tiny)")
    g.add_argument("--channels", type=int, help="base channels (default: the preset's)")
    g.add_argument("--n-fft", type=int, help="STFT size (default: the preset's)")
    g.add_argument("--num-heads", type=int, help="attention heads (default: the preset's)")
    g.add_argument("--expansion", type=float, help="transformer feed-forward expansion (default: the preset's)")
    g.add_argument("--num-attention-maps", type=_int_list, metavar="N,N,...",
                   help="attention maps per level (default: the preset's)")
    g.add_argument("--channel-mults", type=_int_list, metavar="N,N,...",
                   help="channel multiplier per level (default: the preset's)")
    g.add_argument("--levels", type=int, help="U-Net levels (default: the preset's)")
    g.add_argument("--dropout", type=float, help="dropout (default: the preset's)")
    g.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"], help="ftkernels backend")
    g = p.add_argument_group("optimisation")
    g.add_argument("--curriculum", type=_curriculum, metavar="CROP:STEPS:BATCH:ACCUM,...",
                   help="training stages, each with its crop frames, optimizer steps, micro-batch and gradient "
                        "accumulation; the run ends after the last stage, an epoch (--epoch-size items) is the "
                        "interval between validations; none = one stage of --cropsize, --batch-size, --accum for "
                        "--epochs (" + pd("curriculum") + ")")
    g.add_argument("--epochs", type=int, help="epochs, without a curriculum; with --resume, the new total ("
                   + pd("epochs") + ")")
    g.add_argument("--batch-size", type=int, help="items per micro-batch and process, without a curriculum ("
                   + pd("batch_size") + ")")
    g.add_argument("--accum", type=int, help="gradient accumulation: micro-batches per optimizer step, without a "
                   "curriculum (" + pd("accum") + ")")
    g.add_argument("--optimizer", choices=["adam", "adamw"], help="Adam (L2 weight decay, as upstream) or AdamW "
                   "(decoupled) (" + pd("optimizer") + ")")
    g.add_argument("--lr", type=float, help="peak learning rate (" + pd("lr") + ")")
    g.add_argument("--weight-decay", type=float, help="weight decay (" + pd("weight_decay") + ")")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (" + pd("warmup_steps") + ")")
    g.add_argument("--power", type=float, default=1.0, help="polynomial decay power after warmup (1 = linear)")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="final learning rate as a fraction of --lr")
    g.add_argument("--clip", type=float, help="gradient-norm clipping, 0 = off (" + pd("clip") + ")")
    g.add_argument("--no-amp", action="store_true", help="disable bf16 autocast on CUDA")
    g.add_argument("--max-nan", type=int, default=10, help="stop after this many non-finite steps in a row")
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", default="runs/demo", help="run folder: checkpoint, logs, cache")
    g.add_argument("--resume", nargs="?", const="auto", metavar="CKPT",
                   help="continue the run in --out from OUT/checkpoint.pt, or from CKPT (then --out defaults to "
                        "CKPT's folder); options given on the command line replace the saved ones (default: off)")
    g.add_argument("--overwrite", action="store_true", help="start a new run in an --out that already holds one")
    g.add_argument("--init-from", metavar="PATH",
                   help="start a new run from a model's weights: an upstream v4 state_dict (as train4.py saves it), "
                        "a converted one or a train.py checkpoint; the architecture comes from it (model options "
                        "that contradict it are an error), the optimizer and schedule start fresh (default: off)")
    g.add_argument("--save-every-minutes", type=float, default=10.0,
                   help="also checkpoint when this much time passed since the last save (0 = off)")
    g.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps (0 = off)")
    g.add_argument("--log-every-steps", type=int, default=0,
                   help="print a line with the train loss every N steps (0 = per epoch only)")
    g.add_argument("--seed", type=int, default=0, help="seed of the model, the data order and the mixes")
    g.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--threads", type=int,
                   help="torch CPU threads (default: 1 when training on the CPU: the model's many small matmuls run "
                        "several times slower with more threads here; torch's default on CUDA)")
    g.add_argument("--stop-after-steps", type=int, help="stop (and checkpoint) once this many optimizer steps are "
                   "done; the schedule is unchanged (default: off)")
    g.add_argument("--no-initial-val", action="store_true", help="skip validating the untrained model")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--inject-nan-at", default="", help=argparse.SUPPRESS)  # testing: "3,4" or "all"
    return p


def explicit_options(parser: argparse.ArgumentParser, argv: List[str]) -> set:
    """Names of the options given on the command line (argparse fills in defaults for the others)."""
    probe = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for a in parser._actions:
        if a.option_strings and not isinstance(a, argparse._HelpAction):
            flag = isinstance(a, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
            kw = dict(dest=a.dest, action="store_true") if flag else dict(dest=a.dest, nargs=a.nargs, const=a.const)
            probe.add_argument(*a.option_strings, **kw)
    ns, _ = probe.parse_known_args(argv)
    return set(vars(ns))


def read_checkpoint(path: str) -> dict:
    """Load and check a train.py checkpoint (on the CPU); a UsageError names what is wrong with the file."""
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT)
    if not os.path.exists(path):
        raise UsageError(f"--resume: no checkpoint at {path}; start a new run without --resume, or give one: "
                         f"--resume PATH/{CHECKPOINT}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UsageError(f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); it may be truncated or not a "
                         f"train.py checkpoint") from None
    need = ("model", "optimizer", "step", "epoch", "config")
    if not isinstance(ck, dict) or any(k not in ck for k in need) or "args" not in ck.get("config", {}):
        raise UsageError(f"--resume: {path} is not a train.py checkpoint (it lacks "
                         f"{[k for k in need if not isinstance(ck, dict) or k not in ck] or ['config.args']})")
    return ck


def resolve_options(argv: Optional[List[str]] = None):
    """Parse the command line; with --resume merge the checkpoint's options, with --init-from take the model's.
    Returns (args, checkpoint to resume or None, notes: the saved options that the command line replaced, for the
    log, init: the --init-from weights or None)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    given = explicit_options(parser, argv)
    if args.resume and "init_from" in given:
        raise UsageError("--init-from starts a new run from a model's weights and --resume continues a run: give one "
                         "of them")
    ck, notes = merge_resumed_options(args, given) if args.resume else (None, [])
    check_data_options(args)
    init = read_init(args, given) if args.init_from and ck is None else None
    fill_defaults(args, given)
    if ck is not None:
        check_same_model(args, ck, given)
    return args, ck, notes, init


def merge_resumed_options(args, given: set):
    """Read the checkpoint of --resume (before anything else happens) and take its options for those not given.
    The run folder is --out when given, else the checkpoint's folder: a moved or copied run resumes in place."""
    if args.resume == "auto":
        path = os.path.join(args.out, CHECKPOINT)
    else:
        path = os.path.join(args.resume, CHECKPOINT) if os.path.isdir(args.resume) else args.resume
        if "out" not in given:
            args.out = os.path.dirname(os.path.abspath(path))
    ck = read_checkpoint(path)
    args.resume = os.path.abspath(path)
    notes = []
    for k, v in ck["config"]["args"].items():
        if k in NOT_SAVED or not hasattr(args, k) and k != "init_model":
            continue
        if k not in given:
            setattr(args, k, v)
        elif k not in ARCHITECTURE and getattr(args, k) != v:
            notes.append(f"{k} {v} -> {getattr(args, k)}")
    if "optimizer" in given and ck["config"]["args"].get("optimizer", "adamw") != args.optimizer:
        raise UsageError(f"--optimizer {args.optimizer} conflicts with the resumed run's optimizer "
                         f"{ck['config']['args'].get('optimizer', 'adamw')}: its state does not carry over; start a "
                         f"new run from these weights with --init-from {path}")
    return ck, notes


def check_data_options(args) -> None:
    """Folder options that only work together; data folders become absolute (saved so, for a resume anywhere)."""
    for a, b in (("instrumentals", "vocals"), ("val_instrumentals", "val_vocals")):
        if bool(getattr(args, a)) != bool(getattr(args, b)):
            have, miss = (a, b) if getattr(args, a) else (b, a)
            raise UsageError(f"--{have.replace('_', '-')} needs --{miss.replace('_', '-')}: voxaug mixes every "
                             f"instrumental with random vocal stems (or give --pairs DIR with mixtures/ and "
                             f"instrumentals/)")
    if not (args.instrumentals or args.pairs) and (args.val_instrumentals or args.val_pairs):
        raise UsageError("validation folders were given without training data: add --instrumentals and --vocals "
                         "(or --pairs)")
    for k in DATA_FOLDERS:
        if getattr(args, k):
            setattr(args, k, os.path.abspath(getattr(args, k)))


# ModelConfig field -> command-line option
MODEL_OPTIONS = dict(channels="channels", n_fft="n_fft", num_heads="num_heads", expansion="expansion",
                     num_attention_maps="num_attention_maps", channel_mults="channel_mults", num_levels="levels",
                     dropout="dropout")


def read_init(args, given: set) -> dict:
    """Load the --init-from model (on the CPU, through frame_transformer.upstream.load_model) and take its
    architecture: ``args.init_model`` (its ModelConfig), the preset whose recipe applies, sr and hop. Model options
    given on the command line must agree with it (--dropout may change: it is not in the weights)."""
    from frame_transformer.upstream import CheckpointError, load_model

    try:
        model, info = load_model(args.init_from, device="cpu")
    except (OSError, CheckpointError) as e:
        raise UsageError(f"--init-from: {e}") from None
    cfg = dict(info["model"])
    for field, opt in MODEL_OPTIONS.items():
        value = getattr(args, opt)
        if opt in given and opt != "dropout" and value != cfg.get(field) and not (
                field == "num_levels" and value == len(cfg["num_attention_maps"])):
            raise UsageError(f"--{opt.replace('_', '-')} {value} conflicts with the --init-from model's {field} "
                             f"{cfg.get(field)}: its architecture comes from {args.init_from}; drop the option")
    same = lambda c: {k: v for k, v in c.to_dict().items() if k != "dropout"} == \
        {k: v for k, v in cfg.items() if k != "dropout"}
    if "preset" in given:
        if not same(PRESETS[args.preset]):
            raise UsageError(f"--preset {args.preset} conflicts with the --init-from model ({cfg['architecture']}, "
                             f"channels {cfg['channels']}, n_fft {cfg['n_fft']}): its architecture comes from "
                             f"{args.init_from}; drop --preset")
    else:  # the recipe of the preset it is, else of its architecture's preset at its n_fft, else of the full size
        kin = [n for n, c in PRESETS.items() if c.architecture == cfg["architecture"]]
        args.preset = next((n for n in kin if same(PRESETS[n])), None) or next(
            (n for n in kin if PRESETS[n].n_fft == cfg["n_fft"]), "v4" if cfg["architecture"] == "v4" else "default")
    if args.dropout is not None:
        cfg["dropout"] = args.dropout
    args.init_model = cfg
    if info.get("format") == "ftkernels":  # our checkpoints know their input; upstream's sr/hop are assumptions
        args.sr = args.sr or info.get("sr")
        args.hop = args.hop or info.get("hop")
    return dict(path=args.init_from, state_dict=model.state_dict(), format=info.get("format"))


def fill_defaults(args, given: set = frozenset()) -> None:
    """Options still unset take their preset's defaults (the preset: default for real data on CUDA, else tiny);
    a curriculum then sets the crop, batch and accumulation per stage."""
    synthetic = not (args.instrumentals or args.pairs)
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    args.preset = args.preset or ("default" if cuda and not synthetic else "tiny")
    if not hasattr(args, "init_model"):
        args.init_model = None
    for k, v in dict(PRESET_DEFAULTS[args.preset], sr=16000 if synthetic else 44100).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.hop = args.hop or model_config(args).n_fft // 2
    try:
        stages = parse_curriculum(args.curriculum)
    except ValueError as e:
        raise UsageError(f"--curriculum: {e}") from None
    if stages:
        clash = [k for k in STAGE_OPTIONS if k in given]
        if clash:
            k = clash[0]
            raise UsageError(f"--{k.replace('_', '-')} conflicts with the curriculum {args.curriculum} (its stages set "
                             f"the crop, batch, accumulation and length): give the stages with --curriculum "
                             f"CROP:STEPS:BATCH:ACCUM,... or train one stage with --curriculum none")
        args.cropsize = stages[-1].cropsize  # what inference uses (upstream: the last stage's 512)
        args.batch_size = args.accum = args.epochs = None
    for k in ("epochs", "batch_size", "epoch_size", "cropsize", "accum", "val_items", "val_cropsize"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be at least 1, got {getattr(args, k)}")
    args.val_cropsize = args.val_cropsize or max(t.cropsize for t in stages or [Stage(args.cropsize, 1, 1)])
    if args.lr <= 0:
        raise UsageError(f"--lr must be positive, got {args.lr}")


def check_same_model(args, ck: dict, given: set) -> None:
    """A resumed run keeps its model and input: an option that would change them is a usage error."""
    now, saved = model_config(args).to_dict(), ck["config"]["model"]
    diffs = [(MODEL_OPTIONS.get(k, k), now[k], saved.get(k)) for k in now if k in saved and now[k] != saved[k]]
    diffs += [(k, getattr(args, k), ck["config"].get(k)) for k in ("sr", "hop")
              if ck["config"].get(k) is not None and getattr(args, k) != ck["config"][k]]
    if "preset" in given and args.preset != ck["config"]["args"].get("preset"):
        diffs.insert(0, ("preset", args.preset, ck["config"]["args"].get("preset")))
    if diffs:
        opt, new, old = diffs[0]
        raise UsageError(f"--{opt.replace('_', '-')} {new} conflicts with the resumed run's {opt} {old}: a run cannot "
                         f"change its model or input; drop the option, or start a new run in another --out")


def model_config(args) -> ModelConfig:
    """The model: the --init-from model's configuration, else the preset's, with the model options given."""
    over = dict(channels=args.channels, n_fft=args.n_fft, num_heads=args.num_heads, expansion=args.expansion,
                num_attention_maps=args.num_attention_maps, channel_mults=args.channel_mults,
                num_levels=args.levels, dropout=args.dropout)
    if getattr(args, "init_model", None):
        return dataclasses.replace(ModelConfig(**args.init_model), **({} if args.dropout is None else
                                                                      dict(dropout=args.dropout)))
    return preset(args.preset, **{k: v for k, v in over.items() if v is not None})


def stages(args) -> List[Stage]:
    """The run's stages: the curriculum's, or one stage of --cropsize/--batch-size/--accum (steps None)."""
    return parse_curriculum(args.curriculum) or [Stage(args.cropsize, args.batch_size, args.accum)]


def stage_at(args, step: int) -> Tuple[int, Stage]:
    """(index, stage) of optimizer step ``step`` (0-based); past the curriculum's end, its last stage."""
    end = 0
    all_stages = stages(args)
    for i, st in enumerate(all_stages):
        if st.steps is None:
            return i, st
        end += st.steps
        if step < end:
            return i, st
    return len(all_stages) - 1, all_stages[-1]


def curriculum_steps(args) -> Optional[int]:
    """Optimizer steps of the whole curriculum, or None without one."""
    st = parse_curriculum(args.curriculum)
    return sum(t.steps for t in st) if st else None


# ---------------------------------------------------------------------------------------------------------------
# 2. the run: processes, devices, everything the pieces below share
# ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    device: torch.device
    rank: int = 0
    world: int = 1
    model: Optional[FrameTransformer] = None
    ddp: Optional[torch.nn.Module] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    train_set: object = None
    val_set: object = None
    sampler: Optional[ResumableDistributedSampler] = None
    loader_gen: Optional[torch.Generator] = None
    items_per_epoch: int = 0  # per process: --epoch-size // processes
    total_steps: int = 0
    step: int = 0            # optimizer steps done (skipped non-finite steps included)
    epoch: int = 0           # epochs completed
    epoch_items: int = 0     # items of the current epoch consumed by this process
    nan_total: int = 0
    nan_run: int = 0
    history: List[dict] = dataclasses.field(default_factory=list)
    log: object = None
    stop_signal: int = 0     # set by the SIGINT/SIGTERM handler
    armed: bool = False      # a signal before training starts stops at once (nothing to save)
    last_save: float = 0.0
    val_baseline: float = float("nan")  # BSS-eval v4 vocals SDR of the mixture itself on the validation items

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.args.out, CHECKPOINT)


def setup_processes(args) -> Run:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" or args.threads:
        torch.set_num_threads(args.threads or 1)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Run(args, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Run(args, device, rank=dist.get_rank(), world=dist.get_world_size())


def barrier(run: Run) -> None:
    if run.distributed:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# 3. data: the demo library or the user's folders -> spectrogram cache -> voxaug datasets
# ---------------------------------------------------------------------------------------------------------------
def data_folders(args):
    """(train (instrumentals, vocals, pairs), validation (...)) folders; the demo library is synthesised."""
    if not (args.instrumentals or args.pairs):
        from frame_transformer import synth

        paths = synth.make_library(args.synth_dir, sr=args.sr, tracks=args.synth_tracks, seconds=args.synth_seconds,
                                   seed=0, verbose=False)
        return (paths["instrumentals"], paths["vocals"], None), (paths["val_instrumentals"], paths["val_vocals"], None)
    train = (args.instrumentals, args.vocals, args.pairs)
    val = (args.val_instrumentals, args.val_vocals, args.val_pairs)
    return train, (val if (val[0] or val[2]) else train)  # no held-out folders: plain mixes of the training files


def check_folders(args) -> None:
    """Missing or audio-less data folders are usage errors, found before anything is cached."""
    for k in ("instrumentals", "vocals", "val_instrumentals", "val_vocals"):
        folder = getattr(args, k)
        if folder and not collect_files(folder, f"--{k.replace('_', '-')}"):
            raise DataError(f"--{k.replace('_', '-')} {folder} holds no audio files "
                            f"({', '.join(audio.AUDIO_EXTENSIONS)}); point it at a folder of tracks")
    for k in ("pairs", "val_pairs"):
        folder = getattr(args, k)
        if folder:
            for sub in ("mixtures", "instrumentals"):
                if not collect_files(os.path.join(folder, sub), f"--{k.replace('_', '-')}"):
                    raise DataError(f"--{k.replace('_', '-')} {folder}/{sub} holds no audio files; a pairs folder "
                                    f"has mixtures/ and instrumentals/ with matching file names")


def load_data(run: Run) -> None:
    a = run.args
    cfg = model_config(a)
    if run.main and not (a.instrumentals or a.pairs):  # rank 0 synthesises the demo library first
        from frame_transformer import synth

        synth.make_library(a.synth_dir, sr=a.sr, tracks=a.synth_tracks, seconds=a.synth_seconds, seed=0)
    barrier(run)
    (inst, voc, pairs), (v_inst, v_voc, v_pairs) = data_folders(a)
    cache = SpectrogramCache(a.cache_dir or os.path.join(a.out, "cache"), a.sr, cfg.n_fft, a.hop)
    if run.main:  # rank 0 fills the cache, the others then find it there
        build_dataset(cache, inst, voc, pairs, progress=not a.no_progress)
        build_dataset(cache, v_inst, v_voc, v_pairs, progress=not a.no_progress)
    barrier(run)
    scaling = dict(normalize=a.normalize, **AUGMENTATIONS[a.augment])
    run.train_set = build_dataset(cache, inst, voc, pairs, cropsize=stage_at(a, run.step)[1].cropsize,
                                  epoch_size=a.epoch_size, seed=a.seed, augment=True, clip_target=a.clip_target,
                                  **scaling)
    # validation: plain mixes, scaled as in training, the target not clipped (as upstream validates)
    run.val_set = build_dataset(cache, v_inst, v_voc, v_pairs, cropsize=a.val_cropsize, epoch_size=a.val_items,
                                seed=a.seed + 7919, augment=False, return_complex=True, **scaling)
    t = run.train_set
    run.log(f"data: {len(t.instrumentals)} instrumentals, {len(t.vocals)} vocals, {len(t.pairs)} pairs "
            f"({len(cache.failed)} unreadable skipped); {len(run.val_set)} validation items of {a.val_cropsize} frames "
            f"({a.val_cropsize * a.hop / a.sr:.2f} s); items scaled per {a.normalize}"
            f"{', target clipped to the mixture' if a.clip_target else ''}, {a.augment} augmentation")


def epoch_loader(run: Run, stage: Stage) -> DataLoader:
    """This epoch's batches of ``stage`` from where the run stands in it (the sampler skips the items already
    seen; a curriculum stage that starts mid-epoch continues the same epoch's item order at its crop size)."""
    a = run.args
    run.train_set.set_epoch(run.epoch)
    run.train_set.cropsize = stage.cropsize
    run.sampler.set_epoch(run.epoch)
    run.sampler.set_start(run.epoch_items)
    return DataLoader(run.train_set, batch_size=stage.batch_size, sampler=run.sampler, num_workers=a.workers,
                      generator=run.loader_gen, drop_last=True, pin_memory=run.device.type == "cuda",
                      worker_init_fn=_ignore_sigint if a.workers else None)


def _ignore_sigint(worker_id: int) -> None:
    """DataLoader workers leave Ctrl-C to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------------------------
# 4. model
# ---------------------------------------------------------------------------------------------------------------
def build_model(run: Run, init: Optional[dict] = None) -> None:
    """The model of the options, seeded; with ``init`` (--init-from) its weights are the checkpoint's."""
    a = run.args
    torch.manual_seed(a.seed)
    run.model = FrameTransformer(model_config(a), backend=a.backend)
    if init is not None:
        run.model.load_state_dict(init["state_dict"])
    run.model.to(run.device)
    run.ddp = run.model
    if run.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        run.ddp = DDP(run.model, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    source = f"; weights from {init['path']} ({init['format']})" if init is not None else ""
    run.log(f"FrameTransformer ({a.preset}{', the --init-from model' if init is not None else ''}): "
            f"{run.model.num_parameters():,} parameters{source}")
    if run.device.type == "cpu" and run.model.num_parameters() > 20_000_000:
        run.log("note: a model this size trains on the CPU at many seconds per item; use a GPU (--device cuda), or "
                "--preset v4-tiny / tiny on the CPU")


def loss_bins(run: Run) -> int:
    """Frequency bins the loss covers: v4 leaves out the Nyquist bin, whose mask is 0 (upstream: X[:, :, :max_bin])."""
    return run.model.max_bin if run.model.config.architecture == "v4" else run.model.output_bin


# ---------------------------------------------------------------------------------------------------------------
# 5. optimizer and learning-rate schedule
# ---------------------------------------------------------------------------------------------------------------
def build_optimizer(run: Run) -> None:
    a = run.args
    opt = torch.optim.Adam if a.optimizer == "adam" else torch.optim.AdamW
    run.optimizer = opt(run.model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    run.items_per_epoch = a.epoch_size // run.world
    for i, st in enumerate(stages(a)):
        if st.items > run.items_per_epoch:
            where = f"stage {i + 1} of --curriculum ({st})" if st.steps is not None else \
                f"one step ({st.batch_size} batch x {st.accum} accum)"
            raise UsageError(f"--epoch-size {a.epoch_size} is smaller than {where} x {run.world} process(es); raise "
                             f"--epoch-size or lower the batch")
    run.total_steps = schedule_length(run)
    run.loader_gen = torch.Generator()
    run.loader_gen.manual_seed(a.seed)
    run.sampler = ResumableDistributedSampler(run.train_set, num_replicas=run.world, rank=run.rank, shuffle=True,
                                              seed=a.seed, drop_last=True)


def finished(run: Run) -> bool:
    """The run is over: its curriculum's steps are done, or (without one) its epochs."""
    total = curriculum_steps(run.args)
    return run.step >= total if total is not None else run.epoch >= run.args.epochs


def epoch_steps_left(run: Run, step: Optional[int] = None, epoch_items: Optional[int] = None) -> int:
    """Optimizer steps left in the current epoch: each takes its stage's batch x accum items of this process's
    --epoch-size // processes, and the epoch ends when the next step's items no longer fit (or the run ends)."""
    step = run.step if step is None else step
    items = run.epoch_items if epoch_items is None else epoch_items
    total = curriculum_steps(run.args)
    n = 0
    while total is None or step < total:
        st = stage_at(run.args, step)[1]
        if items + st.items > run.items_per_epoch:
            break
        if total is None:  # one stage: the rest at once
            return n + (run.items_per_epoch - items) // st.items
        items, step, n = items + st.items, step + 1, n + 1
    return n


def schedule_length(run: Run) -> int:
    """Optimizer steps of the whole run: the curriculum's, or the steps done plus those the current options leave
    (the rest of this epoch and the epochs to go). For a run that never changed its options that is --epochs x
    steps per epoch; a resume with other --epochs, --batch-size or --epoch-size stretches or shrinks the decay to
    the new end, a resume with another --curriculum to its end."""
    total = curriculum_steps(run.args)
    if total is not None:
        return total
    if run.epoch >= run.args.epochs:
        return run.step
    per_epoch = epoch_steps_left(run, epoch_items=0)
    return run.step + epoch_steps_left(run) + (run.args.epochs - run.epoch - 1) * per_epoch


def lr_at(step: int, args, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to --lr, then polynomial decay to
    --min-lr-ratio * --lr at ``total_steps``."""
    if args.warmup_steps > 0 and step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * (1 - progress) ** args.power)


# ---------------------------------------------------------------------------------------------------------------
# 6. one optimizer step
# ---------------------------------------------------------------------------------------------------------------
def autocast(run: Run):
    return torch.autocast(run.device.type, dtype=torch.bfloat16,
                          enabled=run.device.type == "cuda" and not run.args.no_amp)


def agree(run: Run, *flags: bool) -> List[bool]:
    """Flags OR-ed over all processes (so that every process skips, saves or stops at the same step)."""
    if not run.distributed:
        return list(flags)
    t = torch.tensor([float(f) for f in flags], device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def train_step(run: Run, batches) -> Optional[float]:
    """One optimizer step over ``--accum`` micro-batches; returns the loss, or None when it was skipped because a
    loss or gradient was not finite (then no weight changes)."""
    a = run.args
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.step, a, run.total_steps)
    run.ddp.train()
    run.optimizer.zero_grad(set_to_none=True)
    total, finite = 0.0, True
    bins = loss_bins(run)
    for i, (x, y) in enumerate(batches):
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        sync = not run.distributed or i == len(batches) - 1
        with (run.ddp.no_sync() if not sync else contextlib.nullcontext()):
            with autocast(run):
                mask = run.ddp(x)
            loss = torch.nn.functional.l1_loss((x * mask.float())[:, :, :bins], y[:, :, :bins])
            if a.inject_nan_at == "all" or str(run.step + 1) in a.inject_nan_at.split(","):
                loss = loss * float("nan")
            (loss / len(batches)).backward()
        value = float(loss.detach())
        total += value / len(batches)
        finite = finite and math.isfinite(value)
    gnorm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), a.clip if a.clip > 0 else float("inf"))
    (bad,) = agree(run, not (finite and math.isfinite(float(gnorm))))
    run.step += 1
    if not bad:
        run.optimizer.step()
        run.nan_run = 0
        return total
    run.optimizer.zero_grad(set_to_none=True)
    run.nan_total += 1
    run.nan_run += 1
    run.log(f"warning: non-finite loss/gradient at step {run.step}; step skipped ({run.nan_run} in a row, "
            f"{run.nan_total} total)")
    if run.nan_run >= a.max_nan:
        save_checkpoint(run)
        raise TrainingFailed(f"{run.nan_run} consecutive steps had a non-finite loss or gradient (last at step "
                             f"{run.step}); lower --lr, check the data, or resume from an earlier checkpoint")
    return None


# ---------------------------------------------------------------------------------------------------------------
# 7. checkpoints: atomic, complete enough for a bitwise-exact resume
# ---------------------------------------------------------------------------------------------------------------
def rng_state(run: Run) -> dict:
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                loader=run.loader_gen.get_state())


def set_rng_state(run: Run, state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    run.loader_gen.set_state(state["loader"])


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file beside ``path``, fsync, rename: ``path`` is always a whole checkpoint, and
    an interrupted save leaves no temporary file (a killed one leaves one that the next start removes)."""
    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temps(out: str) -> List[str]:
    """Temporary files of saves that were killed (this format and the old ``checkpoint.pt.tmp<pid>``)."""
    stale = glob.glob(os.path.join(out, f".{CHECKPOINT}.*.tmp")) + glob.glob(os.path.join(out, f"{CHECKPOINT}.tmp*"))
    for f in stale:
        os.remove(f)
    return stale


def save_checkpoint(run: Run) -> None:
    run.last_save = time.monotonic()
    if not run.main:
        return
    saved_args = {k: v for k, v in vars(run.args).items() if k not in NOT_SAVED}
    cfg = model_config(run.args)
    atomic_save(dict(format=CHECKPOINT_FORMAT, model=run.model.state_dict(), optimizer=run.optimizer.state_dict(),
                     step=run.step, epoch=run.epoch, epoch_items=run.epoch_items, nan_total=run.nan_total,
                     nan_run=run.nan_run, history=run.history, rng=rng_state(run), world=run.world,
                     config=dict(model=cfg.to_dict(), sr=run.args.sr, n_fft=cfg.n_fft, hop=run.args.hop,
                                 cropsize=run.args.cropsize, normalize=run.args.normalize, args=saved_args)),
                run.checkpoint_path)


def restore_checkpoint(run: Run, ck: dict) -> None:
    try:
        run.model.load_state_dict(ck["model"])
        run.optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise UsageError(f"--resume: the checkpoint does not fit the model ({str(e).splitlines()[0]})") from None
    for group in run.optimizer.param_groups:  # load_state_dict restored the saved value: the options decide
        group["weight_decay"] = run.args.weight_decay
    run.step, run.epoch = ck["step"], ck["epoch"]
    if "epoch_items" in ck:
        run.epoch_items = ck["epoch_items"]
    else:  # format 1 counted steps
        saved = ck["config"]["args"]
        run.epoch_items = ck.get("step_in_epoch", 0) * saved["batch_size"] * saved.get("accum", 1)
    run.nan_total, run.nan_run = ck.get("nan_total", 0), ck.get("nan_run", 0)
    run.history = ck.get("history", [])
    if ck.get("rng"):
        set_rng_state(run, ck["rng"])
    if ck.get("world", run.world) != run.world:
        run.log(f"note: the run was saved with {ck['world']} processes and continues with {run.world}: the data "
                f"order of the current epoch changes")


# ---------------------------------------------------------------------------------------------------------------
# 8. validation: L1, separation metrics, the mask's statistics, collapse diagnosis
# ---------------------------------------------------------------------------------------------------------------
def separation_metrics(estimate: torch.Tensor, reference: torch.Tensor, mixture: torch.Tensor, sr: int
                       ) -> Dict[str, torch.Tensor]:
    """Per-item metrics of separated vocals: (B, 2, samples) waveforms (the mixture too) -> {name: (B,) values}.
    :func:`validate` summarises each over the items as :data:`SUMMARY` says and logs it as ``val_<name>``.

    * ``sdr``: uSDR, ``10 log10(sum s^2 / sum (s - s_hat)^2)`` over the whole item (items without vocals: NaN).
    * ``bss_sdr``: BSS-eval v4 vocals SDR as museval computes it for MUSDB18 and frame_transformer.evaluate
      reports it (sources vocals and accompaniment = mixture - vocals, the estimate's accompaniment = mixture -
      its vocals; 1 s windows; the median over the item's windows where no source is silent; NaN when all are):
      :func:`frame_transformer.metrics.bss_eval_v4_sdr`, equal to museval's.
    """
    usdr = batch_sdr(estimate, reference)
    usdr[reference.flatten(1).abs().amax(1) <= 1e-6] = float("nan")
    refs = torch.stack([reference, mixture - reference], 1).double().cpu().numpy()
    ests = torch.stack([estimate, mixture - estimate], 1).double().cpu().numpy()
    bss = torch.from_numpy(bss_eval_v4_sdr(refs, ests, sr)["sdr"][:, 0])
    return dict(sdr=usdr, bss_sdr=bss)


# how validate() summarises each metric over the items (NaN items left out): uSDR as before, the mean; BSS-eval
# SDR as MUSDB18 results are reported, the median
SUMMARY = dict(sdr="mean", bss_sdr="median")


def _summary(v: torch.Tensor, how: str) -> float:
    v = v[~torch.isnan(v)].double()
    if not len(v):
        return float("nan")
    return float(v.mean()) if how == "mean" else float(np.median(v.numpy()))


def val_batches(run: Run, batch_size: int) -> DataLoader:
    """The validation items in order; with a generator of its own, so that validating leaves the global RNG (and
    with it dropout) where training had it: a resumed run validates at other moments than a straight one."""
    return DataLoader(run.val_set, batch_size=batch_size, shuffle=False, num_workers=0, generator=torch.Generator())


@torch.no_grad()
def validate(run: Run) -> dict:
    """L1 loss (the loss's bins), every :func:`separation_metrics` metric (vocals = iSTFT of (1 - mask) * mixture,
    the mixture's phase), and the mask's mean and saturation (fraction of bins within 1e-3 of 0 or 1)."""
    a, model = run.args, run.model
    was = model.training
    model.eval()
    losses, metrics, masks_mean, sat = [], {}, [], []
    n_fft, bins = model_config(a).n_fft, loss_bins(run)
    batch = max(t.batch_size for t in stages(a))
    for x, y, xc, vc in val_batches(run, batch):
        x, y, xc, vc = x.to(run.device), y.to(run.device), xc.to(run.device), vc.to(run.device)
        with autocast(run):
            mask = model(x)
        mask = mask.float()
        l1 = torch.nn.functional.l1_loss((x * mask)[:, :, :bins], y[:, :, :bins], reduction="none")
        losses.append(l1.flatten(1).mean(1).cpu())
        masks_mean.append(mask.flatten(1).mean(1).cpu())
        sat.append(((mask < 1e-3) | (mask > 1 - 1e-3)).float().flatten(1).mean(1).cpu())
        length = (x.shape[-1] - 1) * a.hop
        est = audio.istft((1 - mask).to(xc.real.dtype) * xc, n_fft, a.hop, length)
        ref = audio.istft(vc, n_fft, a.hop, length)
        mix = audio.istft(xc, n_fft, a.hop, length)
        for k, v in separation_metrics(est, ref, mix, a.sr).items():
            metrics.setdefault(k, []).append(v.cpu())
    model.train(was)
    out = dict(val_loss=float(torch.cat(losses).mean()), mask_mean=float(torch.cat(masks_mean).mean()),
               mask_saturation=float(torch.cat(sat).mean()))
    for k, v in metrics.items():
        out[f"val_{k}"] = _summary(torch.cat(v), SUMMARY.get(k, "mean"))
    return out


def mixture_baseline(run: Run) -> float:
    """BSS-eval v4 vocals SDR of the mixture itself as the vocals estimate, on the validation items: the number a
    separator has to beat (frame_transformer.evaluate's "mixture" column)."""
    a = run.args
    n_fft = model_config(a).n_fft
    scores = []
    for _, _, xc, vc in val_batches(run, 8):
        length = (xc.shape[-1] - 1) * a.hop
        mix, ref = audio.istft(xc, n_fft, a.hop, length), audio.istft(vc, n_fft, a.hop, length)
        refs = torch.stack([ref, mix - ref], 1).double().numpy()
        ests = torch.stack([mix, mix], 1).double().numpy()  # the mixture as both estimates, as evaluate scores it
        scores.append(torch.from_numpy(bss_eval_v4_sdr(refs, ests, a.sr)["sdr"][:, 0]))
    return _summary(torch.cat(scores), SUMMARY["bss_sdr"])


def diagnose(history: List[dict], args) -> Optional[str]:
    """A collapse: the last two validations after training started have the same L1 (to 1e-4 relative) while the
    mask sits at 0 or 1 on at least 95% of the bins (sigmoid saturated: no gradient comes back), or exactly the same
    L1 (to 1e-6) whatever the mask (the weights do not move). Returns the one-line diagnosis, or None."""
    rows = [h for h in history if h.get("step", 0) > 0]
    if len(rows) < 2:
        return None
    a, b = rows[-2]["val_loss"], rows[-1]["val_loss"]
    change = abs(a - b) / max(abs(a), abs(b), 1e-30)
    m, sat = rows[-1]["mask_mean"], rows[-1]["mask_saturation"]
    where = f"validation L1 {b:.6g} unchanged since step {rows[-2]['step']}"
    if sat >= 0.95 and change <= 1e-4:
        side = ("stuck at 1: the separator passes the whole mixture as instrumental and its vocals are silent"
                if m > 0.9 else "stuck at 0: the separator calls everything vocals" if m < 0.1 else
                "binary (every bin 0 or 1)")
        return (f"{where} and the mask is {side} ({sat:.1%} of bins saturated, mean {m:.4f}); likely cause: a "
                f"learning rate too high for this model (--lr {args.lr:g}, --warmup-steps {args.warmup_steps}) drove "
                f"the mask's sigmoid into saturation, where its gradients vanish; start again with a lower --lr "
                f"(e.g. {args.lr / 4:g}) or a longer --warmup-steps")
    if change <= 1e-6:
        return (f"{where} while the mask is not saturated ({sat:.0%} of bins at 0 or 1): the weights are not "
                f"changing; is --lr {args.lr:g} (warmup {args.warmup_steps}) too small, or the data silent?")
    return None


# ---------------------------------------------------------------------------------------------------------------
# 9. logging: console + OUT/train.log, OUT/log.csv, TensorBoard, OUT/loss.png
# ---------------------------------------------------------------------------------------------------------------
CSV_KEYS = ["epoch", "step", "train_loss", "val_loss", "val_bss_sdr", "val_sdr", "mask_mean", "mask_saturation",
            "lr", "cropsize", "nan_skipped", "elapsed_s"]


class RunLog:
    def __init__(self, out: str, main: bool):
        self.out, self.main, self.tb = out, main, None
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out, "tb"))
            except Exception:  # TensorBoard is optional
                self.tb = None

    def __call__(self, msg: str) -> None:
        """Print (rank 0) and append to OUT/train.log."""
        if self.main:
            print(msg, flush=True)
            self.write(msg)

    def write(self, msg: str) -> None:
        """Append to OUT/train.log only."""
        if self.main:
            with open(os.path.join(self.out, "train.log"), "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def record(self, history: List[dict]) -> None:
        """Rewrite log.csv from the history (atomically), add the last row to TensorBoard, redraw loss.png."""
        if not self.main:
            return
        path = os.path.join(self.out, "log.csv")
        extra = sorted({k for h in history for k in h if k.startswith("val_") and k not in CSV_KEYS})
        with open(path + ".tmp", "w", newline="") as f:  # a metric added to separation_metrics gets a column
            w = csv.DictWriter(f, CSV_KEYS + extra, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)
        os.replace(path + ".tmp", path)
        row = history[-1]
        if self.tb is not None:
            for k in ("train_loss", "val_loss", "val_bss_sdr", "val_sdr", "lr", "mask_saturation"):
                if row.get(k) not in (None, ""):
                    self.tb.add_scalar(k, row[k], row["step"])
        plot_history(history, os.path.join(self.out, "loss.png"))


def plot_history(history: List[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    rows = [h for h in history if h.get("train_loss") not in (None, "")]
    if rows:
        a1.plot([h["step"] for h in rows], [h["train_loss"] for h in rows], "o-", label="train L1")
    a1.plot([h["step"] for h in history], [h["val_loss"] for h in history], "s-", label="val L1")
    a1.set_xlabel("step"), a1.set_ylabel("L1"), a1.legend(), a1.grid(alpha=0.3)
    steps = [h["step"] for h in history]
    a2.plot(steps, [h.get("val_bss_sdr", float("nan")) for h in history], "s-", color="C2", label="SDR (BSS-eval v4)")
    a2.plot(steps, [h.get("val_sdr", float("nan")) for h in history], "o--", color="C3", label="uSDR")
    a2.set_xlabel("step"), a2.set_ylabel("validation vocals (dB)"), a2.legend(), a2.grid(alpha=0.3)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".loss.", suffix=".png")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def validate_and_record(run: Run, train_loss, t0: float) -> None:
    """Rank 0 validates, logs a line and a CSV row, then checks for a collapse (all processes learn of it)."""
    diagnosis = None
    if run.main:
        v = validate(run)
        label = f"epoch {run.epoch}: train L1 {train_loss:.5f}  " if run.step else "untrained: "
        run.log(f"{label}val L1 {v['val_loss']:.5f}  val vocals SDR {v['val_bss_sdr']:.2f} dB (BSS-eval v4), "
                f"uSDR {v['val_sdr']:.2f} dB  mask mean {v['mask_mean']:.3f}, {v['mask_saturation']:.0%} saturated  "
                f"(step {run.step}, {time.time() - t0:.0f} s)")
        run.history.append(dict(epoch=run.epoch, step=run.step, train_loss=train_loss if run.step else "",
                                lr=run.optimizer.param_groups[0]["lr"], nan_skipped=run.nan_total,
                                cropsize=stage_at(run.args, max(run.step - 1, 0))[1].cropsize,
                                elapsed_s=round(time.time() - t0, 1), **v))
        run.log.record(run.history)
        diagnosis = diagnose(run.history, run.args)
        if diagnosis is None and run.step and v["mask_saturation"] > 0.99:
            run.log(f"warning: {v['mask_saturation']:.1%} of the mask is saturated at 0 or 1 (mean "
                    f"{v['mask_mean']:.3f}); if validation stops changing, the run has collapsed")
    (collapsed,) = agree(run, diagnosis is not None)
    if collapsed:
        save_checkpoint(run)
        raise TrainingFailed(f"training collapsed at step {run.step}: {diagnosis}" if diagnosis else
                             f"training collapsed at step {run.step} (see rank 0's log)")


# ---------------------------------------------------------------------------------------------------------------
# 10. the loop
# ---------------------------------------------------------------------------------------------------------------
def save_due(run: Run) -> bool:
    a = run.args
    by_steps = a.save_every_steps > 0 and run.step % a.save_every_steps == 0
    by_time = a.save_every_minutes > 0 and time.monotonic() - run.last_save >= 60 * a.save_every_minutes
    return by_steps or by_time


def train_epoch(run: Run, t0: float) -> Optional[float]:
    """Steps through the rest of the current epoch (or to the curriculum's end); returns its mean train loss, or
    None when the run stopped inside it (signal, --stop-after-steps), with a checkpoint of where it stands."""
    a = run.args
    bar = None
    if run.main and not a.no_progress:
        from tqdm import tqdm

        done = run.epoch_items // stages(a)[0].items if curriculum_steps(a) is None else 0
        bar = tqdm(total=done + epoch_steps_left(run), initial=done, unit="step", leave=False, dynamic_ncols=True,
                   desc=f"epoch {run.epoch + 1}" + (f"/{a.epochs}" if a.epochs else ""))
    losses, loader_stage, it = [], None, None
    try:
        while epoch_steps_left(run) > 0:
            index, stage = stage_at(a, run.step)
            if stage != loader_stage:
                if loader_stage is not None or (index > 0 and stage_at(a, run.step - 1)[0] != index):
                    run.log(f"curriculum stage {index + 1}/{len(stages(a))} from step {run.step}: {stage}")
                it, loader_stage = iter(epoch_loader(run, stage)), stage
            loss = train_step(run, [next(it) for _ in range(stage.accum)])
            run.epoch_items += stage.items
            if loss is not None:
                losses.append(loss)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.5f}" if loss is not None else "skip",
                                lr=f"{run.optimizer.param_groups[0]['lr']:.2e}", crop=stage.cropsize)
                bar.update(1)
            if a.log_every_steps and run.step % a.log_every_steps == 0:
                run.log(f"step {run.step}: train L1 {loss if loss is not None else float('nan'):.5f}  "
                        f"lr {run.optimizer.param_groups[0]['lr']:.3g}")
            stop_now = bool(run.stop_signal) or (a.stop_after_steps is not None and run.step >= a.stop_after_steps)
            stop, save = agree(run, stop_now, save_due(run))
            end_of_epoch = epoch_steps_left(run) == 0
            if stop and not end_of_epoch:
                save_checkpoint(run)
                return None
            if stop:
                break
            if save and not end_of_epoch:
                save_checkpoint(run)
    finally:
        if bar is not None:
            bar.close()
    train_loss = float(np.mean(losses)) if losses else float("nan")
    if run.distributed:
        t = torch.tensor([train_loss], device=run.device)
        dist.all_reduce(t)
        train_loss = float(t) / run.world
    run.epoch += 1
    run.epoch_items = 0
    return train_loss


def describe_plan(run: Run) -> str:
    a = run.args
    if curriculum_steps(a) is None:
        plan = f"{run.total_steps} steps in all ({a.epochs} epochs x {epoch_steps_left(run, 0, 0)}), batch " \
               f"{a.batch_size} x accum {a.accum} x {run.world} process(es), crop {a.cropsize} frames"
    else:
        plan = f"{run.total_steps} steps in all, curriculum " + "; ".join(
            f"stage {i + 1}: {t.steps} step{'s' if t.steps != 1 else ''}, {t}" for i, t in enumerate(stages(a))) + \
            f" (x {run.world} process(es)); validation every {a.epoch_size} items"
    return (f"{plan}; {a.optimizer} lr {a.lr:g} (warmup {a.warmup_steps}, then decay with power {a.power:g} to "
            f"{a.min_lr_ratio:g} x lr), weight decay {a.weight_decay:g}, gradient clip {a.clip:g}; device {run.device}")


def prepare(run: Run, ck: Optional[dict], notes: List[str], init: Optional[dict] = None) -> None:
    """Check the folders, create --out, load the data, build the model and optimizer, restore a resumed run."""
    args = run.args
    resuming_here = ck is not None and os.path.abspath(args.resume) == os.path.abspath(run.checkpoint_path)
    if os.path.exists(run.checkpoint_path) and not resuming_here and not args.overwrite:
        raise UsageError(f"{args.out} already holds a run ({run.checkpoint_path}); continue it with --resume, "
                         f"choose another --out, or start again with --overwrite")
    check_folders(args)
    if run.main:
        os.makedirs(args.out, exist_ok=True)
    barrier(run)
    run.log = RunLog(args.out, run.main)
    if run.main:
        for f in remove_stale_temps(args.out):
            run.log(f"removed {f}: the temporary file of a save that was killed")
    load_data(run)
    build_model(run, init)
    build_optimizer(run)
    if ck is not None:
        restore_checkpoint(run, ck)
        run.total_steps = schedule_length(run)
        source = run.checkpoint_path if resuming_here else f"{args.resume} into {args.out}"
        run.log(f"resumed {source} at step {run.step} (epoch {run.epoch + 1}, item {run.epoch_items} of it)"
                + (f"; command line overrides: {', '.join(notes)}" if notes else ""))
    if run.main:
        run.val_baseline = mixture_baseline(run)
        run.log(f"validation baseline: the mixture as its own vocals estimate scores {run.val_baseline:.2f} dB SDR "
                f"(BSS-eval v4)")
    run.log(describe_plan(run))


def finish(run: Run) -> None:
    """The last checkpoint; then how the run ended: interrupted (exit 130/143) or done (replicas checked)."""
    save_checkpoint(run)
    if run.stop_signal:
        raise _Interrupted(run.stop_signal, f"{signal.Signals(run.stop_signal).name}: stopped at step {run.step}; "
                                            f"checkpoint saved to {run.checkpoint_path}; continue with --out "
                                            f"{run.args.out} --resume")
    if run.distributed:
        check_replicas(run)
        barrier(run)
    if run.main and run.history:
        first, last = run.history[0], run.history[-1]
        nan = float("nan")
        run.log(f"done: step {run.step}, val vocals SDR (BSS-eval v4) {first.get('val_bss_sdr', nan):.2f} -> "
                f"{last.get('val_bss_sdr', nan):.2f} dB (the mixture itself: {run.val_baseline:.2f} dB), uSDR "
                f"{first['val_sdr']:.2f} -> {last['val_sdr']:.2f} dB; checkpoint {run.checkpoint_path}")


def train(args, ck: Optional[dict] = None, notes: List[str] = (), init: Optional[dict] = None) -> Run:
    """Run (or continue) the training that ``args`` describe; returns the finished :class:`Run`."""
    run = setup_processes(args)
    _install_signal_handlers(run)
    try:
        prepare(run, ck, notes, init)
        run.armed = True
        t0 = time.time()
        run.last_save = time.monotonic()
        if run.step == 0 and not run.history and not args.no_initial_val:
            validate_and_record(run, None, t0)
            barrier(run)
        while not finished(run):
            train_loss = train_epoch(run, t0)
            if train_loss is None:  # stopped inside the epoch (and saved)
                break
            validate_and_record(run, train_loss, t0)
            save_checkpoint(run)
            barrier(run)
            if run.stop_signal or (args.stop_after_steps is not None and run.step >= args.stop_after_steps):
                break
        finish(run)
        return run
    except TrainingFailed as e:
        if run.log is not None:
            run.log.write(f"error: {e}")
        raise
    finally:
        _restore_signal_handlers()
        if run.distributed and dist.is_initialized():
            dist.destroy_process_group()


def check_replicas(run: Run) -> List[float]:
    """All-gather a checksum of every replica's weights; they must agree (DDP keeps replicas identical)."""
    flat = torch.cat([p.detach().double().flatten() for p in run.model.parameters()])
    mine = (flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)).sum().reshape(1)
    got = [torch.zeros_like(mine) for _ in range(run.world)]
    dist.all_gather(got, mine)
    sums = [float(g) for g in got]
    run.log(f"replica weight checksums: {sums}")
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"DDP replicas diverged: weight checksums {sums}")
    return sums


# ---------------------------------------------------------------------------------------------------------------
# signals and the command
# ---------------------------------------------------------------------------------------------------------------
class _Interrupted(Exception):
    def __init__(self, signum: int, msg: str):
        super().__init__(msg)
        self.signum = signum


_previous_handlers: dict = {}


def _install_signal_handlers(run: Run) -> None:
    """First SIGINT/SIGTERM: finish the current step, save, stop. A second one: stop at once (no save)."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if not run.armed:
            raise _Interrupted(signum, f"{name} before training started: stopped, nothing to save")
        if run.stop_signal:
            raise _Interrupted(signum, f"{name} again: stopped without saving; the last checkpoint is "
                                       f"{run.checkpoint_path}")
        run.stop_signal = signum
        if run.main:  # on stdout: stderr gets the one line that says how the run ended
            print(f"\n{name}: saving a checkpoint after this step (press again to stop at once)", flush=True)

    if hasattr(signal, "SIGTERM") and _is_main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            _previous_handlers[s] = signal.signal(s, handler)


def _restore_signal_handlers() -> None:
    while _previous_handlers:
        s, h = _previous_handlers.popitem()
        signal.signal(s, h)


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv: Optional[List[str]] = None) -> int:
    """The ``frame-transformer-train`` command: returns the exit status (see the module docstring)."""
    name = prog()
    try:
        args, ck, notes, init = resolve_options(argv)
        train(args, ck, notes, init)
        return 0
    except (UsageError, DataError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingFailed as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except _Interrupted as e:
        print(f"{name}: {e}", file=sys.stderr)
        return EXIT_SIGTERM if e.signum == getattr(signal, "SIGTERM", -1) else EXIT_SIGINT
    except KeyboardInterrupt:  # Ctrl-C while parsing options or reading a checkpoint
        print(f"{name}: interrupted, nothing to save", file=sys.stderr)
        return EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
