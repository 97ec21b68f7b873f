"""Whole model (frame_transformer.model.FrameTransformer): one training step (forward + L1 loss + backward +
AdamW) and inference of a 30 s song, for every (ops backend x eager/compiled) pair, on the same weights and inputs.

Providers: ``reference`` (every op on the plain-PyTorch reference; the baseline), ``ftkernels`` (backend auto:
the Triton kernels on CUDA; on CPU identical to ``reference``, so skipped there), and ``reference+compile`` /
``ftkernels+compile`` (``torch.compile(model)``, default mode; in smoke mode ``backend="eager"``, which checks
that dynamo captures the model without paying for inductor's codegen). On CPU the full run skips the compiled
model unless ``FTBENCH_CPU_COMPILE_MODEL=1`` (inductor's C++ codegen for it takes many minutes on a small CPU).

Configurations: CUDA: the ``default`` preset (the all-linear network, n_fft 2048, 6 levels) and ``v4`` (the seed's
published model; ``FTBENCH_MODEL_PRESETS=tiny,default`` picks others), bf16 autocast, train batch 4 x 256 frames; CPU: the ``tiny`` preset in float32, train batch 2 x 128
frames. The song: 30 s at 44.1 kHz with the seed's hop of 1024 = 1293 frames, cut into 256-frame crops (the seed's
cropsize), zero-padded to whole crops, run in one batch and stitched back. FLOPs are counted once on the reference
model with torch.utils.flop_counter.
Peak memory (CUDA) is the peak allocated during one step above what was resident before it.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_utils

OP = "model"
SR, HOP, SONG_S, CROP = 44100, 1024, 30.0, 256
PROVIDERS = ["reference", "ftkernels", "reference+compile", "ftkernels+compile"]


def _model_module():
    try:
        from frame_transformer import model as m
    except Exception as e:  # the model is written by another part of the project
        pytest.skip(f"frame_transformer.model is not importable ({type(e).__name__}: {e})")
    return m


def model_presets():
    """Presets the full CUDA run times: FTBENCH_MODEL_PRESETS=tiny,default (comma-separated), default "default,v4"."""
    names = [p.strip() for p in os.environ.get("FTBENCH_MODEL_PRESETS", "default,v4").split(",") if p.strip()]
    known = _model_module().PRESETS
    unknown = [p for p in names if p not in known]
    if unknown:
        raise ValueError(f"FTBENCH_MODEL_PRESETS: unknown preset(s) {unknown}; choose from {sorted(known)}")
    return names


def configs(config):
    """(task, preset, batch, frames) per task for this mode/device."""
    if not bench_utils.is_full(config):
        return [("train_step", "micro", 1, 16), ("inference_song", "micro", None, 40)]
    song_frames = int(SONG_S * SR) // HOP + 1
    if bench_utils.HAS_CUDA:
        return [c for p in model_presets()
                for c in (("train_step", p, 4, 256), ("inference_song", p, None, song_frames))]
    return [("train_step", "tiny", 2, 128), ("inference_song", "tiny", None, song_frames)]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    params = [(c, p) for c in configs(metafunc.config) for p in PROVIDERS]
    metafunc.parametrize("case", params, ids=[f"{c[0]}-{c[1]}-{p}" for c, p in params])


_BASE = {}
_EXPECTED = {}


def base_model(preset):
    """One fp32 model per preset, initialised once (every provider deep-copies it: same weights)."""
    if preset not in _BASE:
        m = _model_module()
        torch.manual_seed(0)
        _BASE[preset] = m.FrameTransformer(m.preset(preset, dropout=0.0))  # deterministic steps to compare
    return _BASE[preset]


def crops(song, crop):
    """(1, C, bins, T) -> (n, C, bins, crop), zero-padded at the end."""
    T = song.shape[-1]
    n = math.ceil(T / crop)
    padded = F.pad(song, (0, n * crop - T))
    return padded.reshape(*song.shape[:3], n, crop).permute(3, 1, 2, 0, 4).reshape(n, song.shape[1], song.shape[2],
                                                                                    crop)


def stitch(out, T):
    n, C, bins, crop = out.shape
    return out.reshape(n, C, bins, crop).permute(1, 2, 0, 3).reshape(1, C, bins, n * crop)[..., :T]


def make_inputs(task, model, batch, frames, device, i):
    g = torch.Generator(device="cpu").manual_seed(500 + i)
    bins = model.output_bin
    if task == "train_step":
        mix = torch.rand(batch, model.config.in_channels, bins, frames, generator=g)
        target = mix * torch.rand(mix.shape, generator=g)
        return mix.to(device), target.to(device)
    return (torch.rand(1, model.config.in_channels, bins, frames, generator=g).to(device),)


def autocast_ctx(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=bench_utils.bench_dtype())
    return torch.autocast("cpu", enabled=False)


def build(provider, preset, device, full=True):
    model = copy.deepcopy(base_model(preset)).to(device)
    backend = "reference" if provider.startswith("reference") else "auto"
    model.set_backend(backend)
    run = model
    if provider.endswith("+compile"):
        # smoke mode: dynamo capture only (inductor's codegen for the whole training graph takes minutes on a
        # small CPU); the full run compiles for real
        run = torch.compile(model) if full else torch.compile(model, backend="eager")
    return model, run


def make_step(task, model, run, device, crop):
    if task == "train_step":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(mix, target):
            opt.zero_grad(set_to_none=True)
            with autocast_ctx(device):
                loss = F.l1_loss(run(mix) * mix, target)
            loss.backward()
            opt.step()
            return loss.detach()
        return step

    model.eval()

    def infer(song):
        with torch.no_grad(), autocast_ctx(device):
            return stitch(run(crops(song, crop)).float(), song.shape[-1])
    return infer


def count_flops(task, preset, inputs, device, crop):
    from torch.utils.flop_counter import FlopCounterMode
    model, run = build("reference", preset, device)
    step = make_step(task, model, run, device, crop)
    with FlopCounterMode(display=False) as counter:
        step(*inputs)
    return counter.get_total_flops()


@pytest.fixture
def release_memory():
    """Drop compiled graphs and cached blocks after each case: one default-preset model with its AdamW state
    is ~11 GB, and four providers x two tasks must not pile up on the GPU."""
    yield
    import gc
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def test_model(request, bench, case, release_memory):
    (task, preset, batch, frames), provider = case
    device = bench.device
    crop = CROP if bench.full else 16
    base = base_model(preset)
    size = (f"{preset} preset, B{batch} W{frames}" if task == "train_step"
            else f"{preset} preset, {SONG_S:.0f} s song ({frames} frames, {crop}-frame crops)")
    if not bench_utils.HAS_CUDA and provider.startswith("ftkernels"):
        if bench.full:
            bench.rows.append({"op": OP, "mode": task, "size": size, "provider": provider,
                               "baseline": "reference", "note": "", "metric": "flops",
                               "skipped": "on CPU the ftkernels backend runs the reference (same code)"})
        pytest.skip("on CPU the ftkernels backend runs the reference (same code as 'reference')")
    if (bench.full and not bench_utils.HAS_CUDA and provider.endswith("+compile")
            and os.environ.get("FTBENCH_CPU_COMPILE_MODEL") != "1"):
        reason = ("inductor's C++ codegen for the whole model took over 9 minutes on the 2-core CPU this was "
                  "written on; set FTBENCH_CPU_COMPILE_MODEL=1 to include it")
        bench.rows.append({"op": OP, "mode": task, "size": size, "provider": provider, "baseline": "reference",
                           "note": "", "metric": "flops", "skipped": reason})
        pytest.skip(reason)
    n_sets = 2 if bench.full else 1
    sets = [make_inputs(task, base, batch, frames, device, i) for i in range(n_sets)]
    model, run = build(provider, preset, device, bench.full)
    step = make_step(task, model, run, device, crop)
    got = step(*sets[0])  # also the compile / warm-up call
    # correctness: the same step (first training loss, or the song's mask) from the reference eager model
    key = (task, preset)
    if key not in _EXPECTED:
        ref_model, ref_run = build("reference", preset, device)
        _EXPECTED[key] = make_step(task, ref_model, ref_run, device, crop)(*sets[0])
        del ref_model, ref_run
    tol = bench_utils.TOLERANCE[bench.dtype] * (5 if device.type == "cuda" else 1)
    err = bench_utils.rel_err(got, _EXPECTED[key])
    assert err <= tol, f"{provider}: {task} output relative error {err} > {tol} vs the reference eager model"
    if not bench.full:
        return
    flops = count_flops(task, preset, sets[0], device, crop)
    bench._last_spread = {}
    t, rounds, peak = bench.time_step(request, step, sets, (), f"{OP} {task} {preset}", target_s=3.0, max_rounds=10)
    row = {"op": OP, "mode": task, "size": size, "dims": {"preset": preset, "batch": batch, "frames": frames},
           "provider": provider, "baseline": "reference", "metric": "flops",
           "note": "fp32" if device.type == "cpu" else f"{bench_utils.bench_dtype()} autocast".replace("torch.", ""),
           "dtype": "float32" if device.type == "cpu" else str(bench.dtype).replace("torch.", ""),
           "max_rel_err": err, "median_s": t, "rounds": rounds, "input_sets": n_sets, "flops": flops,
           "bytes": None, "peak_mem_bytes": peak, "params": base.num_parameters(), **bench._last_spread}
    bench.record(row)
