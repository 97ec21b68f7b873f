"""Shared fixtures for the separation/evaluation tests: a micro checkpoint, short songs, running the CLIs."""
import os
import subprocess
import sys

import numpy as np
import soundfile as sf
import torch

from frame_transformer import synth
from frame_transformer.model import FrameTransformer, preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 16000  # the micro checkpoint's rate


def make_checkpoint(path, seed=0):
    """A checkpoint in frame-transformer-train's format holding an untrained micro model (n_fft 64, hop 32)."""
    torch.manual_seed(seed)
    cfg = preset("micro")
    model = FrameTransformer(cfg)
    torch.save(dict(model=model.state_dict(), config=dict(model=cfg.to_dict(), sr=SR, n_fft=64, hop=32,
                                                          cropsize=16)), path)
    return path


def song(seconds, sr=SR, seed=1, mono=False):
    """(vocals, instrumental) (2, n) float32 of a short synthetic song at ``sr``."""
    inst = synth.instrumental(seconds, sr, seed) * 0.5
    voc = synth.vocal(seconds, sr, seed) * 0.4
    if mono:
        inst, voc = inst[:1], voc[:1]
    return voc.astype(np.float32), inst.astype(np.float32)


def write_song(path, seconds=1.0, sr=SR, seed=1, mono=False):
    """Write the mixture of :func:`song` to ``path``; returns it (C, n)."""
    voc, inst = song(seconds, sr, seed, mono)
    x = voc + inst
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, x.T, sr, subtype="PCM_16" if path.endswith(".flac") else "FLOAT")
    return x


def cli(module, *args, cwd=None, check_rc=None, **kw):
    """Run ``python -m frame_transformer.<module> args`` as a user would; returns CompletedProcess."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", f"frame_transformer.{module}", *map(str, args)], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=300, **kw)
    if check_rc is not None:
        assert r.returncode == check_rc, f"rc {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r


def all_files(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


def assert_one_line_error(r, *needles):
    """A user mistake: non-zero exit, one line on stderr naming the problem, no traceback."""
    assert r.returncode != 0, r.stdout + r.stderr
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]
