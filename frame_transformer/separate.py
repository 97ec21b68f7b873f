r"""Separate songs into vocals and instruments with a trained FrameTransformer.

examples:
  frame-transformer-separate song.flac -c runs/demo/checkpoint.pt
  frame-transformer-separate music/ -o stems/ -c runs/demo/checkpoint.pt --tta --png
  frame-transformer-separate song.flac -c local.pth    (the seed's published v4 state_dict, as downloaded)
  python -m frame_transformer.separate song.flac -c runs/demo/checkpoint.pt    (the same, not installed)

outputs:
  Every input FILE gives OUT/FILE_Vocals.wav and OUT/FILE_Instruments.wav, where FILE is the input's path
  relative to the folder given (its file name for a single file), extension included: song.wav, song.flac and
  sub/song.wav give song.wav_Vocals.wav, song.flac_Vocals.wav and sub/song.wav_Vocals.wav, so nothing collides.
  Vocals are (1 - mask) * mixture with the mixture phase; instruments are mixture - vocals, so the two stems sum
  to the input. Stems are written at the input's sample rate (--rate model: the checkpoint's). Content above the
  model's band (half its sample rate) stays in the instruments.

  Files are written under a temporary name in the same folder and renamed when complete: an interrupted run or a
  full disk leaves no partial file under a final name. Our WAVs carry a software tag: a later run (for example
  with -o inside the input folder) skips them as inputs, and an existing file we did not write is never replaced.
  The exit code is 0 when every input was separated, 1 when any failed (the others are still separated), 130
  when interrupted.

method:
  The song is read as a stream, resampled to the model's rate on the fly; memory stays bounded by the crops
  whatever the song's length or rate. Two modes (--mode; auto: v4 for v4-architecture checkpoints):
  v4    upstream's inference_v4.py. A first pass finds the largest STFT magnitude of the whole song; the second
        divides every crop by it, runs crops of --cropsize frames (default 512) with --padding frames of context
        each side (default 1024; zeros beyond the song), keeps the centres' masks (sigmoid of the logits, Nyquist
        bin 0). --tta averages the masks over the context paddings --tta-paddings (0,256,512).
  crop  as train.py trains: each crop of --cropsize frames (default: the training crop) with --padding frames of
        context (default cropsize // 2) and one STFT window of margin is divided by its own maximum. --tta
        averages with the mask of the channel-swapped mix.
  Upstream state_dicts do not record their sample rate or hop: 44100 Hz and n_fft // 2 are assumed (a note says
  so), --sr and --hop set them.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import sys
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from frame_transformer import audio, upstream

PROG = "frame-transformer-separate"
TAG = "frame-transformer-separate"  # WAV software tag that marks our outputs
STEMS = ("Vocals", "Instruments")


class UserError(Exception):
    """A problem the user can fix (bad path, bad checkpoint, full disk): reported as one line, exit code 1."""


class CheckpointError(UserError):
    pass


class WriteError(UserError):
    """Writing an output failed (disk full, folder removed, ...): the run stops, finished files are kept."""


# ---------------------------------------------------------------------------------------------- checkpoint
def load_model(path: str, device="cpu", backend: Optional[str] = None):
    """(model in eval mode on ``device``, info dict with sr, n_fft, hop, cropsize, format, ...) from a checkpoint:
    a train.py checkpoint (or its run folder), a converted one, or a bare upstream v4 state_dict.

    Reads through :func:`frame_transformer.upstream.load_model`, the one loader; a missing, corrupt or foreign
    file raises :class:`CheckpointError` with a one-line message.
    """
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "checkpoint.pt")):
        path = os.path.join(path, "checkpoint.pt")  # a run folder
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path} (pass --checkpoint the checkpoint.pt that "
                              "frame-transformer-train wrote to its --out folder, or an upstream v4 .pth)")
    if not os.path.isfile(path):
        raise CheckpointError(f"--checkpoint {path} is a folder without a checkpoint.pt; pass the file")
    try:
        return upstream.load_model(path, device, backend)
    except upstream.CheckpointError as e:
        msg = " ".join(str(e).split())
        if "not a PyTorch checkpoint" in msg:
            msg += "; copy it again or pass another file"
        raise CheckpointError(f"cannot load checkpoint{'' if path in msg else ' ' + path}: {msg}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from None


# ---------------------------------------------------------------------------------------------- separation core
# upstream inference_v4.py's defaults for v4 mode: crops of 512 frames with 1024 frames of context each side;
# its separate_tta averages the masks over these context paddings
V4_CROPSIZE, V4_PADDING, V4_TTA_PADDINGS = 512, 1024, (0, 256, 512)
MODES = ("v4", "crop")


@dataclasses.dataclass
class CropOptions:
    """How a song is cut into model inputs.

    ``mode="crop"``: ``cropsize`` frames kept per crop, ``padding`` frames of context each side (default
    cropsize // 2), each crop normalised by its own maximum; ``tta`` averages with the channel-swapped input.
    ``mode="v4"`` (upstream's inference_v4.py): the whole song normalised by one maximum, ``padding`` frames of
    context (default cropsize // 2; the CLI's default is upstream's 1024); ``tta`` averages the masks over the
    context paddings ``tta_paddings`` instead. ``batch_size`` crops per forward pass."""
    cropsize: int = 256
    padding: Optional[int] = None
    batch_size: int = 4
    tta: bool = False
    mode: str = "crop"
    tta_paddings: Tuple[int, ...] = V4_TTA_PADDINGS

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.cropsize < 1 or self.batch_size < 1 or (self.padding is not None and self.padding < 0):
            raise ValueError(f"need cropsize >= 1, batch_size >= 1, padding >= 0; got {self.cropsize}, "
                             f"{self.batch_size}, {self.padding}")
        self.tta_paddings = tuple(int(p) for p in self.tta_paddings)
        if not self.tta_paddings or min(self.tta_paddings) < 0:
            raise ValueError(f"tta_paddings must be frame counts >= 0, got {self.tta_paddings}")

    def context(self) -> int:
        return self.cropsize // 2 if self.padding is None else self.padding

    def geometry(self, n_fft: int, hop: int) -> Tuple[int, int]:
        """Crop mode: (samples kept per crop, context samples each side = padding frames + one window of margin)."""
        return self.cropsize * hop, (self.context() + math.ceil(n_fft / hop)) * hop

    def v4_paddings(self) -> Tuple[int, ...]:
        """v4 mode: the context paddings whose masks are averaged (one unless ``tta``)."""
        return tuple(self.tta_paddings) if self.tta else (self.context(),)


@torch.no_grad()
def predict_mask(model, mag: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """mag (B, 2, bins, W) -> instrument mask in [0, 1], same shape; each crop normalised by its own max as in
    training. ``tta`` averages with the prediction for the channel-swapped input."""
    scale = mag.flatten(1).amax(1).clamp_min(1e-8)[:, None, None, None]
    x = mag / scale
    mask = model(x)
    if tta:
        mask = 0.5 * (mask + model(x.flip(1)).flip(1))
    return mask


def separate_crops(model, waves: torch.Tensor, n_fft: int, hop: int, tta: bool = False, device="cpu"):
    """waves (B, 2, N) padded mixture crops -> (vocals (B, 2, N), mag, mask (B, 2, bins, frames)).

    vocals = iSTFT((1 - mask) * X) with the mixture's phase X."""
    spec = audio.stft(waves, n_fft, hop)
    mag = spec.abs()
    mask = predict_mask(model, mag.to(device), tta).float().cpu()
    vocals = audio.istft(spec * (1 - mask), n_fft, hop, length=waves.shape[-1])
    return vocals, mag, mask


def iter_vocals(model, stream: audio.AudioStream, n_fft: int, hop: int, opts: CropOptions, device="cpu",
                on_crops: Optional[Callable] = None, on_batch: Optional[Callable[[int], None]] = None
                ) -> Iterator[np.ndarray]:
    """Yield the vocals at the stream's rate as (2, n) float32 blocks in order, ``stream.length`` samples in all.

    ``on_crops(mag, mask, first_kept_frame)`` sees every batch (for pictures); ``on_batch(crops)`` counts progress."""
    seg, margin = opts.geometry(n_fft, hop)
    n_seg = max(1, math.ceil(stream.length / seg))
    for b0 in range(0, n_seg, opts.batch_size):
        idx = range(b0, min(n_seg, b0 + opts.batch_size))
        waves = torch.from_numpy(np.stack([stream.read(k * seg - margin, seg + 2 * margin) for k in idx]))
        vocals, mag, mask = separate_crops(model, waves, n_fft, hop, opts.tta, device)
        if on_crops is not None:
            on_crops(mag, mask, margin // hop)
        for j, k in enumerate(idx):
            n = min(seg, stream.length - k * seg)
            if n > 0:
                yield vocals[j, :, margin:margin + n].numpy()
        if on_batch is not None:
            on_batch(len(idx))


def song_scale(path: str, sr: int, n_fft: int, hop: int, block: int = 2048) -> float:
    """v4 mode's first pass: the largest STFT magnitude of the whole song (every bin, both channels, every frame),
    streamed ``block`` frames at a time. 1.0 for a silent song (upstream would divide by zero)."""
    peak = 0.0
    with audio.AudioStream(path, sr) as stream:
        spec = audio.SpecStream(stream, n_fft, hop)
        for t0 in range(0, spec.n_frames, block):
            peak = max(peak, float(spec.window(t0, t0 + block).abs().max()))
    return peak if peak > 0 else 1.0


@torch.no_grad()
def v4_mask(model, mag: torch.Tensor, cropsize: int, paddings, device="cpu") -> torch.Tensor:
    """mag (B, 2, bins, cropsize + 2 P) normalised magnitudes of B crops with P = max(paddings) context frames each
    side -> (B, 2, bins, cropsize): the centre's mask, the mean over ``paddings`` of the mask the model gives for
    the crop with p frames of context each side (upstream's _separate; its separate_tta over several p)."""
    P = max(paddings)
    total = None
    for p in paddings:
        m = model(mag[..., P - p:P + cropsize + p].to(device))[..., p:p + cropsize].float().cpu()
        total = m if total is None else total + m
    return total / len(paddings)


def iter_vocals_v4(model, stream: audio.AudioStream, n_fft: int, hop: int, opts: CropOptions, scale: float,
                   device="cpu", on_crops: Optional[Callable] = None, on_batch: Optional[Callable[[int], None]] = None
                   ) -> Iterator[np.ndarray]:
    """v4 mode: yield the vocals at the stream's rate as (2, n) float32 blocks in order, ``stream.length`` in all.

    Upstream's inference_v4.py in bounded memory: X = STFT of the song (:class:`audio.SpecStream`), |X| / ``scale``
    (:func:`song_scale`), crops of ``cropsize`` frames, each seen with its context frames (zeros beyond the song),
    mask = sigmoid(logits) of the centre (Nyquist bin 0), vocals = iSTFT((1 - mask) * X)
    (:class:`audio.IstftStream`). Only ``batch_size`` crops and their context are held at a time."""
    spec = audio.SpecStream(stream, n_fft, hop)
    inverse = audio.IstftStream(n_fft, hop, stream.length)
    c, paddings = opts.cropsize, opts.v4_paddings()
    P = max(paddings)
    n_crops = math.ceil(spec.n_frames / c)
    for b0 in range(0, n_crops, opts.batch_size):
        b1 = min(n_crops, b0 + opts.batch_size)
        X = spec.window(b0 * c - P, b1 * c + P)  # (2, bins, (b1 - b0) c + 2 P), zeros outside the song
        mag = X.abs() / scale
        crops = torch.stack([mag[..., j * c:j * c + c + 2 * P] for j in range(b1 - b0)])
        mask = v4_mask(model, crops, c, paddings, device)  # (B, 2, bins, c)
        centre = X[..., P:P + (b1 - b0) * c]
        if on_crops is not None:
            on_crops(centre.abs().unflatten(-1, (b1 - b0, c)).permute(2, 0, 1, 3), mask, 0)
        keep = min(b1 * c, spec.n_frames) - b0 * c
        vocals = (1 - mask.permute(1, 2, 0, 3).flatten(2)[..., :keep]) * centre[..., :keep]
        block = inverse.push(vocals)
        if block.shape[1]:
            yield block
        if on_batch is not None:
            on_batch(b1 - b0)
    block = inverse.flush()
    if block.shape[1]:
        yield block


def num_crops(stream_length: int, hop: int, opts: CropOptions) -> int:
    if opts.mode == "v4":
        return math.ceil(audio.num_frames(stream_length, hop) / opts.cropsize)
    return max(1, math.ceil(stream_length / (opts.cropsize * hop)))


def iter_stems(model, path: str, cfg: dict, opts: CropOptions, device="cpu", rate: str = "input",
               on_crops: Optional[Callable] = None, progress: bool = False
               ) -> Iterator[Tuple[np.ndarray, np.ndarray, int]]:
    """Separate ``path``; yield (vocals, instruments, sample rate) blocks, each (2, n) float32, in order.

    ``rate="input"``: stems at the file's rate (the vocals resampled back from the model's rate while streaming);
    ``"model"``: at the checkpoint's rate. The instruments are mixture - vocals at that rate, so the stems sum to
    the mixture (at the model's rate that is iSTFT(mask * X), upstream's instruments, up to float rounding).
    ``opts.mode == "v4"`` reads the file twice (:func:`song_scale`, then :func:`iter_vocals_v4`). Raises
    :class:`audio.AudioError` for files that cannot be read.
    """
    sr = int(cfg["sr"])
    scale = song_scale(path, sr, cfg["n_fft"], cfg["hop"]) if opts.mode == "v4" else None
    with audio.AudioStream(path, sr) as model_in:
        out_sr = model_in.file_sr if rate == "input" else sr
        with audio.AudioStream(path, out_sr) as mixture:
            back = audio.StreamResampler(sr, out_sr) if out_sr != sr else None
            total, pos = mixture.length, 0
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=num_crops(model_in.length, cfg["hop"], opts),
                           desc=os.path.basename(path)[:30], unit="crop", leave=False)

            def emit(v):
                nonlocal pos
                v = v[:, :total - pos]
                if v.shape[1]:
                    yield v, mixture.read(pos, v.shape[1]) - v, out_sr
                    pos += v.shape[1]

            tick = bar.update if bar is not None else None
            if opts.mode == "v4":
                vocals = iter_vocals_v4(model, model_in, cfg["n_fft"], cfg["hop"], opts, scale, device, on_crops,
                                        tick)
            else:
                vocals = iter_vocals(model, model_in, cfg["n_fft"], cfg["hop"], opts, device, on_crops, tick)
            try:
                for v in vocals:
                    yield from emit(back.push(v) if back is not None else v)
                if back is not None:
                    yield from emit(back.flush())
                if pos < total:  # resampling rounds the length: the last sample(s) of the vocals are zero
                    yield from emit(np.zeros((2, total - pos), np.float32))
            finally:
                if bar is not None:
                    bar.close()


# ---------------------------------------------------------------------------------------------- output files
def output_paths(rel: str, out_dir: str) -> Dict[str, str]:
    """Output files for the input at ``rel`` (its path relative to the input folder, extension included)."""
    base = os.path.join(out_dir, rel)
    return dict(vocals=f"{base}_Vocals.wav", instruments=f"{base}_Instruments.wav", png=f"{base}_mask.png")


def written_by_us(path: str) -> bool:
    """True when ``path`` is a WAV that this command wrote (its software tag)."""
    import soundfile as sf

    try:
        with sf.SoundFile(path) as f:
            return (f.software or "").startswith(TAG)
    except Exception:
        return False


def _write_error_reason(e: BaseException, f=None) -> str:
    """The OS reason of a failed write (libsndfile reports 'System error' with the detail kept per file)."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    try:
        import soundfile as sf

        if f is not None and getattr(f, "_file", None) is not None:
            msg = sf._ffi.string(sf._snd.sf_strerror(f._file)).decode(errors="replace")
            return msg.split(":", 1)[-1].strip().rstrip(".") or audio._short(e)
    except Exception:
        pass
    return audio._short(e)


class _AtomicWav:
    """A stereo WAV written to a hidden temporary file beside ``path`` and renamed onto it by :meth:`commit`."""

    def __init__(self, path: str, sr: int, subtype: str, comment: str):
        import soundfile as sf

        self.path = path
        self.tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
        self.clip = subtype.startswith("PCM")
        try:
            self.f = sf.SoundFile(self.tmp, "w", sr, 2, subtype=subtype, format="WAV")
        except Exception as e:
            raise WriteError(f"cannot create {path}: {_write_error_reason(e)}; choose another folder with -o") \
                from None
        self.f.software = TAG
        self.f.comment = comment

    def write(self, block: np.ndarray) -> None:
        if self.clip:
            block = np.clip(block, -1.0, 1.0)
        try:
            _write_block(self.f, block.T)
        except Exception as e:
            raise WriteError(f"writing {self.path} failed: {_write_error_reason(e, self.f)}; free some space or "
                             "choose another folder with -o") from None

    def commit(self) -> None:
        try:
            self.f.close()
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.path)
        except Exception as e:
            raise WriteError(f"writing {self.path} failed: {_write_error_reason(e)}; free some space or "
                             "choose another folder with -o") from None

    def discard(self) -> None:
        try:
            self.f.close()
        except Exception:
            pass
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass


def _write_block(f, frames: np.ndarray) -> None:
    """One write to an open SoundFile (a seam for tests that simulate a full disk)."""
    f.write(frames)


class _MaskPicture:
    """Collects a downsampled mixture spectrogram and mask while separating, for ``--png``."""

    def __init__(self, cropsize: int, n_fft: int, length_frames: int):
        self.cropsize = cropsize
        self.pool = max(1, math.ceil(length_frames / 2000))
        self.fstep = max(1, (n_fft // 2 + 1) // 256)
        self.mags, self.masks = [], []

    def __call__(self, mag, mask, c0):
        centre = slice(c0, c0 + self.cropsize)
        for j in range(mask.shape[0]):
            for src, dst in ((mask, self.masks), (mag, self.mags)):
                m = src[j, :, ::self.fstep, centre].mean(0)
                w = (m.shape[-1] // self.pool) * self.pool
                dst.append(m[:, :w].reshape(m.shape[0], -1, self.pool).mean(-1).half())

    def save(self, path: str, sr: int, hop: int, length: int, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cols = max(1, math.ceil(length / (hop * self.pool)))  # drop the zero padding after the song
        mag = torch.cat(self.mags, 1)[:, :cols].float()
        mask = torch.cat(self.masks, 1)[:, :cols].float()
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(12, 6), sharex=True)
        ext = [0, mag.shape[1] * hop * self.pool / sr, 0, sr / 2]
        a1.imshow(20 * torch.log10(mag + 1e-5).numpy(), origin="lower", aspect="auto", extent=ext, cmap="magma")
        a1.set_title(f"{title}: mixture (dB)"), a1.set_ylabel("Hz")
        im = a2.imshow(mask.numpy(), origin="lower", aspect="auto", extent=ext, vmin=0, vmax=1, cmap="viridis")
        a2.set_title("instrument mask"), a2.set_ylabel("Hz"), a2.set_xlabel("s")
        fig.colorbar(im, ax=[a1, a2], fraction=0.02)
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
        try:
            fig.savefig(tmp, dpi=100, format="png")
            os.replace(tmp, path)
        except OSError as e:
            raise WriteError(f"writing {path} failed: {_write_error_reason(e)}; free some space or choose "
                             "another folder with -o") from None
        finally:
            plt.close(fig)
            if os.path.exists(tmp):
                os.remove(tmp)


def separate_file(model, path: str, outputs: Dict[str, str], cfg: dict, opts: CropOptions, device="cpu",
                  rate: str = "input", png: bool = False, progress: bool = False, subtype: str = "PCM_16"
                  ) -> Dict[str, str]:
    """Separate ``path`` into ``outputs["vocals"]`` and ``outputs["instruments"]`` (and ``outputs["png"]``).

    Both stems are written to temporary files and renamed into place only when complete; on any error or
    interrupt the temporary files are removed and nothing is left under the final names. Returns the paths written.
    """
    for key in STEMS:
        p = outputs[key.lower()]
        if os.path.exists(p) and not written_by_us(p):
            raise UserError(f"{p} exists and was not written by {PROG}: not replacing it (move it, or choose "
                            "another folder with -o)")
    if png and os.path.exists(outputs["png"]) and not os.path.exists(outputs["vocals"]):
        raise UserError(f"{outputs['png']} exists and was not written by {PROG}: not replacing it")
    with audio.AudioStream(path, cfg["sr"]) as probe:  # unreadable input: AudioError before anything is written
        out_sr = probe.file_sr if rate == "input" else int(cfg["sr"])
        model_length = probe.length
    picture = _MaskPicture(opts.cropsize, cfg["n_fft"], math.ceil(model_length / cfg["hop"])) if png else None
    os.makedirs(os.path.dirname(os.path.abspath(outputs["vocals"])), exist_ok=True)
    files: List[_AtomicWav] = []
    stems = iter_stems(model, path, cfg, opts, device, rate, picture, progress)
    try:
        comment = f"separated from {os.path.basename(path)}"
        for k in STEMS:
            files.append(_AtomicWav(outputs[k.lower()], out_sr, subtype, f"{k.lower()} {comment}"))
        for vocals, instruments, _ in stems:
            files[0].write(vocals)
            files[1].write(instruments)
        for f in files:
            f.commit()
        written = {k.lower(): outputs[k.lower()] for k in STEMS}
        if picture is not None:
            picture.save(outputs["png"], cfg["sr"], cfg["hop"], model_length, os.path.basename(path))
            written["png"] = outputs["png"]
        return written
    finally:
        stems.close()
        for f in files:
            if os.path.exists(f.tmp):
                f.discard()


# ---------------------------------------------------------------------------------------------- inputs
def find_inputs(inp: str, out_dir: str) -> List[Tuple[str, str]]:
    """(path, path relative to the input) of every audio file to separate: ``inp`` itself, or the audio files
    under the folder ``inp`` (sorted, hidden files and folders skipped), leaving out the output folder."""
    if os.path.isfile(inp):
        return [(inp, os.path.basename(inp))]
    if not os.path.isdir(inp):
        raise UserError(f"no such file or folder: {inp}")
    out_real = os.path.realpath(out_dir)
    found = []
    for root, dirs, files in os.walk(inp):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and os.path.realpath(os.path.join(root, d)) != out_real)
        for name in sorted(files):
            p = os.path.join(root, name)
            if audio.is_audio_file(p):
                found.append((p, os.path.relpath(p, inp)))
    if not found:
        raise UserError(f"no audio files ({', '.join(audio.AUDIO_EXTENSIONS)}) in {inp}")
    return found


def check_output_folder(out_dir: str) -> None:
    """Create ``out_dir`` and check that a file can be written there (one-line error otherwise)."""
    import tempfile

    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"output folder {out_dir} is a file; choose a folder with -o")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UserError(f"cannot write to output folder {out_dir}: {e.strerror or e}; choose another with -o") \
            from None


# ---------------------------------------------------------------------------------------------- command line
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends "(default: X)" to every option that takes a value, unless its
    help already says what the default is (flags default to off)."""

    def _get_help_string(self, action):
        h = action.help or ""
        if (action.option_strings and action.nargs != 0 and action.default is not None
                and action.default is not argparse.SUPPRESS and "default" not in h):
            h += " (default: %(default)s)"
        return h


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def paddings_list(s: str) -> Tuple[int, ...]:
    try:
        values = tuple(int(v) for v in s.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame counts >= 0 such as 0,256,512, got {s!r}")
    return values


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options shared with frame-transformer-evaluate: checkpoint, inference mode, crops, STFT, device."""
    p.add_argument("-c", "--checkpoint", required=True,
                   help="checkpoint.pt written by frame-transformer-train (or its run folder), a converted "
                        "checkpoint, or an upstream frame_transformer_v4 state_dict (.pth) such as the seed's")
    p.add_argument("--mode", default="auto", choices=["auto", *MODES],
                   help="v4: upstream inference_v4.py's (the whole song normalised by one maximum, found in a first "
                        "pass); crop: each crop normalised by its own maximum, as train.py trains; auto: v4 for "
                        "v4-architecture checkpoints, crop otherwise")
    p.add_argument("--cropsize", type=positive_int, default=None,
                   help=f"frames kept per crop (default: {V4_CROPSIZE} in v4 mode, the checkpoint's training crop "
                        "in crop mode)")
    p.add_argument("--padding", type=non_negative_int, default=None,
                   help=f"context frames on each side of a crop (default: {V4_PADDING} in v4 mode, cropsize // 2 "
                        "in crop mode)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="crops per forward pass (default: 1 in v4 mode, whose crops are cropsize + 2 * padding "
                        "frames long; 4 in crop mode)")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: in v4 mode upstream's (average the masks over the context "
                        "paddings --tta-paddings); in crop mode also predict the channel-swapped mix and average")
    p.add_argument("--tta-paddings", type=paddings_list, default=None,
                   help="v4-mode --tta: the context paddings (frames) whose masks are averaged (default: "
                        f"{','.join(map(str, V4_TTA_PADDINGS))}, upstream's)")
    p.add_argument("--sr", type=positive_int, default=None,
                   help="sample rate the model was trained at: for upstream state_dicts, which do not record it "
                        f"(default: the checkpoint's; upstream: assumed {upstream.UPSTREAM_DEFAULTS['sr']})")
    p.add_argument("--hop", type=positive_int, default=None,
                   help="STFT hop the model was trained with, for upstream state_dicts (default: the checkpoint's; "
                        "upstream: assumed n_fft // 2, train4.py's 1024 at n_fft 2048)")
    p.add_argument("--n-fft", type=positive_int, default=None,
                   help="STFT size: a check only, the model's tensor shapes fix it (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--backend", default="auto", choices=["auto", "triton", "reference"],
                   help="ops implementation: Triton kernels (CUDA), the PyTorch reference, or auto by device")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default 1 on the CPU: this torch build runs the model's many small "
                        "matmuls several times slower with more threads)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("input", help="audio file, or folder of audio files (searched recursively)")
    p.add_argument("-o", "--out", default="separated", help="output folder (mirrors the input's folders)")
    add_model_options(p)
    p.add_argument("--rate", default="input", choices=["input", "model"],
                   help="sample rate of the stems: the input file's, or the checkpoint's")
    p.add_argument("--png", action="store_true", help="also write FILE_mask.png (mixture spectrogram and mask)")
    p.add_argument("--subtype", default="PCM_16", choices=["PCM_16", "PCM_24", "PCM_32", "FLOAT"],
                   help="WAV sample format of the stems (PCM is clipped to [-1, 1])")
    return p


def stft_settings(cfg: dict, a, prog: str = PROG) -> dict:
    """The checkpoint's sr / hop / n_fft with --sr / --hop / --n-fft applied: they replace what the checkpoint
    only assumes (``cfg["assumed"]``, upstream state_dicts); a recorded value must not be contradicted. Prints a
    note naming the assumptions left."""
    cfg = dict(cfg)
    assumed = set(cfg.get("assumed") or ())
    for name in ("sr", "hop"):
        value = getattr(a, name, None)
        if value is None:
            continue
        if value != cfg[name] and name not in assumed:
            raise UserError(f"--{name} {value} contradicts the checkpoint, which was trained with {name} "
                            f"{cfg[name]}; --{name} only sets what an upstream state_dict does not record")
        cfg[name] = value
        assumed.discard(name)
    n_fft = getattr(a, "n_fft", None)
    if n_fft is not None and n_fft != cfg["n_fft"]:
        raise UserError(f"--n-fft {n_fft} does not fit the checkpoint: its model takes n_fft {cfg['n_fft']} "
                        f"({cfg['n_fft'] // 2 + 1} bins, fixed by its tensor shapes); drop --n-fft")
    if not 1 <= cfg["hop"] <= cfg["n_fft"] // 2:
        raise UserError(f"hop {cfg['hop']} does not fit n_fft {cfg['n_fft']}: the inverse STFT needs a hop of at "
                        f"most n_fft // 2 = {cfg['n_fft'] // 2}"
                        + ("; pass another --hop" if "hop" in (cfg.get("assumed") or ()) else ""))
    cfg["assumed"] = sorted(assumed)
    left = [n for n in ("sr", "hop") if n in assumed]
    if left:
        what = " and ".join(f"{n} {cfg[n]}" for n in left)
        print(f"{prog}: note: {os.path.basename(a.checkpoint)} does not record its {' or '.join(left)}: assuming "
              f"{what} (upstream's settings); pass {' and '.join('--' + n for n in left)} if it was trained "
              "otherwise", file=sys.stderr)
    return cfg


def crop_options(a, cfg: dict, architecture: str) -> CropOptions:
    """Mode and crop options from parsed arguments: v4 mode for v4 checkpoints unless --mode says otherwise."""
    mode = a.mode if a.mode != "auto" else ("v4" if architecture == "v4" else "crop")
    if a.tta_paddings is not None and not (mode == "v4" and a.tta):
        raise UserError("--tta-paddings sets v4 mode's --tta; add --tta" + (" and --mode v4" if mode != "v4" else ""))
    if mode == "v4" and a.tta and a.padding is not None:
        raise UserError("--padding is not used by --tta in v4 mode, which averages the masks over --tta-paddings "
                        f"(default {','.join(map(str, V4_TTA_PADDINGS))}); drop --padding or set --tta-paddings")
    if mode == "v4":
        return CropOptions(cropsize=a.cropsize or V4_CROPSIZE, padding=V4_PADDING if a.padding is None else a.padding,
                           batch_size=a.batch_size or 1, tta=a.tta, mode="v4",
                           tta_paddings=a.tta_paddings or V4_TTA_PADDINGS)
    return CropOptions(cropsize=a.cropsize or int(cfg.get("cropsize") or 256), padding=a.padding,
                       batch_size=a.batch_size or 4, tta=a.tta, mode="crop")


def setup(a, prog: str = PROG) -> Tuple[torch.nn.Module, dict, CropOptions, torch.device]:
    """Device, threads, model, STFT settings and crop options from parsed arguments (shared with evaluate)."""
    try:
        device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"unknown --device {a.device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but PyTorch sees no CUDA GPU; use --device cpu (or install CUDA PyTorch)")
    if a.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise UserError("--backend triton needs a CUDA device; use --backend auto or reference on the CPU")
    if a.threads or device.type == "cpu":
        torch.set_num_threads(a.threads or 1)
    model, cfg = load_model(a.checkpoint, device, a.backend)
    cfg = stft_settings(cfg, a, prog)
    return model, cfg, crop_options(a, cfg, model.config.architecture), device


def run(a) -> int:
    """Separate every input; returns the exit code (0 all done, 1 any failure)."""
    model, cfg, opts, device = setup(a)
    inputs = find_inputs(a.input, a.out)
    check_output_folder(a.out)
    done, skipped, failed = 0, 0, []
    for path, rel in inputs:
        if written_by_us(path):
            skipped += 1
            continue
        try:
            written = separate_file(model, path, output_paths(rel, a.out), cfg, opts, device, a.rate, a.png,
                                    not a.no_progress, a.subtype)
        except WriteError as e:
            raise WriteError(f"{e} (kept the {done} file{'s' * (done != 1)} finished before it)") from None
        except (audio.AudioError, UserError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            failed.append(rel)
            continue
        done += 1
        print(f"{path} -> {written['vocals']}, {written['instruments']}", flush=True)
    todo = len(inputs) - skipped
    parts = [f"separated {done} of {todo} file{'s' * (todo != 1)} into {a.out}"]
    if skipped:
        parts.append(f"skipped {skipped} written by {PROG} (our own outputs)")
    if failed:
        parts.append(f"{len(failed)} failed: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}")
    if os.path.isdir(a.input):  # a single file's line (or error) says it all
        print("; ".join(parts), file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def cli(run_fn: Callable, parser: argparse.ArgumentParser, prog: str, argv=None,
        interrupted: str = "finished files are kept, the one in progress was removed") -> int:
    """Parse, run, and turn user errors and interrupts into one line on stderr and an exit code."""
    a = parser.parse_args(argv)
    old = signal.signal(signal.SIGTERM, _sigterm) if _main_thread() else None
    try:
        return run_fn(a)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; {interrupted}", file=sys.stderr)
        return 130
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def main(argv=None) -> int:
    return cli(run, build_parser(), PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
