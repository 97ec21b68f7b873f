r"""Score a checkpoint on a MUSDB18-style folder: BSS-eval v4 SDR per track and the median over tracks.

examples:
  frame-transformer-evaluate musdb18hq/test -c runs/big/checkpoint.pt
  frame-transformer-evaluate my_tracks/ -c runs/demo/checkpoint.pt --csv scores.csv --stems scored_stems/
  python -m frame_transformer.evaluate my_tracks/ -c runs/demo/checkpoint.pt      (the same, not installed)

data:
  FOLDER holds one folder per track (searched recursively), each with mixture.EXT and vocals.EXT and
  optionally accompaniment.EXT: MUSDB18-HQ's names, in any format libsndfile reads (wav, flac, ...). Without
  accompaniment.EXT the accompaniment reference is mixture - vocals (MUSDB18's definition: drums + bass +
  other). Other files (drums.wav, ...) are ignored. FOLDER may itself be one track. The compressed MUSDB18
  .stem.mp4 files are not read: use MUSDB18-HQ, or decode them to wav first (musdb's musdbconvert).

scores:
  Each mixture is separated as frame-transformer-separate does (same crops and options, stems at the track's
  rate), and the estimates (vocals, accompaniment) are scored against the references together, as museval does
  for MUSDB18 (BSS-eval v4, images, time-invariant distortion filters, 1 s windows): per track the median over
  the windows where no source is silent, then the median over tracks. "mixture" columns score the mixture
  itself as both estimates: the baseline a separator has to beat. Results go to the CSV (one row per track and
  a last row "median") and a table on stdout.
"""
from __future__ import annotations

import csv
import math
import os
import sys
from typing import Dict, List, Optional

import numpy as np

from frame_transformer import audio, separate
from frame_transformer.separate import UserError

PROG = "frame-transformer-evaluate"
SOURCES = ("vocals", "accompaniment")
COLUMNS = ["track", "seconds", "vocals_sdr", "accompaniment_sdr", "mixture_vocals_sdr",
           "mixture_accompaniment_sdr", "vocals_sir", "vocals_sar", "vocals_isr", "accompaniment_sir",
           "accompaniment_sar", "accompaniment_isr"]


def _find(folder: str, name: str) -> Optional[str]:
    """folder/name.EXT for an audio extension, or None (two formats of one name are ambiguous: an error)."""
    hits = [os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if os.path.splitext(f)[0] == name and f.lower().endswith(audio.AUDIO_EXTENSIONS)]
    if len(hits) > 1:
        raise UserError(f"{folder} has {len(hits)} {name} files ({', '.join(os.path.basename(h) for h in hits)}); "
                        "keep one")
    return hits[0] if hits else None


def find_tracks(folder: str) -> List[Dict[str, Optional[str]]]:
    """Every track under ``folder``: dicts with name, mixture, vocals and accompaniment (or None) paths."""
    if not os.path.isdir(folder):
        raise UserError(f"no such folder: {folder} (pass a folder with one sub-folder per track)")
    tracks = []
    for root, dirs, _files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        mix = _find(root, "mixture")
        if mix is None:
            continue
        voc = _find(root, "vocals")
        if voc is None:
            raise UserError(f"{root} has {os.path.basename(mix)} but no vocals file (vocals.wav): every track needs "
                            "its vocals reference")
        rel = os.path.relpath(root, folder)
        tracks.append(dict(name=os.path.basename(os.path.abspath(root)) if rel == "." else rel, mixture=mix,
                           vocals=voc, accompaniment=_find(root, "accompaniment")))
    if not tracks:
        raise UserError(f"no tracks in {folder}: expected sub-folders holding mixture.wav and vocals.wav "
                        "(MUSDB18-HQ layout)")
    return tracks


def _read(path: str, sr: int, length: int) -> np.ndarray:
    wave, file_sr = audio.load_audio(path)
    if file_sr != sr:
        raise audio.AudioError(f"{path} is at {file_sr} Hz but the mixture is at {sr} Hz")
    if wave.shape[1] != length:
        raise audio.AudioError(f"{path} has {wave.shape[1]} samples but the mixture has {length}")
    return wave


