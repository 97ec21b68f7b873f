"""Separate songs into instruments and vocals with a trained FrameTransformer.

    python -m frame_transformer.separate SONG_OR_FOLDER -o OUTDIR --checkpoint runs/demo/checkpoint.pt \
        [--cropsize 256] [--padding 128] [--batch-size 4] [--tta] [--png] [--device cuda]

writes ``OUTDIR/<name>_Instruments.wav`` (mask * mixture) and ``OUTDIR/<name>_Vocals.wav`` ((1 - mask) * mixture),
both with the mixture phase, so the two stems sum back to the mixture. A folder separates every audio file in it.

Songs are processed crop by crop in bounded memory: the audio is read in segments of ``cropsize`` frames
(``cropsize * hop`` samples) plus ``padding`` frames of context (and one window of margin) on both sides; the
model sees the whole padded crop, and only the centre samples are kept and written, so the output does not depend
on where the crops fall apart from the model's context. ``--tta`` averages the mask with the one of the
channel-swapped input. ``--png`` writes ``<name>_mask.png`` (mixture spectrogram and instrument mask).
"""
from __future__ import annotations

import argparse
import math
import os
from typing import Optional

import numpy as np
import torch

from frame_transformer import audio
from frame_transformer.model import FrameTransformer, ModelConfig


def load_model(checkpoint: str, device="cpu", backend: Optional[str] = None):
    """(model in eval mode, config dict with sr, n_fft, hop, cropsize) from a train.py checkpoint."""
    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = ck["config"]
    model = FrameTransformer(ModelConfig(**cfg["model"]), backend=backend)
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), cfg


class _Reader:
    """Reads (2, length) float32 windows of a file at any start (zeros outside the song)."""

    def __init__(self, path: str, sr: int):
        import soundfile as sf

        try:
            self.f = sf.SoundFile(path)
        except Exception as e:
            raise audio.AudioError(f"cannot read audio file {path!r}: {e}") from e
        self.data = None
        if self.f.samplerate != sr:  # resampling needs the whole signal: load it once
            self.data, _ = audio.load_audio(path, sr=sr)
            self.f.close()
            self.f = None
            self.length = self.data.shape[1]
        else:
            self.length = self.f.frames
            if self.f.channels > 2:
                raise audio.AudioError(f"{path!r}: expected mono or stereo audio, got {self.f.channels} channels")

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.zeros((2, length), dtype=np.float32)
        lo, hi = max(0, start), min(self.length, start + length)
        if hi <= lo:
            return out
        if self.data is not None:
            chunk = self.data[:, lo:hi]
        else:
            self.f.seek(lo)
            chunk = audio.to_stereo(self.f.read(hi - lo, dtype="float32", always_2d=True).T)
        out[:, lo - start:lo - start + chunk.shape[1]] = chunk
        return out

    def close(self):
        if self.f is not None:
            self.f.close()


