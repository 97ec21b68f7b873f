"""train.py: resume exactness, NaN skipping, DDP (gloo, 2 processes), and a short demo run that learns."""
import csv
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402

# a small model (2 channels, 1-2 attention maps) on a tiny synthetic library
# on the CPU even where a GPU exists: the exactness checks and the measured SDR gain are CPU properties
SMALL = ["--preset", "tiny", "--channels", "2", "--num-attention-maps", "1,1,2,2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return root, ["--synth-dir", str(root / "lib"), "--synth-tracks", "3", "--synth-seconds", "1.5",
                  "--cache-dir", str(root / "cache")]


def fast_args(common, out, *extra):
    root, data = common
    return data + SMALL + ["--out", str(root / out), "--cropsize", "16", "--batch-size", "2", "--epoch-size", "8",
                           "--val-items", "4", "--epochs", "2", "--warmup-steps", "2", "--no-initial-val",
                           "--lr", "3e-3", *extra]


def load(common, out):
    return torch.load(os.path.join(common[0], out, "checkpoint.pt"), weights_only=False)


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_exact(common):
    # 6 steps straight (4 per epoch, so the run crosses an epoch boundary) ...
    train.main(fast_args(common, "straight", "--stop-after-steps", "6"))
    # ... equals 3 steps, a saved checkpoint, and 3 more steps after --resume
    train.main(fast_args(common, "resumed", "--stop-after-steps", "3"))
    mid = load(common, "resumed")
    assert mid["step"] == 3 and mid["step_in_epoch"] == 3 and mid["epoch"] == 0
    train.main(["--out", str(common[0] / "resumed"), "--resume", "--stop-after-steps", "6", "--no-progress",
                "--device", "cpu"])
    a, b = load(common, "straight"), load(common, "resumed")
    assert a["step"] == b["step"] == 6
    assert_same_state(a["model"], b["model"])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    for k in sa:
        for n in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k][n], sb[k][n])
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert [r["val_loss"] for r in a["history"]] == [r["val_loss"] for r in b["history"]]
    for key in ("python", "numpy", "torch", "loader"):
        assert key in a["rng"]
    # CSV log and plot beside the checkpoint
    out = common[0] / "straight"
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert rows and {"step", "train_loss", "val_loss", "val_sdr"} <= set(rows[0])
    assert (out / "loss.png").exists()
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # atomic writes leave no temp files


def test_nan_loss_skips_the_step(common):
    train.main(fast_args(common, "one", "--stop-after-steps", "1"))
    train.main(fast_args(common, "nan", "--stop-after-steps", "2", "--inject-nan-at", "2"))
    ck = load(common, "nan")
    assert ck["nan_total"] == 1 and ck["step"] == 2
    # the NaN step made no update: the weights are those after step 1
    assert_same_state(ck["model"], load(common, "one")["model"])
    for p in ck["model"].values():
        assert torch.isfinite(p).all()


def test_persistent_nan_stops_with_a_message(common, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(fast_args(common, "nanstop", "--inject-nan-at", "all", "--max-nan", "3"))
    assert e.value.code == 2
    assert "3 consecutive steps had a non-finite loss" in capsys.readouterr().err
    assert load(common, "nanstop")["nan_total"] == 3


def test_ddp_two_processes_gloo(common):
    root, data = common
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "train.py"), *fast_args(common, "ddp", "--stop-after-steps", "3")]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    sums = re.search(r"replica weight checksums: \[([^\]]*)\]", r.stdout).group(1).split(",")
    assert len(sums) == 2 and float(sums[0]) == float(sums[1])
    ck = load(common, "ddp")
    assert ck["step"] == 3 and ck["config"]["args"]["epoch_size"] == 8
    assert load(common, "ddp")["step"] == 3


def test_demo_training_improves_vocal_sdr(tmp_path):
    """Short demo run on the built-in synthetic data: validation vocals uSDR beats the untrained model."""
    data = ["--synth-dir", str(tmp_path / "lib"), "--synth-tracks", "6", "--synth-seconds", "3"]
    t = train.main(data + SMALL + ["--out", str(tmp_path / "demo"), "--cropsize", "32", "--batch-size", "4",
                                   "--epoch-size", "64", "--epochs", "6", "--val-items", "12", "--lr", "3e-3",
                                   "--warmup-steps", "4"])
    hist = t.history
    before, after = hist[0]["val_sdr"], hist[-1]["val_sdr"]
    print(f"demo: val vocals uSDR {before:.2f} -> {after:.2f} dB")
    assert hist[0]["step"] == 0 and hist[-1]["step"] == 96
    # measured: 3.7 -> 9.3 dB; require a 2 dB gain
    assert after > before + 2.0, (before, after)
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
