"""Compile gate: every launch that runs (model presets' training steps, benchmark cases, an odd-shape sweep; fp32,
fp16, bf16) is built to cubin for sm_80 and sm_90 with the specialization Triton's JIT uses at run time, and its
shared memory fits each chip.

The recording runs here under TRITON_INTERPRET=1 (in a subprocess on a GPU machine; meta tensors, kernels replaced
by a recorder); the builds run in a subprocess without TRITON_INTERPRET (``python -m ftkernels._compile_gate``).
"""
import importlib
import inspect
import os
import pkgutil
import re

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

import ftkernels
from ftkernels import _compile_gate as gate
from ftkernels import _launch_recorder as lr
from ftkernels import static_report

interpreting = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                  reason="records in this process, which needs TRITON_INTERPRET=1")


def _defined_kernels():
    """'module:name' of every Triton kernel (jit, interpreted or autotuned) defined in the ftkernels package;
    jit functions that other jit functions call are device functions, built inside their callers."""
    from triton.runtime.jit import KernelInterface
    fns = {}
    for info in pkgutil.iter_modules(ftkernels.__path__):
        mod = importlib.import_module(f"ftkernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, KernelInterface):
                fn = lr._python_fn(obj)
                if fn.__module__ == mod.__name__:
                    fns[f"{fn.__module__}:{fn.__qualname__}"] = fn
    sources = {k: inspect.getsource(fn) for k, fn in fns.items()}
    called = {k for k, fn in fns.items()
              if any(re.search(rf"\b{fn.__name__}\(", src) for o, src in sources.items() if o != k)}
    return set(fns) - called


def test_every_kernel_is_recorded_and_every_dtype_flows_through():
    launches, ops, skipped = lr.load(lr.cached_recording())
    assert _defined_kernels() <= {l.kernel for l in launches}, "kernels no workload launches (so never gated)"
    # the only workloads not recorded are the ones the benchmarks skip on a GPU too, or presets not yet defined
    assert all("head dim" in r or "no preset" in r for r in skipped.values()), skipped
    steps = [w for w in {l.workload for l in launches} if w.startswith("step:")]
    assert {"step:tiny:B8xW256", "step:default:B8xW256", "step:channels32:B8xW256"} <= set(steps)
    for w in steps:
        for dt in ("fp32", "fp16", "bf16"):
            mine = [l for l in launches if l.workload == w and l.dtype == dt]
            # forward and backward of every op class ran, and autocast made every data tensor the step's dtype
            classes = {l.op for l in mine}
            assert {"ftkernels::frame_norm", "ftkernels::frame_norm_backward", "ftkernels::multichannel_attention",
                    "ftkernels::multichannel_attention_backward", "ftkernels::squared_relu_ffn",
                    "ftkernels::squared_relu_ffn_backward", "ftkernels::multichannel_linear",
                    "ftkernels::multichannel_linear_backward"} <= classes, (w, dt, classes)
            # (but the v4 model's first frame norm: autocast leaves a norm's input alone, and that input is the
            # fp32 spectrogram, 2 channels; its backward writes that input's gradients in fp32)
            first_norm = {i for o in ops if o["workload"] == w and o["dtype"] == dt and dt != "fp32"
                          and o["op"].startswith("ftkernels::frame_norm") and o["args"]["x"][1] == "fp32"
                          for i in o["launches"]}
            assert all(o["args"]["x"][2][1] == 2 and w.startswith("step:v4") for o in ops
                       if set(o["launches"]) & first_norm), (w, dt)
            mine = [l for i, l in enumerate(launches) if l.workload == w and l.dtype == dt and i not in first_norm]
            data = {d[1] for l in mine for name, d in l.args.items() if d[0] == "T" and "f32" not in name}
            assert data == {dt}, (w, dt, data)


@interpreting
def test_device_queries_answer_for_the_target_gpu_while_recording():
    """Launch code that sizes grids from the device (split-K reads the SM count) sees an H100 while recording."""
    for name in lr.DEVICE_QUERIES:
        module, attr = name.split(":")
        mod = importlib.import_module(module)
        original = getattr(mod, attr)
        assert callable(original), f"{name} no longer exists: update DEVICE_QUERIES"
        with lr.recording():
            assert getattr(mod, attr)(torch.device("meta")) == lr.TARGET_SMS
        assert getattr(mod, attr) is original


def _toy(x_ptr, y_ptr, n, m: tl.int64, f, flag, n2, n3, z, c: tl.int32, BLOCK: tl.constexpr, MODE: tl.constexpr):
    pass


@pytest.mark.parametrize("offsets", [(0, 0), (1, 4), (8, 3), (16, 2)])
@pytest.mark.parametrize("ints", [(1, 1, 16, 32, 1), (16, 17, 1, 1, 16), (2 ** 31, -16, 0, 2 ** 31 + 1, 7),
                                  (-2 ** 31 - 1, 2 ** 63, 2 ** 40, 48, -1), (0, 5, 2 ** 63 - 1, 33, 2 ** 31 - 1)])
def test_jit_specialization_replica_matches_triton_binder(offsets, ints):
    """Pointers (fp16/fp32 at element offsets), ints (1, multiples of 16, i32/i64/u64 ranges, negatives),
    do_not_specialize / do_not_specialize_on_alignment, annotated params, floats, bools, None, constexprs."""
    fn = JITFunction(_toy, do_not_specialize=["n2"], do_not_specialize_on_alignment=["n3"])
    n, m, n2, n3, c = ints
    args = {"x_ptr": ["T", "fp16", [64], [1], offsets[0], 2, 0], "y_ptr": ["T", "fp32", [64], [1], offsets[1], 4, 1],
            "n": ["i", n], "m": ["i", m], "f": ["f", 0.5], "flag": ["b", True], "n2": ["i", n2], "n3": ["i", n3],
            "z": ["n"], "c": ["i", c], "BLOCK": ["i", 64], "MODE": ["s", "ieee"]}
    for arch in (80, 90):
        assert gate.jit_specialization(fn, args) == gate.jit_reference_specialization(fn, args, {"num_warps": 4}, arch)


@interpreting
def test_recorder_records_every_autotune_config():
    @triton.autotune(configs=[triton.Config({"BLOCK": 32}, num_warps=2), triton.Config({"BLOCK": 128}, num_warps=8,
                                                                                        num_stages=4)], key=["n"])
    @triton.jit
    def kernel(x_ptr, n, BLOCK: tl.constexpr):
        pass

    rec = lr.Recorder()
    with lr.recording(rec):
        x = torch.empty(100, device="meta")
        kernel[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, 100)
    assert [(l.autotune, l.args["BLOCK"], l.options, l.grid) for l in rec.launches] == [
        (0, ["i", 32], {"num_warps": 2, "num_stages": 3, "num_ctas": 1}, [4, 1, 1]),
        (1, ["i", 128], {"num_warps": 8, "num_stages": 4, "num_ctas": 1}, [1, 1, 1])]


def test_compile_gate_builds_every_recorded_launch_for_sm80_and_sm90():
    proc, path = static_report.cached_gate(lr.cached_recording())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "0 failures" in proc.stdout, proc.stdout[-3000:]
    import json
    with open(path) as f:
        result = json.load(f)
    launches, _, _ = lr.load(lr.cached_recording())
    builds = result["builds"]
    # every launch is covered by exactly one build per arch (sm_80: every launch but the odd-shape sweep's)
    for arch in (80, 90):
        covered = sorted(i for b in builds if b["arch"] == arch for i in b["launches"])
        assert covered == [i for i, l in enumerate(launches) if arch in gate.launch_archs(l, (80, 90))]
    assert sum(l.workload.startswith("step:") for l in launches) > 1000
    assert all(gate.launch_archs(l, (80, 90)) == [80, 90] for l in launches if not l.workload.startswith("sweep:"))
    for b, r in zip(builds, result["results"]):
        assert r["shared"] <= gate.SHARED_LIMIT[b["arch"]] and r["registers"] <= 255, b["key"]
        assert b["arch"] != 90 or r["sass"], b["key"]  # SASS read for the rules' target
