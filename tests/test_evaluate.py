"""Evaluation: BSS-eval v4 SDR through museval, and the evaluate command on a MUSDB18-style folder."""
import csv
import os

import numpy as np
import pytest
import soundfile as sf

from frame_transformer.metrics import bss_eval_v4
from separation_helpers import SR, assert_one_line_error, cli, make_checkpoint, song


def _framewise_snr_median(refs, ests, win):
    """museval's v4 image SDR, written out: per window 10 log10(|s|^2 / |s - s_hat|^2), windows where any
    reference or estimate source is silent left out, median over the rest."""
    n = refs.shape[-1] // win
    out = np.full((refs.shape[0], n), np.nan)
    for k in range(n):
        r, e = refs[..., k * win:(k + 1) * win], ests[..., k * win:(k + 1) * win]
        if any(np.all(x.sum(0) == 0) for x in (*r, *e)):
            continue
        out[:, k] = 10 * np.log10((r ** 2).sum((1, 2)) / ((r - e) ** 2).sum((1, 2)))
    return np.nanmedian(out, axis=1)


def test_bss_eval_v4_sdr_is_museval_framewise_image_sdr():
    rng = np.random.default_rng(0)
    sr, n = 8000, 8000 * 5
    voc, acc = rng.standard_normal((2, 2, n)) * [[[0.3]], [[0.5]]]
    voc[:, 8000:16000] = 0  # a silent window: left out of both sources' medians
    est_v = voc + 0.3 * acc + 0.05 * rng.standard_normal(voc.shape)
    est_a = voc + acc - est_v
    refs, ests = np.stack([voc, acc]), np.stack([est_v, est_a])
    got = bss_eval_v4(refs, ests, sr)
    assert got["frames"].shape == (4, 2, 5) and np.isnan(got["frames"][:, :, 1]).all()
    np.testing.assert_allclose(got["sdr"], _framewise_snr_median(refs, ests, sr), rtol=1e-9)
    assert 0 < got["sdr"][0] < 15 and np.isfinite(got["sir"]).all() and np.isfinite(got["sar"]).all()
    assert np.isinf(bss_eval_v4(refs, refs, sr)["sdr"]).all()  # a perfect estimate
    with pytest.raises(ValueError, match="sources, channels, samples"):
        bss_eval_v4(refs[0], ests[0], sr)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("musdb")
    ckpt = make_checkpoint(str(root / "checkpoint.pt"))
    tracks = root / "test"
    for i, (name, ext, with_acc) in enumerate([("Artist - One", "wav", True), ("Two", "flac", False)]):
        voc, inst = song(2.0, seed=10 + i)
        d = tracks / name
        d.mkdir(parents=True)
        sub = "PCM_16" if ext == "flac" else "FLOAT"
        sf.write(str(d / f"mixture.{ext}"), (voc + inst).T, SR, subtype=sub)
        sf.write(str(d / f"vocals.{ext}"), voc.T, SR, subtype=sub)
        if with_acc:
            sf.write(str(d / f"accompaniment.{ext}"), inst.T, SR, subtype=sub)
        sf.write(str(d / "drums.wav"), inst.T * 0.1, SR)  # other stems are ignored
    (tracks / "notes").mkdir()
    (tracks / "notes" / "readme.txt").write_text("not a track")
    return root, ckpt


def test_evaluate_scores_tracks_baseline_and_median(dataset):
    root, ckpt = dataset
    r = cli("evaluate", "test", "-c", ckpt, "--csv", "out/scores.csv", "--stems", "est", "--no-progress",
            cwd=root, check_rc=0)
    rows = list(csv.DictReader(open(root / "out" / "scores.csv")))
    assert [row["track"] for row in rows] == ["Artist - One", "Two", "median"]
    for row in rows[:2]:
        d = root / "test" / row["track"]
        ext = "wav" if row["track"].startswith("Artist") else "flac"
        mix, sr = sf.read(str(d / f"mixture.{ext}"), always_2d=True)
        voc, _ = sf.read(str(d / f"vocals.{ext}"), always_2d=True)
        acc = sf.read(str(d / "accompaniment.wav"), always_2d=True)[0] if ext == "wav" else mix - voc
        refs = np.stack([voc.T, acc.T])
        base = bss_eval_v4(refs, np.stack([mix.T, mix.T]), sr)["sdr"]
        ev = sf.read(str(root / "est" / row["track"] / "vocals.wav"), always_2d=True)[0]
        ea = sf.read(str(root / "est" / row["track"] / "accompaniment.wav"), always_2d=True)[0]
        np.testing.assert_allclose(ev + ea, mix, atol=1e-5)  # the estimates are a split of the mixture
        got = bss_eval_v4(refs, np.stack([ev.T, ea.T]), sr)
        np.testing.assert_allclose([float(row["mixture_vocals_sdr"]), float(row["mixture_accompaniment_sdr"])],
                                   base, atol=1e-3)
        np.testing.assert_allclose([float(row["vocals_sdr"]), float(row["accompaniment_sdr"]),
                                    float(row["vocals_sir"])], [*got["sdr"], got["sir"][0]], atol=1e-3)
        # the mixture as both estimates: per window the errors are the other source, so the SDRs are opposite
        assert float(row["mixture_vocals_sdr"]) == pytest.approx(-float(row["mixture_accompaniment_sdr"]), abs=2e-3)
        assert float(row["seconds"]) == 2.0
    med = rows[2]
    for c in ("vocals_sdr", "mixture_vocals_sdr", "accompaniment_sar"):
        assert float(med[c]) == pytest.approx(np.median([float(x[c]) for x in rows[:2]]), abs=1e-3)
    assert "median vocals SDR" in r.stdout and "mixture as estimate" in r.stdout and "Artist - One" in r.stdout


def test_evaluate_errors_are_one_line(dataset, tmp_path):
    root, ckpt = dataset
    (tmp_path / "empty").mkdir()
    assert_one_line_error(cli("evaluate", "empty", "-c", ckpt, cwd=tmp_path), "no tracks in empty",
                          "mixture.wav and vocals.wav")
    d = tmp_path / "bad" / "t1"
    d.mkdir(parents=True)
    voc, inst = song(0.5)
    sf.write(str(d / "mixture.wav"), (voc + inst).T, SR)
    assert_one_line_error(cli("evaluate", "bad", "-c", ckpt, cwd=tmp_path), "t1 has mixture.wav but no vocals file")
    assert not os.path.exists(tmp_path / "sdr.csv")
