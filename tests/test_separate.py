"""Separation: stems that sum to the mixture, crop stitching, streaming resampling, output layout, atomic writes,
never re-separating our outputs, exit codes and one-line errors (in process; the CLI runs in test_cli_separate)."""
import errno
import os

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy.signal import resample_poly

from frame_transformer import audio, separate
from separation_helpers import SR, all_files, make_checkpoint, write_song


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"))


def _run(*args):
    return separate.main([*map(str, args), "--no-progress"])


def _temp_files(folder):
    return [f for f in all_files(folder) if f.endswith(".tmp") or os.path.basename(f).startswith(".")]


# ------------------------------------------------------------------------------------------ stems
def test_stems_sum_to_mixture_and_split(ckpt, tmp_path):
    x = write_song(str(tmp_path / "song.wav"), seconds=1.3)
    assert _run(tmp_path / "song.wav", "-o", tmp_path / "out", "-c", ckpt, "--subtype", "FLOAT",
                "--batch-size", "3") == 0
    inst, sr1 = sf.read(str(tmp_path / "out" / "song.wav_Instruments.wav"))
    voc, sr2 = sf.read(str(tmp_path / "out" / "song.wav_Vocals.wav"))
    assert sr1 == sr2 == SR and inst.shape == voc.shape == x.T.shape
    np.testing.assert_allclose(inst + voc, x.T, atol=1e-6)
    assert np.abs(inst).max() > 1e-3 and np.abs(voc).max() > 1e-3  # a real split, not one empty stem
    assert all_files(tmp_path / "out") == ["song.wav_Instruments.wav", "song.wav_Vocals.wav"]


def test_pcm16_stems_sum_to_mixture(ckpt, tmp_path):
    x = write_song(str(tmp_path / "s.wav"), seconds=0.7)
    assert _run(tmp_path / "s.wav", "-o", tmp_path / "o", "-c", ckpt) == 0
    inst, _ = sf.read(str(tmp_path / "o" / "s.wav_Instruments.wav"))
    voc, _ = sf.read(str(tmp_path / "o" / "s.wav_Vocals.wav"))
    np.testing.assert_allclose(inst + voc, x.T, atol=3e-4)  # two roundings to 16 bits


def test_crop_stitching_matches_a_single_crop_where_the_model_is_frame_local(tmp_path):
    """With a mask that depends on each frame alone, crop-by-crop processing must equal one big crop:
    the stitching (context margins, centre samples kept) adds no seams."""

    class FrameLocal(torch.nn.Module):  # per-frame normalised, so the per-crop scale cancels too
        def forward(self, x):
            return torch.sigmoid(4 * x / (x.amax(2, keepdim=True) + 1e-12) - 1)

    write_song(str(tmp_path / "local.wav"), seconds=1.1)
    cfg = dict(sr=SR, n_fft=64, hop=32)
    out = {}
    for crop, pad in ((4, 2), (7, 0), (64, 8)):
        outputs = separate.output_paths("local.wav", str(tmp_path / f"c{crop}"))
        separate.separate_file(FrameLocal(), str(tmp_path / "local.wav"), outputs, cfg,
                               separate.CropOptions(cropsize=crop, padding=pad, batch_size=2), subtype="FLOAT")
        out[crop] = sf.read(outputs["vocals"])[0]
    assert np.abs(out[64]).max() > 1e-3
    np.testing.assert_allclose(out[4], out[64], atol=2e-6)
    np.testing.assert_allclose(out[7], out[64], atol=2e-6)


def test_tta_mask_is_channel_symmetric(ckpt):
    model, _ = separate.load_model(ckpt)
    x = torch.rand(1, 2, 33, 10)
    m = separate.predict_mask(model, x, tta=True)
    torch.testing.assert_close(m, separate.predict_mask(model, x.flip(1), tta=True).flip(1))