def score_track(model, track: dict, cfg: dict, opts: separate.CropOptions, device="cpu",
                stems_dir: Optional[str] = None, progress: bool = False) -> dict:
    """Separate one track and score it (and the mixture baseline) with BSS-eval v4; returns a CSV row."""
    from frame_transformer.metrics import bss_eval_v4

    blocks = list(separate.iter_stems(model, track["mixture"], cfg, opts, device, "input", progress=progress))
    sr = blocks[0][2]
    est_voc = np.concatenate([b[0] for b in blocks], axis=1)
    est_acc = np.concatenate([b[1] for b in blocks], axis=1)
    mix = _read(track["mixture"], sr, est_voc.shape[1])
    voc = _read(track["vocals"], sr, mix.shape[1])
    acc = _read(track["accompaniment"], sr, mix.shape[1]) if track["accompaniment"] else mix - voc
    if stems_dir:
        for name, wave in (("vocals", est_voc), ("accompaniment", est_acc)):
            path = os.path.join(stems_dir, track["name"], f"{name}.wav")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = os.path.join(os.path.dirname(path), f".{name}.{os.getpid()}.tmp.wav")
            audio.save_audio(tmp, wave, sr, "FLOAT")
            os.replace(tmp, path)
    refs = np.stack([voc, acc])
    got = bss_eval_v4(refs, np.stack([est_voc, est_acc]), sr)
    base = bss_eval_v4(refs, np.stack([mix, mix]), sr)
    row = dict(track=track["name"], seconds=round(mix.shape[1] / sr, 2))
    for i, s in enumerate(SOURCES):
        row[f"{s}_sdr"] = got["sdr"][i]
        row[f"mixture_{s}_sdr"] = base["sdr"][i]
        for m in ("sir", "sar", "isr"):
            row[f"{s}_{m}"] = got[m][i]
    return row


def median_row(rows: List[dict]) -> dict:
    out = dict(track="median", seconds=float(np.median([r["seconds"] for r in rows])))
    for c in COLUMNS[2:]:
        vals = np.array([r[c] for r in rows], dtype=np.float64)
        out[c] = float(np.nanmedian(vals)) if np.isfinite(vals).any() else math.nan
    return out


def write_csv(path: str, rows: List[dict]) -> None:
    """Atomically (temporary file, then rename)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()})
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"cannot write {path}: {e.strerror or e}; choose another file with --csv") from None


def build_parser():
    import argparse

    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=separate.HelpFormatter)
    p.add_argument("folder", help="folder of tracks (MUSDB18-HQ layout: TRACK/mixture.wav, TRACK/vocals.wav)")
    separate.add_model_options(p)
    p.add_argument("--csv", default="sdr.csv", help="where to write the per-track and median scores")
    p.add_argument("--stems", default=None, help="also write each track's estimates to STEMS/TRACK/{vocals,"
                                                 "accompaniment}.wav, float WAV (default: not written)")
    return p


def _fmt(v) -> str:
    return f"{v:8.2f}" if isinstance(v, float) and not math.isnan(v) else f"{'nan':>8}"


def run(a) -> int:
    tracks = find_tracks(a.folder)
    from frame_transformer.metrics import _museval_metrics

    try:
        _museval_metrics()
    except ImportError as e:
        raise UserError(str(e)) from None
    model, cfg, opts, device = separate.setup(a, PROG)
    rows, failed = [], []
    width = max(12, max(len(t["name"]) for t in tracks))
    print(f"{'track':<{width}}  {'vocals':>8}  {'accomp.':>8}   mixture as estimate: {'vocals':>8}  {'accomp.':>8}"
          "   (SDR, dB)", flush=True)
    for t in tracks:
        try:
            row = score_track(model, t, cfg, opts, device, a.stems, not a.no_progress)
        except audio.AudioError as e:
            print(f"{PROG}: error: {t['name']}: {e}", file=sys.stderr)
            failed.append(t["name"])
            continue
        rows.append(row)
        print(f"{row['track']:<{width}}  {_fmt(row['vocals_sdr'])}  {_fmt(row['accompaniment_sdr'])}   "
              f"{'':>21}{_fmt(row['mixture_vocals_sdr'])}  {_fmt(row['mixture_accompaniment_sdr'])}", flush=True)
    if not rows:
        raise UserError(f"no track could be scored ({len(failed)} failed)")
    med = median_row(rows)
    print(f"{'median':<{width}}  {_fmt(med['vocals_sdr'])}  {_fmt(med['accompaniment_sdr'])}   {'':>21}"
          f"{_fmt(med['mixture_vocals_sdr'])}  {_fmt(med['mixture_accompaniment_sdr'])}")
    write_csv(a.csv, rows + [med])
    print(f"median vocals SDR {med['vocals_sdr']:.2f} dB (mixture as estimate: {med['mixture_vocals_sdr']:.2f} dB) "
          f"over {len(rows)} track{'s' * (len(rows) != 1)} (BSS-eval v4, museval); scores in {a.csv}")
    if failed:
        print(f"{PROG}: error: {len(failed)} track{'s' * (len(failed) != 1)} failed: {', '.join(failed)}",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    return separate.cli(run, build_parser(), PROG, argv, interrupted="no scores written")


if __name__ == "__main__":
    sys.exit(main())
