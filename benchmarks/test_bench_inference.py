"""Song inference end to end: ``frame-transformer-separate``'s v4 mode (upstream inference_v4.py's algorithm) on a
30 s song, from the audio file to the vocals and instruments at the model's rate: the first pass for the song's
maximum, the streaming STFT, the crops through the model, the streaming inverse STFT.

Tasks: ``song_v4`` (upstream's defaults: crops of 512 frames with 1024 frames of context each side, batch 1) and
``song_v4_tta`` (upstream's TTA: masks averaged over context paddings 0, 256, 512). Providers: ``reference``
(every op on the plain-PyTorch reference; the baseline) and ``ftkernels`` (backend auto: the Triton kernels on
CUDA; on CPU identical to ``reference``, so skipped there). Float32 throughout, as the command runs.

Configurations: CUDA: the ``v4`` preset (the seed's published model, 192,699,428 parameters; n_fft 2048, hop
1024), a 30 s song at 44.1 kHz = 1293 frames = 3 crops of 2560 frames. CPU: the ``v4-tiny`` preset (n_fft 256, hop
128) on a 30 s song at 16 kHz = 3751 frames = 8 crops of 2560 frames; the CPU reference attention materialises the
2560 x 2560 scores, so each crop costs seconds. Smoke (CI): ``v4-micro``, a 1 s song at 16 kHz, crops of 64 + 2 x
32 frames. FLOPs are counted once on the reference model with torch.utils.flop_counter (the model's; the STFTs are
not counted). Peak memory (CUDA) is the peak allocated during one song above what was resident before it.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import soundfile as sf
import torch

from benchmarks import bench_utils

OP = "inference"
SONG_S = 30.0
PROVIDERS = ["reference", "ftkernels"]
TASKS = ("song_v4", "song_v4_tta")


def configs(config):
    """(preset, sample rate, hop, seconds, cropsize, padding) for this mode/device."""
    if not bench_utils.is_full(config):
        return ("v4-micro", 16000, 64, 1.0, 64, 32)
    if bench_utils.HAS_CUDA:
        return ("v4", 44100, 1024, SONG_S, 512, 1024)
    return ("v4-tiny", 16000, 128, SONG_S, 512, 1024)


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    cfg = configs(metafunc.config)
    params = [(task, cfg, p) for task in TASKS for p in PROVIDERS]
    metafunc.parametrize("case", params, ids=[f"{t}-{c[0]}-{p}" for t, c, p in params])


_BASE = {}
_EXPECTED = {}


def base_model(preset):
    if preset not in _BASE:
        from frame_transformer.model import FrameTransformer, preset as make
        torch.manual_seed(0)
        _BASE[preset] = FrameTransformer(make(preset, dropout=0.0)).eval()
    return _BASE[preset]


@pytest.fixture(scope="module")
def song_files(tmp_path_factory):
    """One synthetic song per (rate, seconds), written once."""
    from frame_transformer import synth
    folder, made = tmp_path_factory.mktemp("songs"), {}

    def get(sr, seconds):
        if (sr, seconds) not in made:
            x = 0.5 * synth.instrumental(seconds, sr, 1) + 0.4 * synth.vocal(seconds, sr, 1)
            path = str(folder / f"song_{sr}_{seconds:g}.wav")
            sf.write(path, np.asarray(x, np.float32).T, sr, subtype="FLOAT")
            made[(sr, seconds)] = path
        return made[(sr, seconds)]
    return get


def separate_song(model, path, cfg, opts, device):
    """The command's v4 mode on ``path``: (vocals, instruments) at the model's rate, (2, n) float32 tensors."""
    from frame_transformer import separate
    blocks = list(separate.iter_stems(model, path, cfg, opts, device, rate="model"))
    return (torch.from_numpy(np.concatenate([b[0] for b in blocks], 1)),
            torch.from_numpy(np.concatenate([b[1] for b in blocks], 1)))


def test_inference(request, bench, case, song_files):
    from frame_transformer import separate
    task, (preset, sr, hop, seconds, cropsize, padding), provider = case
    device = bench.device
    base = base_model(preset)
    frames = int(seconds * sr) // hop + 1
    size = (f"{preset} preset, {seconds:g} s song at {sr} Hz ({frames} frames), crops {cropsize} + 2 x {padding}"
            + (", TTA 0/256/512" if task.endswith("tta") else ""))
    if not bench_utils.HAS_CUDA and provider == "ftkernels":
        if bench.full:
            bench.rows.append({"op": OP, "mode": task, "size": size, "provider": provider, "baseline": "reference",
                               "note": "", "metric": "flops",
                               "skipped": "on CPU the ftkernels backend runs the reference (same code)"})
        pytest.skip("on CPU the ftkernels backend runs the reference (same code as 'reference')")
    path = song_files(sr, seconds)
    cfg = dict(sr=sr, n_fft=base.config.n_fft, hop=hop)
    tta = task.endswith("tta")
    opts = separate.CropOptions(cropsize=cropsize, padding=None if tta else padding, batch_size=1, mode="v4",
                                tta=tta, tta_paddings=(0, 256, 512) if bench.full else (0, 16, 32))
    model = copy.deepcopy(base).to(device).set_backend("reference" if provider == "reference" else "auto")

    def step():
        with torch.no_grad():
            return separate_song(model, path, cfg, opts, device)

    vocals, instruments = step()  # also the warm-up
    mixture = torch.from_numpy(sf.read(path, dtype="float32", always_2d=True)[0].T.copy())
    # the stems split the mixture, and every provider gives the reference eager model's vocals
    assert bench_utils.rel_err(vocals + instruments, mixture) <= 1e-5
    assert vocals.abs().max() > 1e-3 * mixture.abs().max()
    key = (task, preset)
    if key not in _EXPECTED:
        ref = copy.deepcopy(base).to(device).set_backend("reference")
        with torch.no_grad():
            _EXPECTED[key] = vocals if provider == "reference" else separate_song(ref, path, cfg, opts, device)[0]
        del ref
    tol = bench_utils.TOLERANCE[torch.float32] * (5 if device.type == "cuda" else 1)
    err = bench_utils.rel_err(vocals, _EXPECTED[key])
    assert err <= tol, f"{provider}: {task} vocals relative error {err} > {tol} vs the reference eager model"
    if not bench.full:
        return
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    bench._last_spread = {}
    t, rounds, peak = bench.time_step(request, lambda: step(), [()], (), f"{OP} {task} {preset}", target_s=3.0,
                                      max_rounds=5)
    bench.record({"op": OP, "mode": task, "size": size, "provider": provider, "baseline": "reference",
                  "dims": {"preset": preset, "sr": sr, "frames": frames, "cropsize": cropsize, "padding": padding},
                  "metric": "flops", "note": "fp32",
                  "dtype": "float32", "max_rel_err": err, "median_s": t, "rounds": rounds, "input_sets": 1,
                  "flops": counter.get_total_flops(), "bytes": None, "peak_mem_bytes": peak,
                  "params": base.num_parameters(), "song_s": seconds, **bench._last_spread})
