"""Audio I/O, STFT, spectrogram cache and the voxaug dataset."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from frame_transformer import audio, data, synth
from frame_transformer.metrics import batch_sdr, sdr

SR = 16000


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    paths = synth.make_library(str(root), sr=SR, tracks=3, seconds=1.5, val_tracks=2, verbose=False)
    cache = data.SpectrogramCache(str(root / "cache"), SR, n_fft=256, hop=128)
    return paths, cache


def _dataset(lib, **kw):
    paths, cache = lib
    kw.setdefault("cropsize", 16)
    kw.setdefault("epoch_size", 8)
    return data.build_dataset(cache, paths["instrumentals"], paths["vocals"], **kw)


def test_stft_round_trip():
    wave = torch.randn(2, 5000, dtype=torch.float64)
    spec = audio.stft(wave, 256, 128)
    assert spec.shape == (2, 129, audio.num_frames(5000, 128)) and spec.is_complex()
    back = audio.istft(spec, 256, 128, length=5000)
    torch.testing.assert_close(back, wave, rtol=0, atol=1e-9)
    spec2 = audio.stft(wave.float(), 2048, 1024)  # the default settings
    assert spec2.shape[-2] == 1025


def test_mono_becomes_stereo(tmp_path):
    p = str(tmp_path / "mono.flac")
    sf.write(p, np.sin(np.arange(4000) / 10.0) * 0.5, SR)
    wave, sr = audio.load_audio(p, sr=SR)
    assert sr == SR and wave.shape == (2, 4000) and np.array_equal(wave[0], wave[1])


def test_resampling_and_refusal(tmp_path):
    p = str(tmp_path / "tone8k.wav")
    t = np.arange(8000) / 8000.0
    sf.write(p, np.stack([np.sin(2 * np.pi * 500 * t)] * 2, 1) * 0.5, 8000, subtype="FLOAT")
    wave, sr = audio.load_audio(p, sr=SR)
    assert sr == SR and wave.shape == (2, 16000)
    peak = np.argmax(np.abs(np.fft.rfft(wave[0]))) * SR / wave.shape[1]
    assert abs(peak - 500) < 2
    with pytest.raises(audio.AudioError, match="8000 Hz"):
        audio.load_audio(p, sr=SR, allow_resample=False)


def test_ogg_is_read(tmp_path):
    p = str(tmp_path / "x.ogg")
    sf.write(p, np.random.default_rng(0).uniform(-0.3, 0.3, (8000, 2)), SR, format="OGG", subtype="VORBIS")
    wave, _ = audio.load_audio(p, sr=SR)
    assert wave.shape[0] == 2 and wave.shape[1] > 7000


def test_cache_is_reused_and_matches_stft(lib, monkeypatch):
    paths, cache = lib
    files = audio.list_audio_files(paths["instrumentals"])
    first = cache.build(files)
    assert len(first) == len(files) and all(f.endswith(".npy") for f in first)
    wave, _ = audio.load_audio(files[0], sr=SR)
    np.testing.assert_allclose(np.load(first[0]), audio.stft(torch.from_numpy(wave), 256, 128).numpy(), atol=1e-5)

    def boom(path):
        raise AssertionError("the STFT was recomputed")

    monkeypatch.setattr(cache, "compute", boom)
    assert cache.build(files) == first  # second epoch / run: straight from the cache


def test_corrupt_file_is_reported_and_skipped(lib, tmp_path):
    paths, _ = lib
    bad_dir = tmp_path / "inst"
    bad_dir.mkdir()
    for f in audio.list_audio_files(paths["instrumentals"]):
        os.symlink(f, bad_dir / os.path.basename(f))
    (bad_dir / "broken_song.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    cache = data.SpectrogramCache(str(tmp_path / "cache"), SR, 256, 128)
    with pytest.warns(RuntimeWarning, match="broken_song.wav"):
        ds = data.build_dataset(cache, str(bad_dir), paths["vocals"], cropsize=16, epoch_size=4)
    assert len(ds.instrumentals) == 3 and cache.failed[0].endswith("broken_song.wav")
    x, y = ds[0]
    assert x.shape == (2, 129, 16)
    # a cache entry that disappears mid-epoch is reported and another item drawn: the epoch goes on
    os.remove(ds.instrumentals[0])
    with pytest.warns(RuntimeWarning, match="unreadable"):
        items = [ds[i] for i in range(6)]
    assert all(torch.isfinite(it[0]).all() for it in items)


def test_items_normalised_and_target_is_instrumental(lib):
    ds = _dataset(lib, return_complex=True, augment=True)
    for i in range(4):
        x, y, mix, voc = ds[i]
        assert x.shape == y.shape == (2, 129, 16)
        assert abs(float(x.max()) - 1.0) < 1e-6
        torch.testing.assert_close(x, mix.abs())
        torch.testing.assert_close(y, (mix - voc).abs(), rtol=1e-5, atol=1e-6)


def test_items_are_reproducible_per_epoch(lib):
    ds = _dataset(lib)
    a = ds[3][0]
    assert torch.equal(a, ds[3][0])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[3][0])


def test_voxaug_augmentations(lib):
    plain = _dataset(lib, augment=False, return_complex=True)
    # channel swap of both sources, unit gains: the mixture is the plain one with channels swapped
    swap = _dataset(lib, augment=True, return_complex=True, p_swap=1.0, inst_gain=(1, 1), vocal_gain=(1, 1),
                    p_silent_channel=0.0, p_no_vocal=0.0)
    for i in range(3):
        torch.testing.assert_close(swap[i][2], plain[i][2].flip(0))
    # no-vocal items: mixture == instrumental
    novox = _dataset(lib, augment=True, return_complex=True, p_no_vocal=1.0)
    x, y, mix, voc = novox[0]
    assert torch.equal(x, y) and float(voc.abs().max()) == 0
    # silent channel: one vocal channel is zero
    silent = _dataset(lib, augment=True, return_complex=True, p_silent_channel=1.0, p_no_vocal=0.0)
    for i in range(3):
        v = silent[i][3]
        assert min(float(v[0].abs().max()), float(v[1].abs().max())) == 0
    # random gains change the vocal level relative to the plain mix
    gain = _dataset(lib, augment=True, return_complex=True, p_swap=0.0, inst_gain=(1, 1), vocal_gain=(0.5, 0.5),
                    p_silent_channel=0.0, p_no_vocal=0.0)
    g, p = gain[0], plain[0]
    ratio = (g[3].abs().sum() / (g[2] - g[3]).abs().sum()) / (p[3].abs().sum() / (p[2] - p[3]).abs().sum())
    assert abs(float(ratio) - 0.5) < 1e-4


def test_pairs_folder(lib, tmp_path):
    paths, _ = lib
    for sub in ("mixtures", "instrumentals"):
        (tmp_path / "pairs" / sub).mkdir(parents=True)
    inst, _ = audio.load_audio(audio.list_audio_files(paths["instrumentals"])[0])
    voc, _ = audio.load_audio(audio.list_audio_files(paths["vocals"])[0])
    audio.save_audio(str(tmp_path / "pairs" / "mixtures" / "a.wav"), (inst + voc) * 0.5, SR, "FLOAT")
    audio.save_audio(str(tmp_path / "pairs" / "instrumentals" / "a.wav"), inst * 0.5, SR, "FLOAT")
    cache = data.SpectrogramCache(str(tmp_path / "cache"), SR, 256, 128)
    ds = data.build_dataset(cache, None, None, str(tmp_path / "pairs"), cropsize=16, epoch_size=4,
                            return_complex=True, augment=False)
    x, y, mix, v = ds[0]
    assert len(ds.pairs) == 1 and x.shape == (2, 129, 16)
    torch.testing.assert_close(y, (mix - v).abs(), rtol=1e-5, atol=1e-6)


def test_sampler_resumes_mid_epoch():
    ds = list(range(20))
    s = data.ResumableDistributedSampler(ds, num_replicas=2, rank=1, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_start(4)
    assert list(s) == full[4:] and len(s) == len(full) - 4


def test_sdr():
    ref = np.random.default_rng(0).standard_normal((2, 1000))
    assert sdr(ref, ref) > 100
    assert abs(sdr(np.zeros_like(ref), ref)) < 1e-6
    assert abs(sdr(ref * 0.9, ref) - 20.0) < 1e-6
    b = batch_sdr(torch.from_numpy(np.stack([ref, ref * 0.9])), torch.from_numpy(np.stack([ref, ref])))
    assert b.shape == (2,) and abs(float(b[1]) - 20.0) < 1e-6


def test_synth_is_seeded():
    assert np.array_equal(synth.vocal(0.5, SR, 4), synth.vocal(0.5, SR, 4))
    assert np.array_equal(synth.instrumental(0.5, SR, 4), synth.instrumental(0.5, SR, 4))
    v = synth.vocal(2.0, SR, 5)
    assert v.shape == (2, 2 * SR) and np.abs(v).max() <= 1


def test_folder_errors_name_the_folder(lib, tmp_path):
    paths, _ = lib
    with pytest.raises(data.DataError, match="--vocals .*nowhere: no such folder"):
        data.collect_files(str(tmp_path / "nowhere"), "--vocals")
    (tmp_path / "a.wav").write_bytes(b"x")
    with pytest.raises(data.DataError, match="a.wav is a file; give the folder"):
        data.collect_files(str(tmp_path / "a.wav"))
    (tmp_path / "empty").mkdir()
    cache = data.SpectrogramCache(str(tmp_path / "cache"), SR, 256, 128)
    with pytest.raises(data.DataError, match="no readable instrumental tracks or pairs in .*empty"):
        data.build_dataset(cache, str(tmp_path / "empty"), paths["vocals"])
    with pytest.raises(data.DataError, match="no readable vocal stems in .*empty"):
        data.build_dataset(cache, paths["instrumentals"], str(tmp_path / "empty"))


# --- upstream v4 recipe: song normalisation, target clipping, upstream augmentations -----------------------------
def _spec_file(path, rng, frames, scale=1.0):
    spec = (rng.standard_normal((2, 5, frames)) + 1j * rng.standard_normal((2, 5, frames))) * scale
    np.save(path, spec.astype(np.complex64))
    return str(path), np.load(path)


def _locate(crop, spec):
    """(start, swapped, gain) of ``crop`` as a real multiple of a window of ``spec`` (channels swapped or not; a
    zeroed channel is left out of the match); None when it is no such window."""
    c = crop.shape[-1]
    live = [ch for ch in range(2) if np.abs(crop[ch]).max() > 0]
    for start in range(spec.shape[-1] - c + 1):
        for swapped in (False, True):
            w = spec[::-1] if swapped else spec
            w = w[live, :, start:start + c]
            gain = float(np.vdot(w, crop[live]).real / np.vdot(w, w).real)
            if np.allclose(crop[live], gain * w, rtol=1e-5, atol=1e-6):
                return start, swapped, gain
    return None


def test_song_normalisation_and_target_clipping_match_a_direct_computation(tmp_path):
    """normalize="song": the scale is the instrumental song's largest magnitude (taken before mixing, whatever the
    instrumental gain), X and Y are clipped to [0, 1] and clip_target makes Y = min(Y, X), computed here from the
    source arrays; the upstream recipe scales vocals by U[0.5, 1.5) half of the time and never the instrumental."""
    rng = np.random.default_rng(0)
    inst_f, inst = _spec_file(tmp_path / "inst.npy", rng, 40)
    voc_f, voc = _spec_file(tmp_path / "voc.npy", rng, 40, scale=0.8)
    c = np.abs(inst).max()
    kinds = {"plain": dict(augment=False), "standard": dict(augment=True, **data.AUGMENTATIONS["standard"]),
             "upstream": dict(augment=True, **data.AUGMENTATIONS["upstream"])}
    below_one = clipped_x = clipped_y = 0
    vocal_gains = []
    for kind, kw in kinds.items():
        ds = data.VoxAugDataset([inst_f], [voc_f], cropsize=8, epoch_size=40, normalize="song", clip_target=True,
                                return_complex=True, **kw)
        for i in range(len(ds)):
            x, y, mix, v = (t.numpy() for t in ds[i])
            # the instrumental, scaled back by the song maximum, is a window of the source (never gained: the
            # standard recipe's instrumental gain scales song and crop alike)
            found = _locate((mix - v) * c, inst)
            assert found is not None and abs(found[2] - 1) < 1e-5, (kind, i, found)
            start, swapped, _ = found
            inst_crop = (inst[::-1] if swapped else inst)[:, :, start:start + 8]
            vocal = v * c
            x_direct = np.clip(np.abs(inst_crop + vocal) / c, 0, 1)
            y_direct = np.minimum(np.clip(np.abs(inst_crop) / c, 0, 1), x_direct)
            np.testing.assert_allclose(x, x_direct, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(y, y_direct, rtol=1e-5, atol=1e-7)
            below_one += x.max() < 1  # the crop's own max is not the scale
            clipped_x += bool((np.abs(inst_crop + vocal) / c > 1).any())
            clipped_y += bool((np.abs(inst_crop) > np.abs(inst_crop + vocal)).any())
            if kind == "upstream" and np.abs(vocal).max() > 0:
                vocal_gains.append(_locate(vocal, voc)[2])
    assert below_one and clipped_x and clipped_y  # each rule mattered somewhere
    g = np.array(vocal_gains)
    assert len(g) >= 35 and ((np.abs(g - 1) < 1e-5) | ((g >= 0.5) & (g < 1.5))).all()
    assert 0.3 < np.mean(np.abs(g - 1) < 1e-5) < 0.7  # half of the vocals keep their level
    # without clip_target Y is the instrumental's magnitude, clipped to [0, 1] only
    ds = data.VoxAugDataset([inst_f], [voc_f], cropsize=8, epoch_size=4, normalize="song", augment=False,
                            return_complex=True)
    for i in range(4):
        x, y, mix, v = (t.numpy() for t in ds[i])
        np.testing.assert_allclose(y, np.clip(np.abs(mix - v), 0, 1), rtol=1e-5, atol=1e-7)
    # pairs: the scale is the larger of the mixture song's and the instrumental song's maxima
    mix_f, mix_song = _spec_file(tmp_path / "mix.npy", rng, 40, scale=1.5)
    ds = data.VoxAugDataset([], [], pairs=[(mix_f, inst_f)], cropsize=8, epoch_size=4, normalize="song",
                            augment=False, return_complex=True)
    scale = max(np.abs(mix_song).max(), c)
    assert np.abs(mix_song).max() > c
    for i in range(4):
        x, y, mix, v = (t.numpy() for t in ds[i])
        start, swapped, gain = _locate(mix * scale, mix_song)
        assert not swapped and abs(gain - 1) < 1e-5
        np.testing.assert_allclose(x, np.clip(np.abs(mix_song[:, :, start:start + 8]) / scale, 0, 1), rtol=1e-5)


def test_song_max_is_computed_once_and_kept_beside_the_cache_file(tmp_path):
    rng = np.random.default_rng(1)
    f, spec = _spec_file(tmp_path / "a-0123.npy", rng, 9000)  # more frames than one chunk
    assert data.song_max(f) == pytest.approx(float(np.abs(spec).max()), rel=1e-6)
    side = tmp_path / "a-0123.max"
    assert float(side.read_text()) == data.song_max(f)
    side.write_text("2.5")  # read from the side file from now on
    assert data.song_max(f) == 2.5
