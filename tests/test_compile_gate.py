"""Compile gate: every kernel specialization the dispatchers launch builds to cubin for sm_80 and sm_90.

Two halves: (1) under the interpreter, every launch the ops make over a sweep of shapes is recorded and
must be one of the modules' ``compile_specializations()``; (2) a subprocess without TRITON_INTERPRET
compiles all of those for sm_80/sm_90 in fp32/fp16/bf16 and checks shared memory against the chip limit.
"""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import ftkernels
from ftkernels import _compile_gate
from helpers import HAS_CUDA, KERNEL_DEVICE, rand


class _Recorder:
    def __init__(self, fn, name, seen):
        self.fn, self.name, self.seen = fn, name, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            launch_opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            self.seen.add((self.name, tuple(sorted(kwargs.items())), launch_opts.get("num_warps", 4),
                           launch_opts.get("num_stages", 3)))
            return self.fn[grid](*args, **kwargs, **launch_opts)
        return launch


def _sweep():
    f32 = dict(dtype=torch.float32)
    for C_in, C_out, F_in, F_out, pw, dw, bias in [(2, 2, 8, 12, True, False, False), (2, 3, 20, 70, True, True, True),
                                                   (2, 7, 5, 9, True, True, False), (3, 11, 8, 8, True, True, True),
                                                   (3, 20, 40, 8, False, True, False)]:
        x = rand(1, C_in, F_in, 5, **f32)
        m = ftkernels.MultichannelLinear(C_in, C_out, F_in, F_out, positionwise=pw, depthwise=dw, bias=bias,
                                         backend="triton").to(KERNEL_DEVICE)
        m(x).sum().backward()
    for C1, norm, dw2 in [(2, True, False), (3, False, True), (10, True, False), (17, False, False)]:
        x = rand(1, 2, 8, 5, **f32)
        ffn = ftkernels.SquaredReLUFeedForward(2, 8, expansion=3, out_channels=C1, norm=norm, backend="triton")
        if dw2:
            ffn.linear2 = ftkernels.MultichannelLinear(C1, 2, 24, 8, backend="triton")
        ffn.to(KERNEL_DEVICE)(x).sum().backward()
    ftkernels.FrameNorm(2, 9, backend="triton").to(KERNEL_DEVICE)(rand(1, 2, 9, 5, **f32)).sum().backward()
    if hasattr(ftkernels, "multichannel_attention"):
        for F, H, Wk, rotary in [(8, 2, 5, True), (16, 2, 7, False), (32, 4, 3, True), (48, 2, 5, True),
                                 (64, 1, 4, True), (128, 1, 3, True), (40, 8, 6, False)]:
            q, k, v = rand(1, 1, F, 5, **f32), rand(1, 1, F, Wk, **f32), rand(1, 1, F, Wk, **f32)
            ftkernels.multichannel_attention(q, k, v, H, rotary=rotary, backend="triton").sum().backward()


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter records launches; on a GPU the compile gate runs for real")
def test_every_launch_is_a_gated_specialization(monkeypatch):
    gated, seen = set(), set()
    for module_name, s in _compile_gate.collect():
        gated.add((f"{module_name}.{s.kernel_name}", s.constexprs, s.num_warps, s.num_stages))
    for module_name in _compile_gate.OP_MODULES:
        try:
            mod = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
        for attr in dir(mod):
            obj = getattr(mod, attr)
            if attr.endswith("_kernel") and hasattr(obj, "__getitem__"):
                monkeypatch.setattr(mod, attr, _Recorder(obj, f"{module_name}.{attr}", seen))
    _sweep()
    launched = {name.rsplit(".", 1)[-1] for name, *_ in seen}
    assert {"_positionwise_kernel", "_positionwise_mix_kernel", "_channel_mix_kernel", "_weight_grad_kernel",
            "_frame_norm_fwd_kernel", "_frame_norm_bwd_kernel"} <= launched, launched
    missing = sorted(seen - gated, key=str)
    assert not missing, "launched but not in compile_specializations():\n" + "\n".join(map(str, missing))


def test_compile_gate_sm80_sm90_all_dtypes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-m", "ftkernels._compile_gate", "--arch", "80", "90",
                        "--jobs", str(os.cpu_count() or 2)], env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    assert "0 failures" in r.stdout
