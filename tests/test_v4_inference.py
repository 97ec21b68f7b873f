"""v4 inference mode (upstream inference_v4.py's algorithm, streamed): the streaming STFT / iSTFT pieces, streaming
separation against a whole-song implementation of upstream's algorithm written out here, mode selection, options,
and upstream state_dicts through the separate and evaluate commands."""
import csv
import os

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from frame_transformer import audio, separate
from frame_transformer.upstream import load_model
from separation_helpers import REPO, all_files, assert_one_line_error, cli, make_checkpoint, song, write_song

UPSTREAM_PTH = os.path.join(REPO, "tests", "data", "upstream_v4_micro.pth")  # v4-micro: n_fft 128
SR, N_FFT, HOP = 16000, 128, 64  # the rate the tests run the upstream file at (--sr), its n_fft, n_fft // 2


@pytest.fixture(scope="module")
def upstream_model():
    model, info = load_model(UPSTREAM_PTH)
    assert info["format"] == "upstream-v4" and info["n_fft"] == N_FFT and info["hop"] == HOP
    return model


def librosa_stft(wave: np.ndarray, n_fft: int, hop: int) -> torch.Tensor:
    """(C, N) -> (C, bins, N // hop + 1): librosa.stft before 0.10 (upstream's): centred frames, the signal
    mirrored at both ends (np.pad reflect), periodic Hann window."""
    padded = np.pad(wave, ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    return torch.stft(torch.from_numpy(padded), n_fft, hop, window=torch.hann_window(n_fft), center=False,
                      return_complex=True)


@torch.no_grad()
def whole_song_v4(model, wave: np.ndarray, cropsize: int, paddings) -> dict:
    """Upstream's inference_v4.py (Separator.separate / separate_tta), written out on the whole song at once:
    pad the magnitude to whole crops (make_padding(n_frame, cropsize, 0)), divide by its one maximum, for each
    context padding zero-pad both ends and run every crop with its context, sigmoid of the logits of the first
    n_fft // 2 bins, keep the centres, Nyquist bin 0; average over the paddings; stems from mask * X and
    (1 - mask) * X with the mixture's phase."""
    X = librosa_stft(wave, N_FFT, HOP)
    mag = X.abs()
    n_frame = mag.shape[-1]
    mag_pad = F.pad(mag, (0, cropsize - n_frame % cropsize))
    mag_pad = mag_pad / mag_pad.max()
    total = torch.zeros_like(mag)
    for p in paddings:
        padded = F.pad(mag_pad, (p, p))
        crops = [padded[:, :, i * cropsize:(i + 1) * cropsize + 2 * p] for i in range(mag_pad.shape[-1] // cropsize)]
        logits = model.forward_logits(torch.stack(crops)[:, :, :N_FFT // 2])
        pred = torch.sigmoid(logits)[..., p:p + cropsize]
        mask = torch.cat(list(pred), dim=-1)  # crops side by side: (2, bins - 1, frames)
        total += F.pad(mask, (0, 0, 0, 1))[..., :n_frame]
    mask = total / len(paddings)
    n = wave.shape[1]
    istft = lambda s: torch.istft(s, N_FFT, HOP, window=torch.hann_window(N_FFT), center=True,  # noqa: E731
                                  length=n).numpy()
    return dict(mask=mask, vocals=istft((1 - mask) * X), instruments=istft(mask * X), scale=float(mag.max()))


def streamed(model, path, opts):
    """Our v4 mode on ``path`` (at the model's rate): (mask (2, bins, frames), vocals, instruments)."""
    masks = []
    cfg = dict(sr=SR, n_fft=N_FFT, hop=HOP)
    blocks = list(separate.iter_stems(model, str(path), cfg, opts, rate="model",
                                      on_crops=lambda mag, mask, c0: masks.append(mask)))
    mask = torch.cat([m.permute(1, 2, 0, 3).flatten(2) for m in masks], dim=-1)
    return mask, np.concatenate([b[0] for b in blocks], 1), np.concatenate([b[1] for b in blocks], 1)


# ---------------------------------------------------------------------------------------------- streaming STFT
@pytest.mark.parametrize("n", [5001, 4096, 70, 31, 1])
def test_spec_stream_windows_equal_the_whole_song_stft(tmp_path, n):
    """Frames of any window (overlapping, past both ends) equal the whole song's mirrored-edge STFT, zeros outside
    it, while only the window's frames are kept; songs shorter than half a window are mirrored repeatedly."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((2, n)).astype(np.float32)
    sf.write(str(tmp_path / "x.wav"), x.T, SR, subtype="FLOAT")
    ref = librosa_stft(x, N_FFT, HOP)
    with audio.AudioStream(str(tmp_path / "x.wav"), block=777) as stream:
        spec = audio.SpecStream(stream, N_FFT, HOP)
        assert spec.n_frames == ref.shape[-1] == n // HOP + 1
        a, most = -9, 0
        while a < spec.n_frames + 5:
            b = a + int(rng.integers(1, 40))
            want = torch.zeros(2, N_FFT // 2 + 1, b - a, dtype=torch.complex64)
            lo, hi = max(a, 0), min(b, spec.n_frames)
            if hi > lo:
                want[..., lo - a:hi - a] = ref[..., lo:hi]
            got = spec.window(a, b)
            assert (got - want).abs().max() <= 1e-5 * ref.abs().max()  # float32 FFTs of the same samples
            most = max(most, spec.cache.shape[-1])
            a += int(rng.integers(0, 30))
        assert most < 40
        spec.window(spec.n_frames + 3, spec.n_frames + 4)
        with pytest.raises(ValueError, match="before the retained frames"):  # frames are never recomputed
            spec.window(spec.n_frames - 1, spec.n_frames)


def test_istft_stream_equals_the_whole_song_istft():
    rng = np.random.default_rng(0)
    for n, n_fft, hop in ((9001, 128, 64), (4096, 128, 32), (50, 128, 64), (7, 16, 8)):
        spec = librosa_stft(rng.standard_normal((2, n)).astype(np.float32), n_fft, hop)
        spec = spec * torch.rand(spec.shape, generator=torch.Generator().manual_seed(n))  # a masked spectrogram
        whole = torch.istft(spec, n_fft, hop, window=torch.hann_window(n_fft), center=True, length=n).numpy()
        inverse, outs, t = audio.IstftStream(n_fft, hop, n), [], 0
        while t < spec.shape[-1]:
            k = int(rng.integers(1, 9))
            outs.append(inverse.push(spec[..., t:t + k]))
            assert inverse.buf.shape[-1] <= k + n_fft // hop  # only the frames that overlap unfinished samples
            t += k
        outs.append(inverse.flush())
        y = np.concatenate(outs, 1)
        assert y.shape == (2, n)
        np.testing.assert_allclose(y, whole, atol=1e-6 * np.abs(whole).max())
    with pytest.raises(ValueError, match="hop <= n_fft // 2"):
        audio.IstftStream(128, 65, 100)


# ---------------------------------------------------------------------------------------------- v4 mode
CASES = {
    # name: (seconds, cropsize, padding, tta_paddings, batch_size)
    "17-crops": (2.1, 32, 48, None, 3),
    "17-crops-tta": (2.1, 32, None, (0, 16, 40), 2),
    "padding-beyond-the-song": (0.125, 16, 100, None, 2),  # 32 frames: a whole number of crops (upstream adds one)
    "tta-beyond-the-song": (0.1, 64, None, (0, 50, 90), 4),  # the crop is longer than the song too
}


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_v4_mode_equals_upstreams_algorithm_on_the_whole_song(upstream_model, tmp_path, case):
    seconds, cropsize, padding, tta, batch = CASES[case]
    x = write_song(str(tmp_path / "s.wav"), seconds=seconds, sr=SR, seed=3)
    x[:, :500] *= 4  # the loudest frames in the first crop: every later crop is scaled by a maximum it does not hold
    sf.write(str(tmp_path / "s.wav"), x.T, SR, subtype="FLOAT")
    paddings = tta or (padding,)
    ref = whole_song_v4(upstream_model, x, cropsize, paddings)
    opts = separate.CropOptions(cropsize=cropsize, padding=padding, batch_size=batch, mode="v4", tta=tta is not None,
                                tta_paddings=tta or separate.V4_TTA_PADDINGS)
    assert separate.song_scale(str(tmp_path / "s.wav"), SR, N_FFT, HOP) == pytest.approx(ref["scale"], rel=1e-6)
    mask, vocals, instruments = streamed(upstream_model, tmp_path / "s.wav", opts)
    frames = ref["mask"].shape[-1]
    assert mask.shape[-1] >= frames and float(ref["mask"][:, :-1].std()) > 0.01  # a mask that varies
    # same float32 arithmetic in another batching and order (crops per forward pass, STFT and overlap-add block
    # by block): agreement to float32 rounding, nowhere near the 1e-3s that a different normalisation gives
    assert (mask[..., :frames] - ref["mask"]).abs().max() < 1e-5
    assert torch.equal(mask[:, -1, :frames], torch.zeros(2, frames))  # Nyquist bin
    peak = np.abs(x).max()
    assert np.abs(vocals - ref["vocals"]).max() < 1e-5 * peak
    assert np.abs(instruments - ref["instruments"]).max() < 1e-5 * peak  # mixture - vocals = iSTFT(mask X)
    assert np.abs(vocals).max() > 0.05 * peak and np.abs(instruments).max() > 0.05 * peak


def test_v4_mode_is_not_per_crop_normalisation(upstream_model, tmp_path):
    """The check above is sharp: crop mode (each crop divided by its own maximum) on the same song and crops
    gives a clearly different mask."""
    x = write_song(str(tmp_path / "s.wav"), seconds=1.0, sr=SR, seed=3)
    x[:, :500] *= 4
    sf.write(str(tmp_path / "s.wav"), x.T, SR, subtype="FLOAT")
    ref = whole_song_v4(upstream_model, x, 32, (16,))
    masks = []
    cfg = dict(sr=SR, n_fft=N_FFT, hop=HOP)
    list(separate.iter_stems(upstream_model, str(tmp_path / "s.wav"), cfg,
                             separate.CropOptions(cropsize=32, padding=16, mode="crop"), rate="model",
                             on_crops=lambda mag, mask, c0: masks.append(mask[..., c0:c0 + 32])))
    crop = torch.cat([m.permute(1, 2, 0, 3).flatten(2) for m in masks], dim=-1)[..., :ref["mask"].shape[-1]]
    assert (crop - ref["mask"]).abs().max() > 1e-2


def test_v4_mode_memory_is_bounded_by_the_crops(upstream_model, tmp_path, monkeypatch):
    """Pass 2 holds one batch of crops and its context (not the song): every STFT window it asks for and the
    frames the stream keeps stay below batch * cropsize + 2 * padding frames, for a song ten times longer."""
    write_song(str(tmp_path / "long.wav"), seconds=4.0, sr=SR)  # 1001 frames
    widths, real = [], audio.SpecStream.window

    def window(self, a, b):
        out = real(self, a, b)
        widths.append((b - a, self.cache.shape[-1]))
        return out

    monkeypatch.setattr(audio.SpecStream, "window", window)
    opts = separate.CropOptions(cropsize=16, padding=20, batch_size=2, mode="v4")
    streamed(upstream_model, tmp_path / "long.wav", opts)
    assert widths[0] == (2048, 1001)  # pass 1: the maximum over blocks of 2048 frames (here the whole song)
    assert len(widths) == 1 + 32 and max(max(w) for w in widths[1:]) <= 2 * 16 + 2 * 20  # pass 2: 63 crops


def test_mode_and_defaults_from_the_checkpoint_and_flags(upstream_model, tmp_path):
    lin = make_checkpoint(str(tmp_path / "linear.pt"))
    p = separate.build_parser()

    def opts(*args, ckpt=UPSTREAM_PTH):
        a = p.parse_args(["song.wav", "-c", ckpt, *args])
        model, cfg = separate.load_model(a.checkpoint)
        return separate.crop_options(a, separate.stft_settings(cfg, a), model.config.architecture)

    o = opts()  # a v4 checkpoint: upstream's inference_v4.py defaults
    assert (o.mode, o.cropsize, o.padding, o.batch_size, o.tta, o.v4_paddings()) == ("v4", 512, 1024, 1, False,
                                                                                     (1024,))
    o = opts("--tta")
    assert o.mode == "v4" and o.v4_paddings() == (0, 256, 512)
    assert opts("--tta", "--tta-paddings", "0,8", "--cropsize", "64").v4_paddings() == (0, 8)
    o = opts("--mode", "crop")
    assert (o.mode, o.cropsize, o.padding, o.batch_size) == ("crop", 512, None, 4)
    o = opts(ckpt=lin)  # an all-linear checkpoint: crop mode at its training crop
    assert (o.mode, o.cropsize, o.context(), o.batch_size) == ("crop", 16, 8, 4)
    o = opts("--mode", "v4", "--padding", "7", ckpt=lin)
    assert (o.mode, o.cropsize, o.padding, o.batch_size) == ("v4", 512, 7, 1)


def test_option_mistakes_are_one_line(tmp_path, capsys):
    write_song(str(tmp_path / "a.wav"), seconds=0.2)
    lin = make_checkpoint(str(tmp_path / "linear.pt"))
    cases = [
        ([UPSTREAM_PTH, "--n-fft", "2048"], "--n-fft 2048 does not fit the checkpoint: its model takes n_fft 128"),
        ([UPSTREAM_PTH, "--hop", "100"], "hop 100 does not fit n_fft 128"),
        ([UPSTREAM_PTH, "--tta-paddings", "0,8"], "--tta-paddings sets v4 mode's --tta; add --tta"),
        ([lin, "--tta", "--tta-paddings", "0,8"], "add --tta and --mode v4"),
        ([UPSTREAM_PTH, "--tta", "--padding", "8"], "--padding is not used by --tta in v4 mode"),
        ([lin, "--sr", "44100"], "--sr 44100 contradicts the checkpoint, which was trained with sr 16000"),
        ([lin, "--hop", "16"], "--hop 16 contradicts the checkpoint"),
    ]
    for args, message in cases:
        assert separate.main([str(tmp_path / "a.wav"), "-o", str(tmp_path / "out"), "-c", *args,
                              "--no-progress"]) == 1
        err = [ln for ln in capsys.readouterr().err.splitlines() if "note:" not in ln]
        assert len(err) == 1 and err[0].startswith("frame-transformer-separate: error: ") and message in err[0], \
            (args, err)
    with pytest.raises(SystemExit):
        separate.main([str(tmp_path / "a.wav"), "-c", UPSTREAM_PTH, "--tta-paddings", "0,-8"])
    assert "comma-separated frame counts" in capsys.readouterr().err
    assert all_files(tmp_path / "out") == []
    # values equal to the checkpoint's are accepted (a check), with no note for a train.py checkpoint
    assert separate.main([str(tmp_path / "a.wav"), "-o", str(tmp_path / "ok"), "-c", lin, "--sr", "16000",
                          "--hop", "32", "--n-fft", "64", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- the commands
def test_upstream_state_dict_separates_through_the_command(upstream_model, tmp_path):
    """A bare upstream v4 state_dict (saved as train4.py saves it) with `python -m frame_transformer.separate`,
    from another folder: v4 mode by itself, a note on the assumed rate and hop, upstream's stems."""
    x = write_song(str(tmp_path / "music" / "song.wav"), seconds=1.0, sr=SR, seed=5)
    work = tmp_path / "work"
    work.mkdir()
    r = cli("separate", "../music/song.wav", "--checkpoint", os.path.relpath(UPSTREAM_PTH, work), "-o", "stems",
            "--sr", SR, "--cropsize", 48, "--padding", 40, "--subtype", "FLOAT", "--no-progress", cwd=work,
            check_rc=0)
    assert r.stdout == "../music/song.wav -> stems/song.wav_Vocals.wav, stems/song.wav_Instruments.wav\n"
    assert r.stderr.strip() == ("frame-transformer-separate: note: upstream_v4_micro.pth does not record its hop: "
                                "assuming hop 64 (upstream's settings); pass --hop if it was trained otherwise")
    ref = whole_song_v4(upstream_model, x, 48, (40,))
    vocals, sr = sf.read(str(work / "stems" / "song.wav_Vocals.wav"), always_2d=True)
    instruments, _ = sf.read(str(work / "stems" / "song.wav_Instruments.wav"), always_2d=True)
    assert sr == SR and vocals.shape == x.T.shape
    peak = np.abs(x).max()
    assert np.abs(vocals.T - ref["vocals"]).max() < 1e-5 * peak
    assert np.abs(instruments.T - ref["instruments"]).max() < 1e-5 * peak
    # the default (upstream's 44.1 kHz assumed): the song is resampled to it and back; stems sum to the input
    r = cli("separate", "../music/song.wav", "-c", UPSTREAM_PTH, "-o", "assumed", "--cropsize", 256,
            "--subtype", "FLOAT", "--no-progress", "--tta", "--tta-paddings", "0,32", cwd=work,
            check_rc=0)
    assert "assuming sr 44100 and hop 64" in r.stderr
    v = sf.read(str(work / "assumed" / "song.wav_Vocals.wav"))[0]
    i = sf.read(str(work / "assumed" / "song.wav_Instruments.wav"))[0]
    np.testing.assert_allclose(v + i, x.T, atol=1e-6)
    assert np.abs(v).max() > 0.05 * peak


def test_upstream_state_dict_evaluates(tmp_path):
    voc, inst = song(1.0, seed=7)
    d = tmp_path / "tracks" / "t1"
    d.mkdir(parents=True)
    sf.write(str(d / "mixture.wav"), (voc + inst).T, SR, subtype="FLOAT")
    sf.write(str(d / "vocals.wav"), voc.T, SR, subtype="FLOAT")
    r = cli("evaluate", "tracks", "-c", UPSTREAM_PTH, "--sr", SR, "--cropsize", 64, "--padding", 32,
            "--stems", "est", "--no-progress", cwd=tmp_path, check_rc=0)
    assert "assuming hop 64" in r.stderr and "median vocals SDR" in r.stdout
    rows = list(csv.DictReader(open(tmp_path / "sdr.csv")))
    assert [row["track"] for row in rows] == ["t1", "median"] and np.isfinite(float(rows[0]["vocals_sdr"]))
    # the scored estimates are v4 mode's
    model, _ = load_model(UPSTREAM_PTH)
    ref = whole_song_v4(model, (voc + inst), 64, (32,))
    est = sf.read(str(tmp_path / "est" / "t1" / "vocals.wav"), always_2d=True)[0]
    assert np.abs(est.T - ref["vocals"]).max() < 1e-5 * np.abs(voc + inst).max()


def test_checkpoint_errors_name_the_problem(tmp_path):
    write_song(str(tmp_path / "a.wav"), seconds=0.2)
    torch.save({"conv.weight": torch.zeros(2, 2)}, str(tmp_path / "foreign.pth"))
    assert_one_line_error(cli("separate", "a.wav", "-c", "foreign.pth", cwd=tmp_path),
                          "cannot load checkpoint foreign.pth: not an upstream v4 state_dict", "1 of its 1 keys are not v4's")
