"""Convert an upstream v4 checkpoint (a bare state_dict saved by train4.py) to this project's checkpoint format.

    python -m frame_transformer.convert UPSTREAM.pth OUT.pt [--sr 44100] [--hop N_FFT//2] [--force]

OUT.pt holds what train.py's checkpoint holds where it applies: ``model`` (the state_dict under this project's
keys) and ``config`` (``model``: the v4 model config inferred from the tensor shapes; ``sr``, ``n_fft``, ``hop``,
``cropsize``; plus ``padding``, ``upstream`` and ``assumed``). A state_dict cannot tell the sample rate or the
hop: they, cropsize 512, padding 1024 and dropout 0.1 are upstream's defaults (train4.py, inference_v4.py)
unless given here. The file is written atomically.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from frame_transformer.upstream import CheckpointError, read_checkpoint


def convert(src: str, dst: str, sr: Optional[int] = None, hop: Optional[int] = None, force: bool = False) -> dict:
    """Write ``src`` (an upstream v4 state_dict file) as a checkpoint ``dst`` of this project; returns its config."""
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the output folder {folder} does not exist")
    state_dict, info = read_checkpoint(src)
    if info["format"] != "upstream-v4":
        raise CheckpointError(f"{src} is already a checkpoint of this project; nothing to convert")
    config = {k: v for k, v in info.items() if k != "format"}
    for name, value in (("sr", sr), ("hop", hop)):
        if value is not None:
            config[name] = value
            config["assumed"] = [a for a in config["assumed"] if a != name]
    config["converted_from"] = os.path.basename(src)
    tmp = f"{dst}.tmp{os.getpid()}"
    try:
        torch.save({"model": state_dict, "config": config}, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return config


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m frame_transformer.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("upstream", help="upstream frame_transformer_v4 state_dict (.pth)")
    p.add_argument("out", help="checkpoint to write (.pt)")
    p.add_argument("--sr", type=_positive, default=None, help="sample rate it was trained at (default 44100)")
    p.add_argument("--hop", type=_positive, default=None,
                   help="STFT hop it was trained with (default n_fft // 2: 1024 for the seed's n_fft 2048)")
    p.add_argument("--force", action="store_true", help="overwrite OUT")
    a = p.parse_args(argv)
    try:
        config = convert(a.upstream, a.out, a.sr, a.hop, a.force)
    except (CheckpointError, OSError) as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    m = config["model"]
    assumed = ", ".join(f"{k} {config.get(k, m.get(k))}" for k in config["assumed"])
    print(f"{a.upstream} -> {a.out}: v4, channels {m['channels']}, n_fft {m['n_fft']}, num_heads {m['num_heads']}, "
          f"expansion {m['expansion']}, attention maps {m['num_attention_maps']}"
          + (f"; assumed (upstream defaults): {assumed}" if assumed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