def test_folder_mono_flac_other_rate_tta_png(ckpt, tmp_path):
    songs = tmp_path / "songs"
    write_song(str(songs / "a.wav"), seconds=0.6)
    write_song(str(songs / "b_mono.flac"), seconds=0.6, mono=True)
    write_song(str(songs / "c22k.wav"), seconds=0.6, sr=22050)
    (songs / "notes.txt").write_text("not audio: ignored by extension")
    out = tmp_path / "out"
    assert _run(songs, "-o", out, "-c", ckpt, "--tta", "--png", "--subtype", "FLOAT") == 0
    for stem in ("a.wav", "b_mono.flac", "c22k.wav"):
        for suffix in ("_Instruments.wav", "_Vocals.wav", "_mask.png"):
            assert os.path.getsize(out / (stem + suffix)) > 0
    mono, _ = sf.read(str(out / "b_mono.flac_Instruments.wav"))
    assert mono.shape[1] == 2 and np.allclose(mono[:, 0], mono[:, 1], atol=1e-6)
    c, sr = sf.read(str(out / "c22k.wav_Vocals.wav"))
    assert sr == 22050 and len(c) == int(0.6 * 22050)  # the input's rate and length by default


# ------------------------------------------------------------------------------------------ item 6: rates, memory
@pytest.mark.parametrize("sr_in,sr_out", [(22050, 16000), (44100, 16000), (16000, 44100), (48000, 44100),
                                          (16000, 16000)])
def test_stream_resampler_matches_whole_signal_resample_poly(sr_in, sr_out):
    rng = np.random.default_rng(sr_in + sr_out)
    n = 30011
    x = rng.standard_normal((2, n))
    up, down = audio._ratio(sr_in, sr_out)
    ref = resample_poly(x, up, down, axis=-1) if up != down else x
    r = audio.StreamResampler(sr_in, sr_out)
    outs, i, most = [], 0, 0
    while i < n:
        b = int(rng.integers(1, 7000))
        outs.append(r.push(x[:, i:i + b]))
        most = max(most, r.buf.shape[1])
        i += b
    outs.append(r.flush())
    y = np.concatenate(outs, 1)
    assert y.shape == ref.shape == (2, audio.resampled_length(n, sr_in, sr_out))
    np.testing.assert_allclose(y, ref, atol=1e-6)  # float32 output: rounding only
    assert most <= 7000 + 2 * r.pad + r.down  # state: one block plus the filter's support


def test_audio_stream_windows_equal_whole_file_resampling_in_bounded_memory(tmp_path):
    """Overlapping windows (as the crops read them) of a streamed, resampled file equal the whole file resampled
    at once, while the stream keeps only about one block and one window."""
    x = write_song(str(tmp_path / "s.wav"), seconds=3.0, sr=22050)
    whole, _ = audio.load_audio(str(tmp_path / "s.wav"), sr=SR)
    block, win, step = 4096, 3000, 2000
    with audio.AudioStream(str(tmp_path / "s.wav"), SR, block=block) as s:
        assert s.length == whole.shape[1] == audio.resampled_length(x.shape[1], 22050, SR)
        most = 0
        for start in range(-500, s.length + 500, step):
            w = s.read(start, win)
            ref = np.zeros((2, win), np.float32)
            lo, hi = max(0, start), min(s.length, start + win)
            ref[:, lo - start:hi - start] = whole[:, lo:hi]
            np.testing.assert_allclose(w, ref, atol=1e-6)
            most = max(most, s.buf.shape[1])
    assert most <= win + block  # bounded: never the whole file (48000 samples)


