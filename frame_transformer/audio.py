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

    up, down = _ratio(sr_in, sr_out)
    return resample_poly(wave, up, down, axis=-1).astype(np.float32)


def _ratio(sr_in: int, sr_out: int) -> Tuple[int, int]:
    g = math.gcd(int(sr_in), int(sr_out))
    return int(sr_out) // g, int(sr_in) // g


def resampled_length(n: int, sr_in: int, sr_out: int) -> int:
    """Samples that :func:`resample` (scipy's resample_poly) returns for ``n`` input samples."""
    up, down = _ratio(sr_in, sr_out)
    return -(-n * up // down)


class StreamResampler:
    """Polyphase resampling of a stream, block by block, in bounded memory.

    ``push(block)`` takes the next ``(C, n)`` input samples and returns the ``(C, m)`` output samples that are now
    final; ``flush()`` returns the rest. Concatenated, the outputs equal :func:`resample` (scipy's
    ``resample_poly``, the same Kaiser-windowed FIR) of the whole signal up to float rounding, with the same
    length ``ceil(n * sr_out / sr_in)``: each output range is computed from an input segment that starts on a
    multiple of ``down`` (so the output grid lines up) and carries the filter's full support on both sides.
    Memory: one block plus the filter's support (``10 * max(up, down) / up`` input samples each side).
    """

    def __init__(self, sr_in: int, sr_out: int, channels: int = 2):
        from scipy.signal import firwin

        self.up, self.down = _ratio(sr_in, sr_out)
        self.channels = channels
        half = 10 * max(self.up, self.down)                  # resample_poly's half filter length (upsampled rate)
        self.h = (firwin(2 * half + 1, 1.0 / max(self.up, self.down), window=("kaiser", 5.0))
                  if self.up != self.down else None)
        self.pad = half // self.up + 2                        # filter support in input samples, each side
        self.buf = np.zeros((channels, 0), dtype=np.float64)  # input samples [buf0, buf0 + buf.shape[1])
        self.buf0 = 0
        self.n_in = 0                                         # input samples pushed so far
        self.n_out = 0                                        # output samples returned so far

    def _segment_start(self, n0: int) -> int:
        """Start (a multiple of down) of the input segment whose resampling covers output sample n0 and on."""
        return self.down * ((n0 * self.down // self.up - self.pad) // self.down)

    def _compute(self, n1: int) -> np.ndarray:
        """Output samples [n_out, n1) from the buffer (zeros beyond the input pushed so far)."""
        from scipy.signal import resample_poly

        n0 = self.n_out
        if n1 <= n0:
            return np.zeros((self.channels, 0), dtype=np.float32)
        s0 = self._segment_start(n0)
        s1 = -(-(n1 - 1) * self.down // self.up) + self.pad + 1
        seg = np.zeros((self.channels, s1 - s0), dtype=np.float64)
        lo, hi = max(s0, self.buf0), min(s1, self.buf0 + self.buf.shape[1])
        if hi > lo:
            seg[:, lo - s0:hi - s0] = self.buf[:, lo - self.buf0:hi - self.buf0]
        o0 = s0 * self.up // self.down
        y = resample_poly(seg, self.up, self.down, axis=-1, window=self.h)[:, n0 - o0:n1 - o0]
        self.n_out = n1
        keep = self._segment_start(n1)                        # the next segment starts here: drop the rest
        if keep > self.buf0:
            self.buf = self.buf[:, min(keep - self.buf0, self.buf.shape[1]):]
            self.buf0 = keep
        return y.astype(np.float32)

    def push(self, block: np.ndarray) -> np.ndarray:
        block = np.asarray(block, dtype=np.float64).reshape(self.channels, -1)
        self.buf = np.concatenate([self.buf, block], axis=1)
        self.n_in += block.shape[1]
        if self.up == self.down:
            return self._passthrough()
        # largest n1 whose input support [.., ceil((n1 - 1) * down / up) + pad] has been pushed
        n1 = max(self.n_out, ((self.n_in - self.pad - 1) * self.up) // self.down)
        return self._compute(n1)

    def flush(self) -> np.ndarray:
        if self.up == self.down:
            return self._passthrough()
        return self._compute(resampled_length(self.n_in, self.down, self.up))

    def _passthrough(self) -> np.ndarray:
        out, self.buf = self.buf.astype(np.float32), self.buf[:, :0]
        self.buf0 = self.n_out = self.n_in
        return out


class AudioStream:
    """Reads an audio file as stereo float32 ``(2, n)`` windows at ``sr`` (resampled while streaming).

    ``read(start, length)`` returns samples ``[start, start + length)`` at ``sr``, zeros outside the song;
    ``start`` must not decrease between calls (windows may overlap). Memory stays bounded by one block and the
    largest window, whatever the file's length and rate. Raises :class:`AudioError` for unreadable files,
    more than two channels, empty files and NaN/Inf samples.
    """

    def __init__(self, path: str, sr: Optional[int] = None, block: int = 1 << 16):
        import soundfile as sf

        self.path = path
        try:
            self.file = sf.SoundFile(path)
        except Exception as e:
            raise AudioError(f"cannot read {path!r} as audio ({_short(e)})") from None
        try:
            if self.file.channels > 2:
                raise AudioError(f"{path!r}: expected mono or stereo audio, got {self.file.channels} channels")
            if self.file.frames <= 0:
                raise AudioError(f"audio file {path!r} is empty")
        except AudioError:
            self.file.close()
            raise
        self.file_sr = int(self.file.samplerate)
        self.file_frames = int(self.file.frames)
        self.sr = int(sr or self.file_sr)
        self.length = resampled_length(self.file_frames, self.file_sr, self.sr)
        self.block = block
        self.resampler = StreamResampler(self.file_sr, self.sr) if self.sr != self.file_sr else None
        self.buf = np.zeros((2, 0), dtype=np.float32)  # samples [buf0, buf0 + buf.shape[1]) at sr
        self.buf0 = 0
        self.eof = False

    def _pull(self) -> None:
        try:
            x = self.file.read(self.block, dtype="float32", always_2d=True)
        except Exception as e:
            raise AudioError(f"error reading {self.path!r} ({_short(e)})") from None
        if len(x) == 0:
            self.eof = True
            x = np.zeros((2, 0), np.float32)
        else:
            x = to_stereo(x.T)
            if not np.all(np.isfinite(x)):
                raise AudioError(f"audio file {self.path!r} contains NaN/Inf samples")
        if self.resampler is not None:
            x = self.resampler.flush() if self.eof else self.resampler.push(x)
        self.buf = np.concatenate([self.buf, x], axis=1)

    def read(self, start: int, length: int) -> np.ndarray:
        if max(start, 0) < self.buf0:  # those samples were dropped: reads must not go back
            raise ValueError(f"AudioStream.read: start {start} is before the retained window ({self.buf0})")
        while not self.eof and self.buf0 + self.buf.shape[1] < start + length:
            self._pull()
        out = np.zeros((2, length), dtype=np.float32)
        lo, hi = max(start, self.buf0), min(start + length, self.buf0 + self.buf.shape[1], self.length)
        if hi > lo:
            out[:, lo - start:hi - start] = self.buf[:, lo - self.buf0:hi - self.buf0]
        drop = max(0, min(start, self.buf0 + self.buf.shape[1]) - self.buf0)  # keep from start on
        self.buf, self.buf0 = self.buf[:, drop:], self.buf0 + drop
        return out

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _short(e: BaseException) -> str:
    """An exception's message on one line, without libsndfile's 'Error opening ...:' prefix."""
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg.split(": ", 1)[-1] if msg.startswith("Error opening") else msg


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


def reflect_index(positions: np.ndarray, length: int) -> np.ndarray:
    """Sample indices in ``[0, length)`` for ``positions`` outside it, mirrored as ``np.pad(mode="reflect")`` and
    ``torch.stft(center=True)`` mirror the signal at its ends (repeatedly, for a signal shorter than the pad)."""
    if length == 1:
        return np.zeros_like(positions)
    m = np.mod(positions, 2 * (length - 1))
    return np.where(m < length, m, 2 * (length - 1) - m)


class SpecStream:
    """The STFT of an :class:`AudioStream` in bounded memory, frame range by frame range.

    ``window(a, b)`` returns frames ``[a, b)`` as ``(2, n_fft // 2 + 1, b - a)`` complex64, equal (up to float
    rounding) to the same frames of :func:`stft` of the whole song - ``torch.stft(center=True)``, the song mirrored
    at both ends (librosa's ``stft`` before 0.10, which upstream used, does the same) - with zero frames outside
    ``[0, n_frames)``, ``n_frames = length // hop + 1``. ``a`` must not decrease between calls; frames from ``a``
    on are kept for the next call, so overlapping windows compute each frame once.
    """

    def __init__(self, stream: "AudioStream", n_fft: int, hop: int):
        self.stream, self.n_fft, self.hop = stream, n_fft, hop
        self.n_frames = num_frames(stream.length, hop)
        self.bins = n_fft // 2 + 1
        self.cache = torch.zeros(2, self.bins, 0, dtype=torch.complex64)  # frames [c0, c0 + cache width)
        self.c0 = 0

    def _compute(self, t0: int, t1: int) -> torch.Tensor:
        """Frames [t0, t1) (0 <= t0 < t1 <= n_frames) from the samples they cover, mirrored at the song's ends."""
        lo = t0 * self.hop - self.n_fft // 2
        positions = np.arange(lo, lo + (t1 - t0 - 1) * self.hop + self.n_fft)
        idx = reflect_index(positions, self.stream.length)
        first = int(idx.min())
        wave = self.stream.read(first, int(idx.max()) + 1 - first)[:, idx - first]
        return torch.stft(torch.from_numpy(wave), self.n_fft, self.hop,
                          window=_window(self.n_fft, "cpu", torch.float32), center=False, return_complex=True)

    def window(self, a: int, b: int) -> torch.Tensor:
        if max(a, 0) < self.c0:
            raise ValueError(f"SpecStream.window: start {a} is before the retained frames ({self.c0})")
        end = self.c0 + self.cache.shape[-1]
        lo, hi = max(a, end, 0), min(b, self.n_frames)
        if hi > lo:  # frames not computed yet (after the cache; a gap, if any, is never read again)
            self.cache = self.cache[..., :0] if lo > end else self.cache
            self.c0 = lo if lo > end else self.c0
            self.cache = torch.cat((self.cache, self._compute(lo, hi)), dim=-1)
        out = torch.zeros(2, self.bins, b - a, dtype=torch.complex64)
        lo, hi = max(a, self.c0, 0), min(b, self.c0 + self.cache.shape[-1])
        if hi > lo:
            out[..., lo - a:hi - a] = self.cache[..., lo - self.c0:hi - self.c0]
        drop = min(max(0, a - self.c0), self.cache.shape[-1])  # keep from a on
        self.cache, self.c0 = self.cache[..., drop:], self.c0 + drop
        return out


class IstftStream:
    """Inverse STFT of frames pushed in order, in bounded memory.

    ``push(spec)`` takes the next ``(C, n_fft // 2 + 1, n)`` frames (from frame 0 on) and returns the ``(C, m)``
    float32 samples that are now final; ``flush()`` returns the rest, up to ``length`` samples in all.
    Concatenated, the outputs equal :func:`istft` (``torch.istft(center=True, length=length)``) of all the frames
    at once up to float rounding: every sample is computed from all the frames that overlap it (at most
    ``ceil(n_fft / hop)`` of them are kept between pushes) and divided by the same window envelope.
    Needs ``hop <= n_fft // 2`` (the Hann window's envelope is zero somewhere otherwise).
    """

    def __init__(self, n_fft: int, hop: int, length: int):
        if not 1 <= hop <= n_fft // 2:
            raise ValueError(f"IstftStream needs 1 <= hop <= n_fft // 2, got hop {hop}, n_fft {n_fft}")
        self.n_fft, self.hop, self.length = n_fft, hop, length
        self.buf: Optional[torch.Tensor] = None  # frames [f0, f0 + buf width)
        self.f0 = 0
        self.pushed = 0   # frames pushed so far
        self.done = 0     # samples returned so far

    def _emit(self, s1: int) -> np.ndarray:
        """Samples [done, s1) from the buffered frames, then drop the frames no later sample needs."""
        if self.buf is None or s1 <= self.done:
            return np.zeros((0 if self.buf is None else self.buf.shape[0], 0), np.float32)
        y = istft(self.buf, self.n_fft, self.hop, length=s1 - self.f0 * self.hop)  # starts at sample f0 * hop
        out = y[..., self.done - self.f0 * self.hop:].numpy().astype(np.float32, copy=False)
        self.done = s1
        # frames that overlap sample s1 or later: t * hop - n_fft // 2 + n_fft > s1
        keep = max(0, -(-(s1 - self.n_fft + self.n_fft // 2 + 1) // self.hop))
        if keep > self.f0:
            self.buf = self.buf[..., keep - self.f0:]
            self.f0 = keep
        return out

    def push(self, spec: torch.Tensor) -> np.ndarray:
        self.buf = spec if self.buf is None else torch.cat((self.buf, spec), dim=-1)
        self.pushed += spec.shape[-1]
        # samples before the first not-yet-pushed frame's start are final
        return self._emit(min(self.length, self.pushed * self.hop - self.n_fft // 2))

    def flush(self) -> np.ndarray:
        return self._emit(self.length)


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
