"""Separation command: wav in, two stems out that sum back to the mixture; folders, TTA, PNG, crop stitching."""
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from frame_transformer import separate, synth
from frame_transformer.model import FrameTransformer, preset

SR = 16000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint in train.py's format holding an untrained micro model (n_fft 64)."""
    root = tmp_path_factory.mktemp("sep")
    torch.manual_seed(0)
    cfg = preset("micro")
    model = FrameTransformer(cfg)
    path = str(root / "checkpoint.pt")
    torch.save(dict(model=model.state_dict(), config=dict(model=cfg.to_dict(), sr=SR, n_fft=64, hop=32,
                                                          cropsize=16)), path)
    return root, path


def _song(path, seconds=1.3, mono=False, sr=SR):
    x = synth.instrumental(seconds, sr, 1) * 0.5 + synth.vocal(seconds, sr, 1) * 0.4
    x = x[:1] if mono else x
    sf.write(path, x.T, sr, subtype="PCM_16" if path.endswith(".flac") else "FLOAT")
    return x


def test_round_trip_stems_sum_to_mixture(ckpt):
    root, path = ckpt
    song = str(root / "song.wav")
    x = _song(song)
    outs = separate.main([song, "-o", str(root / "out"), "--checkpoint", path, "--subtype", "FLOAT",
                          "--no-progress", "--batch-size", "3"])
    inst_p, voc_p = outs[0]
    assert os.path.basename(inst_p) == "song_Instruments.wav" and os.path.basename(voc_p) == "song_Vocals.wav"
    inst, sr1 = sf.read(inst_p)
    voc, sr2 = sf.read(voc_p)
    assert sr1 == sr2 == SR and inst.shape == voc.shape == x.T.shape
    np.testing.assert_allclose(inst + voc, x.T, atol=1e-5)
    assert np.abs(inst).max() > 1e-3 and np.abs(voc).max() > 1e-3  # a real split, not one empty stem


def test_pcm16_output_sums_to_mixture(ckpt):
    root, path = ckpt
    song = str(root / "song16.wav")
    x = _song(song, seconds=0.7)
    separate.main([song, "-o", str(root / "out16"), "--checkpoint", path, "--no-progress"])
    inst, _ = sf.read(str(root / "out16" / "song16_Instruments.wav"))
    voc, _ = sf.read(str(root / "out16" / "song16_Vocals.wav"))
    np.testing.assert_allclose(inst + voc, x.T, atol=3e-4)


def test_crop_stitching_matches_a_single_crop_where_the_model_is_frame_local(ckpt):
    """With a mask that depends on each frame alone, crop-by-crop processing must equal one big crop:
    the stitching (context margins, centre samples kept) adds no seams."""
    root, path = ckpt

    class FrameLocal(torch.nn.Module):  # per-frame normalised, so the per-crop scale cancels too
        def forward(self, x):
            return torch.sigmoid(4 * x / (x.amax(2, keepdim=True) + 1e-12) - 1)

    song = str(root / "local.wav")
    _song(song, seconds=1.1)
    out = {}
    for crop, pad in ((4, 2), (7, 0), (64, 8)):
        d = str(root / f"local{crop}")
        separate.separate_file(FrameLocal(), song, d, SR, 64, 32, cropsize=crop, padding=pad, batch_size=2,
                               progress=False, subtype="FLOAT")
        out[crop] = sf.read(os.path.join(d, "local_Vocals.wav"))[0]
    assert np.abs(out[64]).max() > 1e-3
    np.testing.assert_allclose(out[4], out[64], atol=2e-6)
    np.testing.assert_allclose(out[7], out[64], atol=2e-6)


def test_folder_input_mono_resampling_tta_png(ckpt):
    root, path = ckpt
    folder = root / "songs"
    folder.mkdir()
    _song(str(folder / "a.wav"), seconds=0.6)
    _song(str(folder / "b_mono.flac"), seconds=0.6, mono=True)
    _song(str(folder / "c22k.wav"), seconds=0.6, sr=22050)
    (folder / "notes.txt").write_text("not audio")
    (folder / "broken.wav").write_bytes(b"garbage")
    out = root / "folder_out"
    outs = separate.main([str(folder), "-o", str(out), "--checkpoint", path, "--tta", "--png", "--no-progress",
                          "--subtype", "FLOAT"])
    names = sorted(os.listdir(out))
    assert len(outs) == 3
    for stem in ("a", "b_mono", "c22k"):
        assert f"{stem}_Instruments.wav" in names and f"{stem}_Vocals.wav" in names and f"{stem}_mask.png" in names
    mono_inst, _ = sf.read(str(out / "b_mono_Instruments.wav"))
    assert mono_inst.shape[1] == 2 and np.allclose(mono_inst[:, 0], mono_inst[:, 1], atol=1e-6)
    c, sr = sf.read(str(out / "c22k_Vocals.wav"))
    assert sr == SR and abs(len(c) - int(0.6 * SR)) <= 2


def test_tta_mask_is_channel_symmetric(ckpt):
    _, path = ckpt
    model, _ = separate.load_model(path)
    x = torch.rand(1, 2, 33, 10)
    m = separate.predict_mask(model, x, tta=True)
    m_swapped = separate.predict_mask(model, x.flip(1), tta=True)
    torch.testing.assert_close(m, m_swapped.flip(1))
