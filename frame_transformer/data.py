"""Training data: a cache of complex spectrograms and the voxaug dataset.

* :class:`SpectrogramCache` - every audio file is read once (resampled, mono -> stereo), its STFT stored as
  a complex64 ``.npy`` ``(2, n_fft // 2 + 1, frames)`` under the cache folder (written atomically, keyed by
  path, size, mtime and STFT settings) and crops are read through a memory map, so epochs never redo the
  STFT. A file that cannot be read is reported by name (a warning) and skipped. :func:`song_max` gives a cached
  file's largest magnitude (computed once, kept beside it in ``.max``).
* :class:`VoxAugDataset` - each item mixes a random crop of an instrumental track with a random crop of a
  vocal stem (the STFT is linear, so mixing happens on the complex spectrograms), with augmentations
  (:data:`AUGMENTATIONS`): channel swaps, random gains, an occasional silent vocal channel, occasional items
  without vocals. Optional (mixture, instrumental) pairs join the pool. Item = ``(X, Y)`` magnitudes
  ``(2, bins, cropsize)``, X the mixture's and Y the instrumental's (the target), both divided by one scale
  (``normalize``, below); ``return_complex=True`` adds the complex mixture and vocal spectrograms divided by the
  same scale (unclipped), for SDR. Randomness comes from ``(seed, epoch, index)`` only, so items are
  reproducible, worker-independent and resumable; ``cropsize`` may change between epochs (a curriculum).

Normalisation (``normalize``):

* ``"crop"``: the scale is the item's own mixture maximum, ``max |X|`` over the crop (after mixing and
  augmentation): X peaks at exactly 1. Inference divides each crop by its maximum the same way.
* ``"song"``: upstream's v4 recipe (``dataset_voxaug.py`` with the patches ``lib/dataset.make_dataset`` writes,
  kingoomieiii/frame-transformer @ 7bdd31d). The scale is fixed per source song *before mixing*: upstream stores
  ``c = max(|X_song|.max(), |Y_song|.max())`` over the whole song's spectrograms with every patch. For a voxaug
  item its X and Y are both the instrumental track, so ``c`` is the instrumental song's maximum magnitude (times
  the instrumental gain when :data:`AUGMENTATIONS` applies one: a gain scales song and crop alike); the vocal
  crop added to it does not enter ``c``, so a loud vocal can push mixture bins past 1. For a pair ``c`` is the
  larger of the mixture song's and the instrumental song's maxima. Then, as upstream,
  ``X = clip(|mix| / c, 0, 1)`` and ``Y = clip(|instrumental| / c, 0, 1)``. Upstream's v4 inference divides
  the whole song by one maximum likewise.
* ``clip_target=True`` (upstream, training items only): ``Y = min(Y, X)``, applied last, so the target never
  asks for a mask above 1 (a bin where the vocal cancels the instrumental).
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from frame_transformer import audio

log = logging.getLogger("frame_transformer.data")


class DataError(ValueError):
    """A data folder is missing, is not a folder, or holds no readable audio (the message names it)."""


def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


class SpectrogramCache:
    def __init__(self, cache_dir: str, sr: int, n_fft: int = 2048, hop: int = 1024):
        self.cache_dir, self.sr, self.n_fft, self.hop = cache_dir, int(sr), int(n_fft), int(hop)
        os.makedirs(cache_dir, exist_ok=True)
        self.failed: List[str] = []

    def key_path(self, path: str) -> str:
        st = os.stat(path)
        ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{self.sr}|{self.n_fft}|{self.hop}|v1"
        h = hashlib.sha1(ident.encode()).hexdigest()[:16]
        stem = os.path.splitext(os.path.basename(path))[0][:60]
        return os.path.join(self.cache_dir, f"{stem}-{h}.npy")

    def compute(self, path: str) -> np.ndarray:
        wave, _ = audio.load_audio(path, sr=self.sr)
        return audio.stft(torch.from_numpy(wave), self.n_fft, self.hop).numpy().astype(np.complex64)

    def get(self, path: str) -> Optional[str]:
        """Cached spectrogram file for ``path`` (computed when missing); None (with a warning) if unreadable."""
        try:
            out = self.key_path(path)
        except OSError as e:
            self.failed.append(path)
            _warn(f"skipping {path}: {e}")
            return None
        if os.path.exists(out):
            try:
                np.load(out, mmap_mode="r")
                return out
            except Exception:  # a damaged cache entry: rebuild it
                pass
        try:
            spec = self.compute(path)
        except Exception as e:
            self.failed.append(path)
            _warn(f"skipping unreadable audio file {path}: {e}")
            return None
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".npy.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, spec)
            os.replace(tmp, out)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return out

    def build(self, paths: Sequence[str], desc: str = "caching", progress: bool = False) -> List[str]:
        """Cache every file; returns the cache files of those that could be read (order kept)."""
        it = paths
        if progress:
            from tqdm import tqdm

            it = tqdm(paths, desc=desc, leave=False)
        return [c for c in (self.get(p) for p in it) if c is not None]


def _load_crop(cache_file: str, start: int, length: int) -> np.ndarray:
    spec = np.load(cache_file, mmap_mode="r")
    crop = np.asarray(spec[..., start:start + length])
    if crop.shape[-1] < length:
        pad = np.zeros(crop.shape[:-1] + (length - crop.shape[-1],), dtype=crop.dtype)
        crop = np.concatenate([crop, pad], axis=-1)
    return crop


def _frames(cache_file: str) -> int:
    return int(np.load(cache_file, mmap_mode="r").shape[-1])


def song_max(cache_file: str) -> float:
    """Largest magnitude of a cached spectrogram (whole song, every channel and bin): computed once in chunks,
    then kept beside it in ``<name>.max`` (the cache key covers the audio file, so the value stays valid)."""
    side = cache_file[:-len(".npy")] + ".max" if cache_file.endswith(".npy") else cache_file + ".max"
    try:
        with open(side) as f:
            return float(f.read())
    except (OSError, ValueError):
        pass
    spec = np.load(cache_file, mmap_mode="r")
    step = 4096
    value = max((float(np.abs(spec[..., i:i + step]).max()) for i in range(0, spec.shape[-1], step)), default=0.0)
    try:  # best effort: a read-only cache just recomputes next time
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(side) or ".", suffix=".max.tmp")
        with os.fdopen(fd, "w") as f:
            f.write(repr(value))
        os.replace(tmp, side)
    except OSError:
        pass
    return value


# Augmentation recipes (VoxAugDataset keyword arguments). "standard": this project's; "upstream": upstream's v4
# dataset_voxaug.py @ 7bdd31d: vocals swapped left/right with p 0.5 and scaled by U[0.5, 1.5) with p 0.5, one
# vocal channel zeroed with p 0.025, no vocals with p 0.02 + 0.98 * 0.025 = 0.0445 (its two ways to leave them
# out), the whole item's channels swapped with p 0.5 (the same in distribution as swapping the instrumental
# alone, as here), no instrumental gain.
AUGMENTATIONS = {
    "standard": dict(p_swap=0.5, inst_gain=(0.5, 1.1), vocal_gain=(0.3, 1.3), p_vocal_gain=1.0,
                     p_silent_channel=0.05, p_no_vocal=0.1),
    "upstream": dict(p_swap=0.5, inst_gain=(1.0, 1.0), vocal_gain=(0.5, 1.5), p_vocal_gain=0.5,
                     p_silent_channel=0.025, p_no_vocal=0.02 + 0.98 * 0.025),
}
NORMALIZATIONS = ("crop", "song")


class VoxAugDataset(Dataset):
    def __init__(self, instrumentals: Sequence[str], vocals: Sequence[str], cropsize: int = 256,
                 epoch_size: int = 1000, seed: int = 0, augment: bool = True,
                 pairs: Sequence[Tuple[str, str]] = (), return_complex: bool = False,
                 p_swap: float = 0.5, inst_gain: Tuple[float, float] = (0.5, 1.1),
                 vocal_gain: Tuple[float, float] = (0.3, 1.3), p_vocal_gain: float = 1.0,
                 p_silent_channel: float = 0.05, p_no_vocal: float = 0.1, normalize: str = "crop",
                 clip_target: bool = False):
        """``instrumentals``/``vocals``: cache files (see :class:`SpectrogramCache`); ``pairs``: (mixture, instrumental)
        cache-file pairs. Without ``augment`` items are plain mixes (no gains, swaps, drops): validation.
        ``normalize``: "crop" or "song", ``clip_target``: Y = min(Y, X) (see the module docstring)."""
        if not instrumentals and not pairs:
            raise ValueError("VoxAugDataset needs at least one readable instrumental track or (mixture, instrumental) pair")
        if instrumentals and not vocals:
            raise ValueError("VoxAugDataset needs at least one readable vocal track to mix with the instrumentals")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.instrumentals, self.vocals, self.pairs = list(instrumentals), list(vocals), list(pairs)
        self.cropsize, self.epoch_size, self.seed = int(cropsize), int(epoch_size), int(seed)
        self.augment, self.return_complex = augment, return_complex
        self.p_swap, self.inst_gain, self.vocal_gain = p_swap, inst_gain, vocal_gain
        self.p_vocal_gain, self.p_silent_channel, self.p_no_vocal = p_vocal_gain, p_silent_channel, p_no_vocal
        self.normalize, self.clip_target = normalize, bool(clip_target)
        self.epoch = 0
        self._frames: Dict[str, int] = {}
        self._max: Dict[str, float] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.epoch_size

    def _nframes(self, f: str) -> int:
        n = self._frames.get(f)
        if n is None:
            n = self._frames[f] = _frames(f)
        return n

    def _crop(self, f: str, rng) -> np.ndarray:
        n = self._nframes(f)
        start = int(rng.integers(0, max(1, n - self.cropsize + 1)))
        return _load_crop(f, start, self.cropsize)

    def _song_max(self, f: str) -> float:
        m = self._max.get(f)
        if m is None:
            m = self._max[f] = song_max(f)
        return m

    def _draw(self, rng):
        """(instrumental, vocals) complex crops and the song scale ``c`` of the module docstring."""
        n_inst, n_pairs = len(self.instrumentals), len(self.pairs)
        song = self.normalize == "song"
        if n_pairs and rng.random() < n_pairs / (n_inst + n_pairs):
            mix_f, inst_f = self.pairs[int(rng.integers(n_pairs))]
            n = min(self._nframes(mix_f), self._nframes(inst_f))
            start = int(rng.integers(0, max(1, n - self.cropsize + 1)))
            mix = _load_crop(mix_f, start, self.cropsize)
            inst = _load_crop(inst_f, start, self.cropsize)
            voc = mix - inst
            if self.augment and rng.random() < self.p_swap:
                inst, voc = inst[::-1], voc[::-1]
            return inst, voc, max(self._song_max(mix_f), self._song_max(inst_f)) if song else None
        inst_f = self.instrumentals[int(rng.integers(n_inst))]
        inst = self._crop(inst_f, rng)
        voc = self._crop(self.vocals[int(rng.integers(len(self.vocals)))], rng)
        gain = 1.0
        if self.augment:
            if rng.random() < self.p_swap:
                inst = inst[::-1]
            if rng.random() < self.p_swap:
                voc = voc[::-1]
            gain = rng.uniform(*self.inst_gain)
            inst = inst * gain
            if self.p_vocal_gain >= 1 or rng.random() < self.p_vocal_gain:  # (no draw at 1: standard items unchanged)
                voc = voc * rng.uniform(*self.vocal_gain)
            if rng.random() < self.p_silent_channel:
                voc = voc.copy()
                voc[int(rng.integers(2))] = 0
            if rng.random() < self.p_no_vocal:
                voc = np.zeros_like(voc)
        return inst, voc, gain * self._song_max(inst_f) if song else None

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        for attempt in range(10):
            try:
                inst, voc, c = self._draw(rng)
                break
            except Exception as e:  # a cache file vanished or is damaged: report, draw another
                _warn(f"skipping unreadable spectrogram while building item {index}: {e}")
        else:
            raise RuntimeError(f"could not build item {index}: too many unreadable files")
        inst = torch.from_numpy(np.ascontiguousarray(inst))
        voc = torch.from_numpy(np.ascontiguousarray(voc))
        mix = inst + voc
        x_mag, y_mag = mix.abs(), inst.abs()
        if c is None:  # "crop"
            scale = x_mag.amax().clamp_min(1e-8)
            x, y = x_mag / scale, y_mag / scale
        else:  # "song": upstream's np.clip(np.abs(.) / c, 0, 1)
            scale = torch.tensor(max(float(c), 1e-8), dtype=x_mag.dtype)
            x, y = (x_mag / scale).clamp(0, 1), (y_mag / scale).clamp(0, 1)
        if self.clip_target:
            y = torch.minimum(y, x)
        if not self.return_complex:
            return x, y
        return x, y, mix / scale, voc / scale


def collect_files(folder: Optional[str], option: str = "data folder") -> List[str]:
    """Audio files under ``folder`` (sorted); :class:`DataError` naming ``option`` when it is not a folder."""
    if not folder:
        return []
    if not os.path.exists(folder):
        raise DataError(f"{option} {folder}: no such folder")
    if not os.path.isdir(folder):
        raise DataError(f"{option} {folder} is a file; give the folder that holds the audio files")
    return audio.list_audio_files(folder)


def collect_pairs(folder: Optional[str]) -> List[Tuple[str, str]]:
    """``folder/mixtures/NAME.*`` with ``folder/instrumentals/NAME.*`` (matched by file stem)."""
    if not folder:
        return []
    mixes = {os.path.splitext(os.path.basename(p))[0]: p for p in collect_files(os.path.join(folder, "mixtures"))}
    insts = {os.path.splitext(os.path.basename(p))[0]: p for p in collect_files(os.path.join(folder, "instrumentals"))}
    missing = sorted(set(mixes) ^ set(insts))
    if missing:
        _warn(f"{len(missing)} unmatched files in pair folder {folder} (e.g. {missing[0]!r}); skipped")
    return [(mixes[k], insts[k]) for k in sorted(set(mixes) & set(insts))]


def build_dataset(cache: SpectrogramCache, instrumental_dir: Optional[str], vocal_dir: Optional[str],
                  pair_dir: Optional[str] = None, progress: bool = False, **kwargs) -> VoxAugDataset:
    """Cache every file of the folders (skipping unreadable ones) and build a :class:`VoxAugDataset`;
    :class:`DataError` when a folder is missing or nothing readable is left to mix."""
    inst = cache.build(collect_files(instrumental_dir), "caching instrumentals", progress)
    voc = cache.build(collect_files(vocal_dir), "caching vocals", progress)
    pairs = []
    for m, i in collect_pairs(pair_dir):
        cm, ci = cache.get(m), cache.get(i)
        if cm is not None and ci is not None:
            pairs.append((cm, ci))
    if not inst and not pairs:
        where = " or ".join(str(f) for f in (instrumental_dir, pair_dir) if f) or "the given folders"
        raise DataError(f"no readable instrumental tracks or pairs in {where}")
    if inst and not voc:
        raise DataError(f"no readable vocal stems in {vocal_dir} to mix with the instrumentals")
    return VoxAugDataset(inst, voc, pairs=pairs, **kwargs)


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler (also used with one replica) that can skip the first ``start`` indices of its
    epoch's shard, so a run resumed mid-epoch sees exactly the items it would have seen."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self):
        idx = list(super().__iter__())
        return iter(idx[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def main(argv=None):
    """Fill the spectrogram cache ahead of training:

        python -m frame_transformer.data --instrumentals I --vocals V [--pairs P] --cache-dir C --sr 44100
    """
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instrumentals")
    p.add_argument("--vocals")
    p.add_argument("--pairs")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--sr", type=int, default=44100)
    p.add_argument("--n-fft", type=int, default=2048)
    p.add_argument("--hop", type=int, default=None, help="default n_fft // 2")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        files = {k: collect_files(getattr(a, k), f"--{k}") for k in ("instrumentals", "vocals")}
        pair_files = collect_pairs(a.pairs)
    except DataError as e:
        p.exit(2, f"{p.prog}: error: {e}\n")
    cache = SpectrogramCache(a.cache_dir, a.sr, a.n_fft, a.hop or a.n_fft // 2)
    inst = cache.build(files["instrumentals"], "instrumentals", progress=True)
    voc = cache.build(files["vocals"], "vocals", progress=True)
    pairs = [(cache.get(m), cache.get(i)) for m, i in pair_files]
    print(f"cached {len(inst)} instrumentals, {len(voc)} vocals, {sum(1 for m, i in pairs if m and i)} pairs "
          f"in {a.cache_dir}; {len(cache.failed)} unreadable files skipped")


if __name__ == "__main__":
    main()
