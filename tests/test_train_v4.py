"""train.py's v4 recipe: curriculum stages and their exact resume, --init-from, per-preset recipe defaults,
validation's BSS-eval v4 SDR (against museval itself). Runs the v4-micro preset on seconds of synthetic audio."""
import csv
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from frame_transformer import audio, data, synth
from frame_transformer import train as ft
from frame_transformer.metrics import bss_eval_v4, bss_eval_v4_sdr
from frame_transformer.upstream import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
ENV.pop("TRITON_INTERPRET", None)
UPSTREAM_MICRO = os.path.join(ROOT, "tests", "data", "upstream_v4_micro.pth")  # a bare upstream v4 state_dict


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """3 + 2 tracks of 3 s at 16 kHz and a shared spectrogram cache."""
    root = tmp_path_factory.mktemp("v4train")
    paths = synth.make_library(str(root / "lib"), sr=16000, tracks=3, seconds=3.0, val_tracks=2, verbose=False)
    data_args = ["--instrumentals", paths["instrumentals"], "--vocals", paths["vocals"],
                 "--val-instrumentals", paths["val_instrumentals"], "--val-vocals", paths["val_vocals"],
                 "--sr", "16000", "--cache-dir", str(root / "cache")]
    return SimpleNamespace(root=root, paths=paths, data=data_args)