def test_stems_at_the_input_rate_by_default_and_model_rate_on_request(ckpt, tmp_path):
    x = write_song(str(tmp_path / "hi.wav"), seconds=0.9, sr=22050)
    assert _run(tmp_path / "hi.wav", "-o", tmp_path / "in", "-c", ckpt, "--subtype", "FLOAT") == 0
    voc, sr = sf.read(str(tmp_path / "in" / "hi.wav_Vocals.wav"))
    inst, _ = sf.read(str(tmp_path / "in" / "hi.wav_Instruments.wav"))
    assert sr == 22050 and voc.shape == x.T.shape
    np.testing.assert_allclose(voc + inst, x.T, atol=1e-6)  # instruments = mixture - vocals at the input rate
    # the vocals are band-limited to the model's band (8 kHz): above it, everything stays in the instruments
    high = np.fft.rfftfreq(len(voc), 1 / 22050) > 9000

    def hf(w):  # energy above 9 kHz
        return (np.abs(np.fft.rfft(w, axis=0)[high]) ** 2).sum()

    assert hf(x.T) > 1e-3 * (x ** 2).sum() * len(voc)  # the mixture has some
    assert hf(voc) < 1e-3 * hf(x.T)  # the resampler's stopband
    np.testing.assert_allclose(hf(inst), hf(x.T), rtol=1e-2)
    assert _run(tmp_path / "hi.wav", "-o", tmp_path / "m", "-c", ckpt, "--subtype", "FLOAT", "--rate", "model") == 0
    vm, srm = sf.read(str(tmp_path / "m" / "hi.wav_Vocals.wav"))
    assert srm == SR and len(vm) == audio.resampled_length(x.shape[1], 22050, SR)
    # the same estimate at both rates
    np.testing.assert_allclose(resample_poly(vm, 22050 // 50, SR // 50, axis=0)[:len(voc)], voc, atol=2e-3)


# ------------------------------------------------------------------------------------------ item 5: no data loss
def test_outputs_mirror_the_tree_without_collisions(ckpt, tmp_path):
    songs = tmp_path / "songs"
    a = write_song(str(songs / "song.wav"), seconds=0.5, seed=1)
    b = write_song(str(songs / "song.flac"), seconds=0.5, seed=2)
    c = write_song(str(songs / "sub" / "song.wav"), seconds=0.5, seed=3)
    assert _run(songs, "-o", tmp_path / "out", "-c", ckpt, "--subtype", "FLOAT") == 0
    assert all_files(tmp_path / "out") == sorted(
        f"{p}_{s}.wav" for p in ("song.wav", "song.flac", "sub/song.wav") for s in ("Vocals", "Instruments"))
    for name, x, tol in (("song.wav", a, 1e-6), ("song.flac", b, 1e-4), ("sub/song.wav", c, 1e-6)):
        v = sf.read(str(tmp_path / "out" / f"{name}_Vocals.wav"))[0]
        i = sf.read(str(tmp_path / "out" / f"{name}_Instruments.wav"))[0]
        np.testing.assert_allclose(v + i, x.T, atol=tol)  # each output belongs to its own input


@pytest.mark.parametrize("out_name", ["stems", "."])
def test_never_separates_its_own_outputs(ckpt, tmp_path, capsys, out_name):
    """-o inside the input folder (or the input folder itself): a second run separates the same songs again,
    never our outputs (no ..._Vocals.wav_Vocals.wav)."""
    songs = tmp_path / "songs"
    write_song(str(songs / "a.wav"), seconds=0.4)
    write_song(str(songs / "sub" / "b.wav"), seconds=0.4)
    out = songs / out_name
    assert _run(songs, "-o", out, "-c", ckpt) == 0
    first = all_files(songs)
    assert _run(songs, "-o", out, "-c", ckpt) == 0
    assert all_files(songs) == first and not any("_Vocals.wav_" in f for f in first)
    assert len(first) == 6
    out = capsys.readouterr().out
    assert "separated 2 of 2 files" in out
    # the output folder inside the input is not even listed; outputs beside the inputs are recognised by their tag
    assert ("skipped 4 written by frame-transformer-separate" in out) == (out_name == ".")


def test_a_file_we_did_not_write_is_never_replaced(ckpt, tmp_path, capsys):
    write_song(str(tmp_path / "x.wav"), seconds=0.4)
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "x.wav_Vocals.wav"
    sf.write(str(mine), np.full((100, 2), 0.25), SR)
    before = mine.read_bytes()
    assert _run(tmp_path / "x.wav", "-o", out, "-c", ckpt) == 1
    assert mine.read_bytes() == before and all_files(out) == ["x.wav_Vocals.wav"]
    assert "not replacing it" in capsys.readouterr().err


def test_folder_with_failures_separates_the_rest_and_exits_1(ckpt, tmp_path, capsys):
    songs = tmp_path / "songs"
    write_song(str(songs / "good.wav"), seconds=0.4)
    (songs / "broken.wav").write_bytes(b"RIFF garbage, not a wav")
    (songs / "empty.flac").write_bytes(b"")
    assert _run(songs, "-o", tmp_path / "out", "-c", ckpt) == 1
    assert all_files(tmp_path / "out") == ["good.wav_Instruments.wav", "good.wav_Vocals.wav"]
    err = capsys.readouterr().err
    assert "broken.wav" in err and "empty.flac" in err and "separated 1 of 3 files" in err and "2 failed" in err


def test_a_single_non_audio_input_exits_1(ckpt, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert _run(tmp_path / "notes.txt", "-o", tmp_path / "out", "-c", ckpt) == 1
    assert "cannot read" in capsys.readouterr().err and all_files(tmp_path / "out") == []


def test_full_disk_stops_the_run_keeps_finished_files_leaves_no_partial_file(ckpt, tmp_path, monkeypatch, capsys):
    songs = tmp_path / "songs"
    write_song(str(songs / "a.wav"), seconds=0.5)
    write_song(str(songs / "b.wav"), seconds=2.0)
    write_song(str(songs / "c.wav"), seconds=0.5)
    real, calls = separate._write_block, []

    def filling_disk(f, frames):
        calls.append(f.name)
        if "b.wav" in f.name and sum("b.wav" in c for c in calls) > 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(f, frames)

    monkeypatch.setattr(separate, "_write_block", filling_disk)
    out = tmp_path / "out"
    assert _run(songs, "-o", out, "-c", ckpt) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "out/b.wav_" in err[0]
    assert "free some space or choose another folder with -o" in err[0] and "kept the 1 file finished" in err[0]
    assert all_files(out) == ["a.wav_Instruments.wav", "a.wav_Vocals.wav"]  # a kept, no b, c not started


def test_interrupt_removes_the_file_in_progress(ckpt, tmp_path, monkeypatch, capsys):
    write_song(str(tmp_path / "a.wav"), seconds=1.0)
    real, n = separate._write_block, [0]

    def interrupted(f, frames):
        n[0] += 1
        if n[0] == 5:
            raise KeyboardInterrupt
        real(f, frames)

    monkeypatch.setattr(separate, "_write_block", interrupted)
    assert _run(tmp_path / "a.wav", "-o", tmp_path / "out", "-c", ckpt) == 130
    assert "interrupted" in capsys.readouterr().err and all_files(tmp_path / "out") == []


# ------------------------------------------------------------------------------------------ item 4: checkpoints
def test_checkpoint_errors_are_one_line(ckpt, tmp_path):
    torch.save({"weights": torch.zeros(3)}, str(tmp_path / "other.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    data = open(ckpt, "rb").read()
    (tmp_path / "truncated.pt").write_bytes(data[:len(data) // 2])
    cases = {str(tmp_path / "missing.pt"): "checkpoint not found",
             str(tmp_path / "garbage.pt"): "garbage.pt is not a PyTorch checkpoint .*copy it again",
             str(tmp_path / "truncated.pt"): "truncated.pt is not a PyTorch checkpoint .*copy it again",
             str(tmp_path / "other.pt"): "other.pt: not an upstream v4 state_dict .*this project's checkpoints load",
             str(tmp_path): "is a folder without a checkpoint.pt"}
    for path, msg in cases.items():
        with pytest.raises(separate.CheckpointError, match=msg) as e:
            separate.load_model(path)
        assert "\n" not in str(e.value)
    model, cfg = separate.load_model(os.path.dirname(ckpt))  # a run folder is accepted
    assert cfg["sr"] == SR


def test_output_folder_errors(ckpt, tmp_path, capsys):
    write_song(str(tmp_path / "a.wav"), seconds=0.3)
    (tmp_path / "file").write_text("x")
    assert _run(tmp_path / "a.wav", "-o", tmp_path / "file", "-c", ckpt) == 1
    assert "output folder" in capsys.readouterr().err
    assert _run(tmp_path / "a.wav", "-o", tmp_path / "file" / "sub", "-c", ckpt) == 1
    assert "cannot write to output folder" in capsys.readouterr().err