@torch.no_grad()
def predict_mask(model, mag: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """mag (B, 2, bins, W) -> mask; each crop normalised by its own max as in training."""
    scale = mag.flatten(1).amax(1).clamp_min(1e-8)[:, None, None, None]
    x = mag / scale
    mask = model(x)
    if tta:
        mask = 0.5 * (mask + model(x.flip(1)).flip(1))
    return mask


def separate_file(model, path: str, out_dir: str, sr: int, n_fft: int, hop: int, cropsize: int = 256,
                  padding: Optional[int] = None, batch_size: int = 4, tta: bool = False, png: bool = False,
                  device="cpu", progress: bool = True, subtype: str = "PCM_16"):
    """Separate one file; returns (instruments_path, vocals_path)."""
    import soundfile as sf

    padding = cropsize // 2 if padding is None else padding
    name = os.path.splitext(os.path.basename(path))[0]
    os.makedirs(out_dir, exist_ok=True)
    inst_path = os.path.join(out_dir, f"{name}_Instruments.wav")
    voc_path = os.path.join(out_dir, f"{name}_Vocals.wav")
    reader = _Reader(path, sr)
    seg = cropsize * hop                        # samples kept per crop
    margin = (padding + math.ceil(n_fft / hop)) * hop  # context + one window each side
    n_seg = max(1, math.ceil(reader.length / seg))
    pool = max(1, math.ceil(n_seg * cropsize / 2000)) if png else 1
    fstep = max(1, (n_fft // 2 + 1) // 256)
    pics_mag, pics_mask = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_seg, desc=name[:30], unit="crop", leave=False)
    written = 0
    with sf.SoundFile(inst_path, "w", sr, 2, subtype=subtype) as f_inst, \
            sf.SoundFile(voc_path, "w", sr, 2, subtype=subtype) as f_voc:
        for b0 in range(0, n_seg, batch_size):
            idx = range(b0, min(n_seg, b0 + batch_size))
            waves = torch.from_numpy(np.stack([reader.read(k * seg - margin, seg + 2 * margin) for k in idx]))
            spec = audio.stft(waves, n_fft, hop)          # (b, 2, bins, frames)
            mag = spec.abs()
            mask = predict_mask(model, mag.to(device), tta).float().cpu()
            inst = audio.istft(spec * mask, n_fft, hop, length=waves.shape[-1])[..., margin:margin + seg]
            voc = audio.istft(spec * (1 - mask), n_fft, hop, length=waves.shape[-1])[..., margin:margin + seg]
            for j in range(len(idx)):
                n = min(seg, reader.length - written)
                if n <= 0:
                    break
                f_inst.write(inst[j, :, :n].numpy().T)
                f_voc.write(voc[j, :, :n].numpy().T)
                written += n
            if png:
                c0 = margin // hop
                centre = slice(c0, c0 + cropsize)
                for j in range(len(idx)):
                    m = mask[j, :, ::fstep, centre].mean(0)
                    s = mag[j, :, ::fstep, centre].mean(0)
                    w = (m.shape[-1] // pool) * pool
                    pics_mask.append(m[:, :w].reshape(m.shape[0], -1, pool).mean(-1).half())
                    pics_mag.append(s[:, :w].reshape(s.shape[0], -1, pool).mean(-1).half())
            if bar is not None:
                bar.update(len(idx))
    reader.close()
    if bar is not None:
        bar.close()
    if png and pics_mask:
        cols = max(1, math.ceil(reader.length / (hop * pool)))  # drop the zero padding after the song
        _save_png(os.path.join(out_dir, f"{name}_mask.png"), torch.cat(pics_mag, 1)[:, :cols].float(),
                  torch.cat(pics_mask, 1)[:, :cols].float(), sr, hop * pool, name)
    return inst_path, voc_path


def _save_png(path, mag, mask, sr, hop, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
    ext = [0, mag.shape[1] * hop / sr, 0, sr / 2]
    a1.imshow(20 * torch.log10(mag + 1e-5).numpy(), origin="lower", aspect="auto", extent=ext, cmap="magma")
    a1.set_title(f"{title}: mixture (dB)"), a1.set_ylabel("Hz")
    im = a2.imshow(mask.numpy(), origin="lower", aspect="auto", extent=ext, vmin=0, vmax=1, cmap="viridis")
    a2.set_title("instrument mask"), a2.set_ylabel("Hz"), a2.set_xlabel("s")
    fig.colorbar(im, ax=[a1, a2], fraction=0.02)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="audio file or folder of audio files")
    p.add_argument("-o", "--out", default="separated", help="output folder")
    p.add_argument("--checkpoint", "-c", required=True)
    p.add_argument("--cropsize", type=int, default=None, help="frames kept per crop (default: the training crop)")
    p.add_argument("--padding", type=int, default=None, help="context frames each side (default cropsize // 2)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tta", action="store_true", help="average with the channel-swapped prediction")
    p.add_argument("--png", action="store_true", help="write <name>_mask.png")
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"])
    p.add_argument("--subtype", default="PCM_16", help="output WAV subtype (PCM_16, PCM_24, FLOAT)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1 on the CPU: this torch build runs the model's many small "
                        "matmuls several times slower with more threads)")
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.threads or device.type == "cpu":
        torch.set_num_threads(a.threads or 1)
    model, cfg = load_model(a.checkpoint, device, a.backend)
    cropsize = a.cropsize or cfg.get("cropsize", 256)
    if os.path.isdir(a.input):
        files = audio.list_audio_files(a.input)
        if not files:
            raise SystemExit(f"no audio files in {a.input}")
    elif os.path.exists(a.input):
        files = [a.input]
    else:
        raise SystemExit(f"no such file or folder: {a.input}")
    outputs = []
    for path in files:
        try:
            outs = separate_file(model, path, a.out, cfg["sr"], cfg["n_fft"], cfg["hop"], cropsize, a.padding,
                                 a.batch_size, a.tta, a.png, device, not a.no_progress, a.subtype)
        except audio.AudioError as e:
            print(f"warning: skipping {path}: {e}")
            continue
        outputs.append(outs)
        print(f"{path} -> {outs[0]}, {outs[1]}")
    return outputs


if __name__ == "__main__":
    main()