def cli(*args, cwd):
    r = subprocess.run([sys.executable, "-m", "frame_transformer.train", *map(str, args)], cwd=cwd, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def load(folder):
    return torch.load(os.path.join(folder, "checkpoint.pt"), weights_only=False)


def one_line(capsys, argv, rc=2):
    """ft.main(argv) in this process: exit status ``rc`` and exactly one line on stderr, no traceback."""
    try:
        code = ft.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == rc and len(lines) == 1 and "Traceback" not in err, (code, err)
    return lines[0]


def test_bss_eval_v4_sdr_is_museval_bss_eval_v4():
    """The batched SDR that validation uses equals museval's v4 SDR (metrics.bss_eval_v4): 1 s windows, the last
    partial window dropped, a window NaN when any source is silent there (museval: its channel sum is zero), one
    window for a signal shorter than that; a source silent throughout, which museval refuses, is all NaN."""
    rng = np.random.default_rng(0)
    sr = 8000
    for n in (int(3.6 * sr), sr // 2):
        voc, acc = rng.standard_normal((2, 2, n)) * 0.3, rng.standard_normal((2, 2, n)) * 0.5  # (items, ch, n)
        if n > sr:
            voc[0, 1, :sr] = -voc[0, 0, :sr]  # channels that cancel: silent to museval
            voc[0, :, sr:2 * sr] = 0  # a silent window
        else:
            voc[1] = 0
        est = voc + 0.3 * acc + 0.05 * rng.standard_normal(voc.shape)
        refs, ests = np.stack([voc, acc], 1), np.stack([est, voc + acc - est], 1)  # (items, sources, 2, n)
        fast = bss_eval_v4_sdr(refs, ests, sr)
        full = bss_eval_v4(refs[0], ests[0], sr)
        np.testing.assert_allclose(fast["frames"][0], full["frames"][0], rtol=1e-9, equal_nan=True)
        np.testing.assert_allclose(fast["sdr"][0], full["sdr"], rtol=1e-9)
        single = bss_eval_v4_sdr(refs[1], ests[1], sr)  # batching changes nothing
        np.testing.assert_array_equal(fast["frames"][1], single["frames"])
        if n > sr:
            assert fast["frames"].shape == (2, 2, 3) and np.isnan(fast["frames"][0, :, :2]).all()
            assert np.isfinite(fast["frames"][0, :, 2]).all() and np.isfinite(fast["frames"][1]).all()
        else:
            assert fast["frames"].shape == (2, 2, 1) and np.isnan(fast["sdr"][1]).all()
            with pytest.raises(ValueError, match="non-silent"):
                bss_eval_v4(refs[1], ests[1], sr)


CURRICULUM = ["--preset", "v4-micro", "--curriculum", "16:3:2:1,32:4:1:2", "--epoch-size", "8", "--val-items", "1",
              "--val-cropsize", "700", "--dropout", "0.1", "--no-progress", "--device", "cpu", "--no-initial-val",
              "--save-every-minutes", "0"]


def test_curriculum_stages_and_exact_resume_across_them(lib, tmp_path):
    """Stage 1 (crop 16, 2 x 1) for 3 steps, stage 2 (crop 32, 1 x 2) for 4: the switch happens inside the first
    epoch (8 items), the run ends inside the second. Stopped mid-stage-1, resumed across the switch and the epoch
    boundary, stopped mid-stage-2 and resumed to the end, it ends bitwise where a straight run ends (dropout on).
    Validation logs BSS-eval v4 SDR beside uSDR, and its value is museval's on the validation items."""
    straight = cli(*lib.data, *CURRICULUM, "--out", "straight", cwd=tmp_path)
    assert "7 steps in all, curriculum stage 1: 3 steps, crop 16 frames, batch 2 x accum 1; stage 2: 4 steps, " \
           "crop 32 frames, batch 1 x accum 2" in straight.stdout
    assert "curriculum stage 2/2 from step 3: crop 32 frames, batch 1 x accum 2" in straight.stdout
    cli(*lib.data, *CURRICULUM, "--out", "run", "--stop-after-steps", "2", cwd=tmp_path)
    k = load(tmp_path / "run")
    assert (k["step"], k["epoch"], k["epoch_items"]) == (2, 0, 4)
    r = cli("--out", "run", "--resume", "--stop-after-steps", "5", "--no-progress", "--device", "cpu", cwd=tmp_path)
    assert "curriculum stage 2/2 from step 3" in r.stdout
    k = load(tmp_path / "run")
    assert (k["step"], k["epoch"], k["epoch_items"]) == (5, 1, 2)  # epoch 1: steps 0-2 (2 items), 3 (2 items)
    cli("--out", "run", "--resume", "--no-progress", "--device", "cpu", cwd=tmp_path)
    a, b = load(tmp_path / "run"), load(tmp_path / "straight")
    assert (a["step"], a["epoch"], a["epoch_items"]) == (b["step"], b["epoch"], b["epoch_items"]) == (7, 2, 0)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for p, s in a["optimizer"]["state"].items():
        for n in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s[n], b["optimizer"]["state"][p][n]), (p, n)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    same = lambda h: [{k: v for k, v in r.items() if k not in ("train_loss", "elapsed_s")} for r in h]
    assert same(a["history"]) == same(b["history"])  # (train_loss: the mean over this process's steps)
    assert b["optimizer"]["param_groups"][0]["decoupled_weight_decay"] is False  # v4 recipe: Adam, no decay
    assert b["optimizer"]["param_groups"][0]["weight_decay"] == 0.0
    assert b["config"]["cropsize"] == 32 and b["config"]["normalize"] == "song"

    # validation: log.csv and the log lines carry BSS-eval v4 SDR beside uSDR; the value is museval's
    rows = list(csv.DictReader(open(tmp_path / "straight" / "log.csv")))
    assert [(int(r["step"]), int(r["cropsize"])) for r in rows] == [(4, 32), (7, 32)]
    assert re.search(r"epoch 2: .*val vocals SDR -?\d+\.\d\d dB \(BSS-eval v4\), uSDR -?\d+\.\d\d dB", straight.stdout)
    assert re.search(r"done: step 7, val vocals SDR \(BSS-eval v4\) \S+ -> \S+ dB \(the mixture itself: \S+ dB\), "
                     r"uSDR \S+ -> \S+ dB", straight.stdout)
    model, info = load_model(str(tmp_path / "straight" / "checkpoint.pt"))
    cache = data.SpectrogramCache(str(lib.root / "cache"), 16000, 128, 64)
    val = data.build_dataset(cache, lib.paths["val_instrumentals"], lib.paths["val_vocals"], cropsize=700,
                             epoch_size=1, seed=7919, augment=False, return_complex=True, normalize="song")
    x, _, xc, vc = val[0]  # the one validation item (2.8 s: two 1 s windows)
    with torch.no_grad():
        mask = model(x[None])[0]
    n = (x.shape[-1] - 1) * 64
    est, ref, mix = (audio.istft(s, 128, 64, n).double().numpy() for s in ((1 - mask) * xc, vc, xc))
    museval = bss_eval_v4(np.stack([ref, mix - ref]), np.stack([est, mix - est]), 16000)
    assert museval["frames"].shape == (4, 2, 2) and np.isfinite(museval["sdr"]).all()
    assert float(rows[-1]["val_bss_sdr"]) == pytest.approx(float(museval["sdr"][0]), rel=1e-6)


def test_init_from_an_upstream_state_dict(lib, tmp_path, capsys, monkeypatch):
    """--init-from a bare upstream v4 state_dict: the model is its (v4-micro, dropout as upstream's 0.1), the
    weights are its, the optimizer and schedule start fresh; a train.py checkpoint works the same way. Options
    that contradict the checkpoint, or --resume beside it, are one-line errors."""
    r = cli(*lib.data, "--init-from", UPSTREAM_MICRO, "--out", "init", "--curriculum", "16:2:2:1", "--val-items",
            "2", "--no-progress", "--device", "cpu", "--no-initial-val", cwd=tmp_path)
    assert f"FrameTransformer (v4-micro, the --init-from model): 134,362 parameters; weights from {UPSTREAM_MICRO} " \
           f"(upstream-v4)" in r.stdout
    ck = load(tmp_path / "init")
    upstream, info = load_model(UPSTREAM_MICRO)
    assert ck["config"]["model"] == dict(info["model"]) and ck["config"]["model"]["dropout"] == 0.1
    assert ck["config"]["args"]["preset"] == "v4-micro" and ck["step"] == 2
    assert all(int(s["step"]) == 2 for s in ck["optimizer"]["state"].values())  # a fresh optimizer
    moved = [float((ck["model"][k] - v).abs().max()) for k, v in upstream.state_dict().items() if v.numel()]
    assert 0 < max(moved) < 3e-4  # two Adam steps at lr <= 1e-4 away from the file's weights

    # in-process: the built model holds exactly the file's weights; then from our own checkpoint
    monkeypatch.chdir(tmp_path)
    for source, expected, sr in ((UPSTREAM_MICRO, upstream.state_dict(), 44100),
                                 (str(tmp_path / "init" / "checkpoint.pt"), ck["model"], 16000)):
        argv = ["--instrumentals", lib.paths["instrumentals"], "--vocals", lib.paths["vocals"], "--init-from",
                source, "--out", "x", "--device", "cpu"]
        args, resumed, _, init = ft.resolve_options(argv)
        assert resumed is None and args.preset == "v4-micro" and (args.sr, args.hop) == (sr, 64)
        run = ft.Run(args, torch.device("cpu"), log=lambda m: None)
        ft.build_model(run, init)
        got = run.model.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k].float()) for k in got)

    data_args = ["--instrumentals", lib.paths["instrumentals"], "--vocals", lib.paths["vocals"], "--device", "cpu"]
    for argv, expect in (
            (["--init-from", UPSTREAM_MICRO, "--out", "init", "--resume"], "--init-from starts a new run .* give one"),
            (["--init-from", UPSTREAM_MICRO, "--channels", "8"], "--channels 8 conflicts with the --init-from "
                                                                 "model's channels 2: .*drop the option"),
            (["--init-from", UPSTREAM_MICRO, "--preset", "tiny"], "--preset tiny conflicts with the --init-from "
                                                                  "model \\(v4, channels 2, n_fft 128\\)"),
            (["--init-from", "missing.pth"], "--init-from: no such checkpoint: .*missing.pth"),
            (["--init-from", os.path.join(ROOT, "README.md")], "--init-from: .*README.md is not a PyTorch checkpoint"),
            (["--out", "init", "--resume", "--optimizer", "adamw"], "--optimizer adamw conflicts with the resumed "
                                                                    "run's optimizer adam: .*--init-from"),
            (["--preset", "v4-micro", "--cropsize", "64"], "--cropsize conflicts with the curriculum "
                                                           "16:60:3:1,32:20:1:3 .*--curriculum none"),
            (["--curriculum", "16:x:2"], "argument --curriculum: stage '16:x:2' is not CROP:STEPS:BATCH\\[:ACCUM\\]")):
        line = one_line(capsys, data_args + ["--out", "new"] + argv)
        assert re.search(expect, line), line
    assert not os.path.exists("new")


