"""The separation command as a user runs it: a subprocess, from another folder, with relative paths; its help;
one-line errors and exit codes; Ctrl-C / SIGTERM and a disk that fills up leave no partial files."""
import argparse
import os
import resource
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from frame_transformer import evaluate, separate
from separation_helpers import REPO, all_files, assert_one_line_error, cli, make_checkpoint, write_song


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"))


def test_runs_from_another_folder_with_relative_paths(ckpt, tmp_path):
    x = write_song(str(tmp_path / "music" / "song.wav"), seconds=0.6)
    work = tmp_path / "work"
    work.mkdir()
    r = cli("separate", "../music/song.wav", "-o", "stems", "-c", os.path.relpath(ckpt, work), "--no-progress",
            "--subtype", "FLOAT", cwd=work, check_rc=0)
    assert all_files(work) == ["stems/song.wav_Instruments.wav", "stems/song.wav_Vocals.wav"]
    v = sf.read(str(work / "stems" / "song.wav_Vocals.wav"))[0]
    i = sf.read(str(work / "stems" / "song.wav_Instruments.wav"))[0]
    np.testing.assert_allclose(v + i, x.T, atol=1e-6)
    assert r.stdout == "../music/song.wav -> stems/song.wav_Vocals.wav, stems/song.wav_Instruments.wav\n"
    assert r.stderr == ""


@pytest.mark.parametrize("module", ["separate", "evaluate"])
def test_help_shows_every_option_with_a_help_line_and_its_default(module):
    mod = {"separate": separate, "evaluate": evaluate}[module]
    r = cli(module, "-h", check_rc=0)
    text = " ".join(r.stdout.split())  # argparse wraps help lines: compare with whitespace collapsed
    for action in mod.build_parser()._actions:
        if not action.option_strings or action.help is argparse.SUPPRESS:
            continue
        assert action.help, f"{action.option_strings} has no help"
        assert " ".join(action.help.split()) in text, action.option_strings
        if action.nargs != 0 and not action.required and "--help" not in action.option_strings:
            i = text.index(" ".join(action.help.split()))
            assert "default" in text[i:i + len(action.help) + 40], f"{action.option_strings}: no default shown"
    lines = r.stdout.splitlines()
    examples = [l for l in mod.__doc__.splitlines() if l.startswith(f"  frame-transformer-{module} ")]
    assert examples and all(l in lines for l in examples)  # usage examples render line by line, unmangled
    assert "\\" not in r.stdout


def test_user_mistakes_get_one_line_and_exit_1(ckpt, tmp_path):
    write_song(str(tmp_path / "a.wav"), seconds=0.3)
    (tmp_path / "notes.txt").write_text("not audio")
    (tmp_path / "bad.pt").write_bytes(b"garbage" * 100)
    (tmp_path / "file").write_text("x")
    cases = [
        (["a.wav", "-c", "missing.pt"], "checkpoint not found: missing.pt"),
        (["a.wav", "-c", "bad.pt"], "cannot load checkpoint: bad.pt is not a PyTorch checkpoint"),
        (["notes.txt", "-c", ckpt], "cannot read"),
        (["nothing_here", "-c", ckpt], "no such file or folder: nothing_here"),
        (["a.wav", "-c", ckpt, "-o", "file"], "output folder file is a file"),
    ]
    for args, msg in cases:
        r = cli("separate", *args, "--no-progress", cwd=tmp_path)
        assert r.returncode == 1, (args, r.stderr)
        line = [l for l in r.stderr.splitlines() if l.strip()]
        assert "Traceback" not in r.stderr and msg in r.stderr, (args, r.stderr)
        assert line[0].startswith("frame-transformer-separate: error:")
        assert len(line) == 1, r.stderr
    assert all_files(tmp_path / "separated") == []


def test_folder_with_a_broken_file_exits_1_after_separating_the_rest(ckpt, tmp_path):
    write_song(str(tmp_path / "in" / "a.wav"), seconds=0.3)
    (tmp_path / "in" / "b.flac").write_bytes(b"fLaC garbage")
    r = cli("separate", "in", "-o", "out", "-c", ckpt, "--no-progress", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "b.flac" in r.stderr and "separated 1 of 2 files into out; 1 failed: b.flac" in r.stderr
    assert all_files(tmp_path / "out") == ["a.wav_Instruments.wav", "a.wav_Vocals.wav"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_no_partial_or_temporary_file(ckpt, tmp_path, sig):
    write_song(str(tmp_path / "long.wav"), seconds=30.0)
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop("TRITON_INTERPRET", None)
    # a process started with SIGINT ignored (any background job of a non-interactive shell, e.g. a CI runner's
    # `cmd &`) keeps ignoring it: Python installs its KeyboardInterrupt handler only over the default disposition.
    # Give the command the disposition a terminal's foreground job has, whatever ran pytest.
    p = subprocess.Popen([sys.executable, "-m", "frame_transformer.separate", "long.wav", "-o", "out", "-c", ckpt,
                          "--no-progress", "--device", "cpu", "--batch-size", "1"], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not any(f.endswith(".tmp") for f in all_files(tmp_path / "out")):  # writing has started
        assert p.poll() is None and time.time() < deadline, "separation ended before it could be interrupted"
        time.sleep(0.02)
    time.sleep(0.3)  # mid-file
    p.send_signal(sig)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip() == \
        "frame-transformer-separate: interrupted; finished files are kept, the one in progress was removed"
    assert all_files(tmp_path / "out") == []


def test_disk_full_is_one_line_and_leaves_no_partial_file(ckpt, tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes the OS refuse writes past 200 kB, as a
    full disk does (EFBIG instead of ENOSPC; the in-process test simulates ENOSPC itself)."""
    write_song(str(tmp_path / "in" / "a.wav"), seconds=0.3)   # 38 kB per FLOAT stem: fits
    write_song(str(tmp_path / "in" / "b.wav"), seconds=3.0)   # 384 kB per stem: the disk "fills up"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    r = cli("separate", "in", "-o", "out", "-c", ckpt, "--no-progress", "--subtype", "FLOAT", cwd=tmp_path,
            preexec_fn=limit)
    line = assert_one_line_error(r, "File too large", "out/b.wav_", "free some space or choose another folder",
                                 "kept the 1 file finished before it")
    assert line.startswith("frame-transformer-separate: error: writing ")
    assert all_files(tmp_path / "out") == ["a.wav_Instruments.wav", "a.wav_Vocals.wav"]
