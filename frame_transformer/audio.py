"""Audio I/O and spectrogram helpers.

Waveforms are numpy float32 arrays ``(channels, samples)``; the model works on stereo, so mono files
are duplicated to two channels. Spectrograms come from :func:`torch.stft` with a Hann window
(``center=True``), shape ``(channels, n_fft // 2 + 1, frames)`` complex.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import numpy as np
import torch

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3")


class AudioError(RuntimeError):
    """An audio file could not be read (corrupt, unsupported, empty)."""


def is_audio_file(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(AUDIO_EXTENSIONS) and not os.path.basename(path).startswith(".")


def list_audio_files(folder: str):
    """Sorted audio files directly inside ``folder`` (recursing into sub-folders)."""
    out = []
    for root, _dirs, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            if is_audio_file(p):
                out.append(p)
    return sorted(out)


def to_stereo(wave: np.ndarray) -> np.ndarray:
    """(C, N) -> (2, N): mono duplicated, more than two channels refused."""
    if wave.ndim == 1:
        wave = wave[None]
    if wave.shape[0] == 1:
        return np.concatenate([wave, wave], axis=0)
    if wave.shape[0] == 2:
        return wave
    raise AudioError(f"expected mono or stereo audio, got {wave.shape[0]} channels")


def resample(wave: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling (scipy.signal.resample_poly) along the last axis."""
    if sr_in == sr_out:
        return wave
    from scipy.signal import resample_poly

    g = math.gcd(int(sr_in), int(sr_out))
    return resample_poly(wave, sr_out // g, sr_in // g, axis=-1).astype(np.float32)


def load_audio(path: str, sr: Optional[int] = None, stereo: bool = True,
               allow_resample: bool = True) -> Tuple[np.ndarray, int]:
    """Read ``path`` (wav/flac/ogg, anything libsndfile reads) as float32 ``(C, N)``.

    With ``sr`` set, audio at another rate is resampled (or, with ``allow_resample=False``, refused
    with a clear error). Raises :class:`AudioError` for unreadable or empty files.
    """
    import soundfile as sf

    try:
        data, file_sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError/RuntimeError/etc.
        raise AudioError(f"cannot read audio file {path!r}: {e}") from e
    if data.shape[0] == 0:
        raise AudioError(f"audio file {path!r} is empty")
    wave = np.ascontiguousarray(data.T)
    if stereo:
        try:
            wave = to_stereo(wave)
        except AudioError as e:
            raise AudioError(f"{path!r}: {e}") from None
    if not np.all(np.isfinite(wave)):
        raise AudioError(f"audio file {path!r} contains NaN/Inf samples")
    if sr is not None and file_sr != sr:
        if not allow_resample:
            raise AudioError(f"{path!r} has sample rate {file_sr} Hz but {sr} Hz is required "
                             "(resampling disabled)")
        wave = resample(wave, file_sr, sr)
        file_sr = sr
    return wave, int(file_sr)


def save_audio(path: str, wave, sr: int, subtype: str = "PCM_16") -> None:
    """Write ``(C, N)`` float audio (clipped to [-1, 1] for integer subtypes)."""
    import soundfile as sf

    if isinstance(wave, torch.Tensor):
        wave = wave.detach().cpu().numpy()
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 1:
        wave = wave[None]
    if subtype.startswith("PCM"):
        wave = np.clip(wave, -1.0, 1.0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sf.write(path, wave.T, sr, subtype=subtype)


_WINDOWS = {}


def _window(n_fft: int, device, dtype) -> torch.Tensor:
    key = (n_fft, str(device), dtype)
    w = _WINDOWS.get(key)
    if w is None:
        w = _WINDOWS[key] = torch.hann_window(n_fft, device=device, dtype=dtype)
    return w


def stft(wave, n_fft: int = 2048, hop: int = 1024) -> torch.Tensor:
    """(..., N) real -> (..., n_fft // 2 + 1, frames) complex (Hann window, center=True)."""
    x = torch.as_tensor(wave)
    if not x.is_floating_point():
        x = x.float()
    shape = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    spec = torch.stft(flat, n_fft, hop, window=_window(n_fft, x.device, x.dtype), center=True,
                      return_complex=True)
    return spec.reshape(*shape, *spec.shape[-2:])


def istft(spec: torch.Tensor, n_fft: int = 2048, hop: int = 1024, length: Optional[int] = None) -> torch.Tensor:
    """Inverse of :func:`stft`: (..., n_fft // 2 + 1, frames) complex -> (..., N) real."""
    shape = spec.shape[:-2]
    flat = spec.reshape(-1, *spec.shape[-2:])
    rdtype = torch.float64 if spec.dtype == torch.complex128 else torch.float32
    wave = torch.istft(flat, n_fft, hop, window=_window(n_fft, spec.device, rdtype), center=True, length=length)
    return wave.reshape(*shape, wave.shape[-1])


def num_frames(samples: int, hop: int) -> int:
    return samples // hop + 1


def normalize_pair(x_mag: torch.Tensor, *others: torch.Tensor, eps: float = 1e-8):
    """Divide the mixture magnitude (and the targets) by the mixture's max: mixture in [0, 1]."""
    scale = x_mag.amax().clamp_min(eps)
    return (x_mag / scale,) + tuple(o / scale for o in others)


def usdr(estimate, reference, eps: float = 1e-8) -> float:
    """Utterance SDR in dB: 10 log10(|s|^2 / |s - s_hat|^2) over all channels and samples."""
    from frame_transformer.metrics import sdr

    return sdr(estimate, reference, eps)