def test_recipe_defaults_per_preset(lib, tmp_path, monkeypatch):
    """v4 presets default to upstream's train4.py recipe, the all-linear ones keep theirs; explicit options win."""
    monkeypatch.chdir(tmp_path)
    base = ["--instrumentals", lib.paths["instrumentals"], "--vocals", lib.paths["vocals"], "--device", "cpu"]
    want = dict(optimizer="adam", lr=1e-4, weight_decay=0.0, clip=0.5, warmup_steps=3, normalize="song",
                clip_target=True, augment="upstream", curriculum="256:400000:3:3,512:500000:1:8", cropsize=512,
                batch_size=None, accum=None, epochs=None, val_cropsize=512, hop=1024, sr=44100)
    args = ft.resolve_options(base + ["--preset", "v4"])[0]
    assert {k: getattr(args, k) for k in want} == want
    args = ft.resolve_options(base + ["--preset", "tiny"])[0]
    assert (args.optimizer, args.lr, args.weight_decay, args.clip, args.normalize, args.clip_target, args.augment,
            args.curriculum, args.cropsize, args.batch_size, args.accum, args.epochs) == \
           ("adamw", 5e-4, 0.01, 1.0, "crop", False, "standard", "none", 64, 4, 1, 12)
    args = ft.resolve_options(base + ["--preset", "v4", "--optimizer", "adamw", "--normalize", "crop",
                                      "--no-clip-target", "--augment", "standard", "--curriculum", "none",
                                      "--cropsize", "128", "--val-cropsize", "64"])[0]
    assert (args.optimizer, args.normalize, args.clip_target, args.augment, args.curriculum, args.cropsize,
            args.batch_size, args.accum, args.val_cropsize) == ("adamw", "crop", False, "standard", "none", 128, 3, 3,
                                                                64)
    assert ft.stages(args) == [ft.Stage(128, 3, 3)]
    args = ft.resolve_options(base + ["--preset", "v4-tiny", "--curriculum", "64:10:4,128:5:2:2"])[0]
    assert ft.stages(args) == [ft.Stage(64, 4, 1, 10), ft.Stage(128, 2, 2, 5)]
    assert [ft.stage_at(args, s)[0] for s in (0, 9, 10, 14, 15, 99)] == [0, 0, 1, 1, 1, 1]
    assert ft.curriculum_steps(args) == 15
