"""Record every Triton kernel launch a workload makes, without running anything.

    TRITON_INTERPRET=1 python -m ftkernels._launch_recorder launches.json [--only preset] [--dtypes bf16]

The compile gate (:mod:`ftkernels._compile_gate`) and the static report (:mod:`ftkernels.static_report`)
build exactly what these recordings say runs. How a workload runs here:

* **Meta tensors.** Models and inputs live on the ``meta`` device: shapes, strides, storage offsets and
  dtypes are real, no memory is allocated and no arithmetic runs (the ``default`` preset's training step
  at B 8, W 256 records in about a second in ~0.4 GB).
* **The ops' real launch code.** ``torch.library`` custom ops dispatch meta tensors to their fake
  implementations; a ``TorchDispatchMode`` routes every op of the ``ftkernels`` namespace to the function
  the op was defined with instead (its launch code), below autograd, so forward *and* backward launches are
  the ones the dispatcher makes. The backend is forced to ``"triton"`` (needs ``TRITON_INTERPRET=1``, under
  which ``use_triton`` accepts non-CUDA tensors).
* **Kernels replaced by a recorder.** ``run`` of Triton's ``JITFunction``/``InterpretedFunction`` (and
  ``Autotuner``) is patched for the duration: each launch stores the kernel (module and qualified name of
  its Python function), every bound argument (tensors as dtype/shape/strides/storage offset, scalars by
  value), the launch options (``num_warps``, ``num_stages``, ...) and the grid. An autotuned kernel records
  one launch per config it could pick, so the gate builds every config.
* **bf16/fp16 training steps** emulate ``torch.autocast`` on the meta device (``is_autocast_available`` /
  ``is_autocast_enabled`` / ``get_autocast_dtype`` answer for ``meta``): the ops cast their inputs exactly as
  under CUDA autocast; torch's convolutions (which meta autocast would not touch) cast theirs to the autocast
  dtype as CUDA autocast does.

Pointer alignment: a GPU allocation is at least 256-byte aligned, so a tensor's data pointer is divisible
by 16 exactly when ``storage_offset * itemsize`` is; that is what the recording keeps.

Device queries: launch code that sizes grids from the device (the weight gradients' split-K factor reads
the SM count) cannot ask a meta device. :data:`DEVICE_QUERIES` names those functions; while recording they
answer for the target GPU (an H100 SXM: 132 SMs), so grids and split counts are the ones an H100 launches.
A test checks that every name there still exists.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

OP_NAMESPACES = ("ftkernels",)
TARGET_SMS = 132  # H100 SXM
# "module:function" of launch-code helpers that query the CUDA device, and what they return while recording.
DEVICE_QUERIES = {
    "ftkernels.multichannel_linear:_num_sms": lambda device: TARGET_SMS,
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                   torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                   torch.bool: "u1"}


# ----------------------------------------------------------------------------------------------
# what is recorded


def describe(v) -> list:
    """A JSON-able description of one kernel argument (enough to re-derive the JIT's specialization)."""
    if isinstance(v, torch.Tensor):
        st = v.untyped_storage()
        return ["T", TORCH_TO_TRITON.get(v.dtype, str(v.dtype)), list(v.shape), list(v.stride()),
                int(v.storage_offset()), v.element_size(), st._cdata]
    if isinstance(v, bool):
        return ["b", v]
    if isinstance(v, int):
        return ["i", v]
    if isinstance(v, float):
        return ["f", v]
    if v is None:
        return ["n"]
    if isinstance(v, str):
        return ["s", v]
    if isinstance(v, triton.language.dtype):
        return ["d", v.name]
    if isinstance(v, triton.language.constexpr):
        return describe(v.value)
    raise TypeError(f"cannot record a kernel argument of type {type(v).__name__}: {v!r}")


@dataclasses.dataclass
class Launch:
    kernel: str  # "module:qualname" of the kernel's Python function
    args: Dict[str, list]  # every parameter, bound with defaults, described by describe()
    options: Dict[str, Any]  # num_warps, num_stages, ... (launch keywords that are not parameters)
    grid: List[int]
    workload: str = ""
    dtype: str = ""  # the workload's compute dtype (fp32/fp16/bf16)
    op: str = ""  # the custom op being executed ("ftkernels::frame_norm"), "" outside one
    autotune: Optional[int] = None  # config index for autotuned kernels

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict) -> "Launch":
        return Launch(**d)


@dataclasses.dataclass
class OpCall:
    op: str
    args: Dict[str, Any]
    workload: str
    dtype: str
    launches: List[int]
    torch_ops: List[list] = dataclasses.field(default_factory=list)  # [[aten op, bytes], ...]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _describe_tree(v):
    if isinstance(v, (list, tuple)):
        return [_describe_tree(x) for x in v]
    if isinstance(v, torch.dtype):  # an op's dtype argument (frame_norm's out_dtype)
        return ["dtype", TORCH_TO_TRITON.get(v, str(v))]
    try:
        return describe(v)
    except TypeError:
        return ["?", type(v).__name__]


class Recorder:
    """Holds the launches and op calls of one recording session."""

    def __init__(self):
        self.launches: List[Launch] = []
        self.ops: List[OpCall] = []
        self.fills: List[dict] = []
        self.quiet = 0
        self.workload = ""
        self.dtype = ""
        self._op_stack: List[OpCall] = []

    # called by the patched run methods
    def add(self, fn, args, kwargs, grid, autotune=None):
        py = fn
        while not inspect.isfunction(py):
            py = py.fn
        sig = inspect.signature(py)
        params = {k: v for k, v in kwargs.items() if k in sig.parameters}
        options = {k: v for k, v in kwargs.items() if k not in sig.parameters}
        bound = sig.bind(*args, **params)
        bound.apply_defaults()
        if callable(grid):
            grid = grid(dict(bound.arguments))
        grid = [int(g) for g in tuple(grid) + (1,) * (3 - len(grid))]
        launch = Launch(kernel=f"{py.__module__}:{py.__qualname__}",
                        args={k: describe(v) for k, v in bound.arguments.items()},
                        options={k: v for k, v in options.items() if isinstance(v, (int, float, str, bool))},
                        grid=grid, workload=self.workload, dtype=self.dtype,
                        op=self._op_stack[-1].op if self._op_stack else "", autotune=autotune)
        if self._op_stack:
            self._op_stack[-1].launches.append(len(self.launches))
        self.launches.append(launch)

    @contextlib.contextmanager
    def setup(self):
        """Building models and inputs: their fills (parameter inits) are not the workload's."""
        self.quiet += 1
        try:
            yield
        finally:
            self.quiet -= 1

    def add_torch_op(self, name: str, nbytes: int, fill: bool):
        """A PyTorch kernel: inside a custom op it belongs to that op's cost; outside, only fills are kept
        (autograd materialising zero gradients), the rest is the model's own work."""
        if self._op_stack:
            self._op_stack[-1].torch_ops.append([name, nbytes])
        elif fill and not self.quiet:
            self.fills.append({"op": name, "bytes": nbytes, "workload": self.workload, "dtype": self.dtype})

    def to_json(self) -> dict:
        return {"launches": [l.to_json() for l in self.launches], "ops": [o.to_json() for o in self.ops],
                "fills": self.fills}


_ACTIVE: Optional[Recorder] = None


@contextlib.contextmanager
def setup():
    """Model and input construction inside a workload (not counted as the workload's PyTorch work)."""
    if _ACTIVE is None:
        yield
    else:
        with _ACTIVE.setup():
            yield


@contextlib.contextmanager
def _patched_runs(rec: Recorder):
    """Replace kernel execution by recording (JIT and interpreter kernels, autotuned ones per config)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def leaf_run(self, *args, grid, warmup=False, **kwargs):
        rec.add(self, args, kwargs, grid)

    def autotuner_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        configs = self.configs
        for i, cfg in enumerate(configs):
            kw = dict(kwargs, **cfg.all_kwargs())
            inner = self.fn
            # Heuristics between the autotuner and the kernel fill in their values first
            while not isinstance(inner, (JITFunction, InterpretedFunction)):
                if hasattr(inner, "values"):
                    names = list(inspect.signature(_python_fn(inner)).parameters)
                    for k, h in inner.values.items():
                        kw[k] = h({**dict(zip(names, args)), **kw})
                inner = inner.fn
            rec.add(inner, args, kw, grid, autotune=i if len(configs) > 1 else None)

    saved = [(JITFunction, "run", JITFunction.run), (InterpretedFunction, "run", InterpretedFunction.run),
             (Autotuner, "run", Autotuner.run)]
    JITFunction.run = leaf_run
    InterpretedFunction.run = leaf_run
    Autotuner.run = autotuner_run
    try:
        yield rec
    finally:
        for cls, name, fn in saved:
            setattr(cls, name, fn)


def _python_fn(k):
    while not inspect.isfunction(k):
        k = k.fn
    return k


_NO_KERNEL = {"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach", "alias",
              "lift_fresh", "set_", "resize_", "_local_scalar_dense"}
_FILLS = {"zeros", "zeros_like", "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like", "new_full",
          "zero_", "fill_", "scalar_tensor"}


def _tensor_bytes(v) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (list, tuple)):
        return sum(_tensor_bytes(x) for x in v)
    return 0


class _RealImplMode(TorchDispatchMode):
    """Run custom ops of OP_NAMESPACES with the function they were defined with (their launch code), not
    their fake: meta tensors would otherwise take the fake and launch nothing. Also counts the PyTorch
    kernels (not views) that run inside those ops, and the fills outside them."""

    def __init__(self, rec: Recorder):
        super().__init__()
        self.rec = rec

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.split("::")[0] in OP_NAMESPACES:
            from torch._library.custom_ops import OPDEFS
            opdef = OPDEFS.get(name)
            if opdef is not None:
                names = [a.name for a in func._schema.arguments]
                call = OpCall(op=name, args={n: _describe_tree(v) for n, v in zip(names, args)} |
                              {n: _describe_tree(v) for n, v in kwargs.items()},
                              workload=self.rec.workload, dtype=self.rec.dtype, launches=[])
                self.rec.ops.append(call)
                self.rec._op_stack.append(call)
                try:
                    with self:  # see the PyTorch ops the launch code runs
                        return opdef._init_fn(*args, **kwargs)
                finally:
                    self.rec._op_stack.pop()
        out = func(*args, **kwargs)
        base = func._schema.name.split("::")[-1]
        if not func.is_view and base not in _NO_KERNEL:
            nbytes = _tensor_bytes(out) if base in _FILLS else _tensor_bytes(out) + _tensor_bytes(args)
            self.rec.add_torch_op(base, nbytes, fill=base in _FILLS)
        return out


@contextlib.contextmanager
def _meta_autocast(dtype: Optional[torch.dtype]):
    """torch.autocast for the meta device, as the ops see it: is_autocast_available('meta') (and the ops' own
    set of autocast device types) / is_autocast_enabled('meta') / get_autocast_dtype."""
    enabled, get_dtype, available = torch.is_autocast_enabled, torch.get_autocast_dtype, torch.amp.is_autocast_available

    def is_available(device_type):
        return device_type == "meta" or available(device_type)

    def is_enabled(device_type=None):
        if device_type == "meta":
            return dtype is not None
        return enabled(device_type) if device_type is not None else enabled()

    def autocast_dtype(device_type):
        if device_type == "meta":
            return dtype if dtype is not None else torch.float32
        return get_dtype(device_type)

    # torch's own autocast has no meta dispatch key: convolutions (the v4 blocks' cuDNN convs) cast their
    # floating inputs to the autocast dtype here, as CUDA autocast's lower-precision list does
    convs = {name: getattr(torch.nn.functional, name) for name in ("conv1d", "conv2d", "conv3d")}

    def autocast_conv(conv):
        def run(input, weight, bias=None, *args, **kwargs):
            if dtype is not None and input.device.type == "meta":
                input, weight = input.to(dtype), weight.to(dtype)
                bias = bias.to(dtype) if bias is not None else None
            return conv(input, weight, bias, *args, **kwargs)
        return run

    from ftkernels import _common
    device_types = _common._AUTOCAST_DEVICE_TYPES
    torch.is_autocast_enabled, torch.get_autocast_dtype = is_enabled, autocast_dtype
    torch.amp.is_autocast_available = is_available
    _common._AUTOCAST_DEVICE_TYPES = device_types | {"meta"}
    for name, conv in convs.items():
        setattr(torch.nn.functional, name, autocast_conv(conv))
    try:
        yield
    finally:
        torch.is_autocast_enabled, torch.get_autocast_dtype = enabled, get_dtype
        torch.amp.is_autocast_available = available
        _common._AUTOCAST_DEVICE_TYPES = device_types
        for name, conv in convs.items():
            setattr(torch.nn.functional, name, conv)


@contextlib.contextmanager
def _device_queries():
    saved = []
    for name, fake in DEVICE_QUERIES.items():
        module, attr = name.split(":")
        mod = importlib.import_module(module)
        saved.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, fake)
    try:
        yield
    finally:
        for mod, attr, fn in saved:
            setattr(mod, attr, fn)


@contextlib.contextmanager
def recording(rec: Optional[Recorder] = None) -> Iterator[Recorder]:
    """Record (never run) every kernel launch inside; custom ops run their launch code on meta tensors."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("record launches with TRITON_INTERPRET=1 (the ops accept meta tensors only then)")
    import ftkernels
    global _ACTIVE
    rec = rec or Recorder()
    old = ftkernels.get_backend()
    ftkernels.set_backend("triton")
    _ACTIVE = rec
    try:
        with _patched_runs(rec), _device_queries(), _meta_autocast(None), _RealImplMode(rec):
            yield rec
    finally:
        _ACTIVE = None
        ftkernels.set_backend(old)


@contextlib.contextmanager
def workload(rec: Recorder, label: str, dtype: str):
    rec.workload, rec.dtype = label, dtype
    try:
        yield
    finally:
        rec.workload = rec.dtype = ""


# ----------------------------------------------------------------------------------------------
# workloads


# Training steps recorded: (label, preset in frame_transformer.model.PRESETS, overrides, batch, frames).
# Adding a preset is one line. ("micro", the interpreter-test preset, is left out: the odd-shape sweep
# covers tiny shapes.)
MODEL_STEPS = [
    ("tiny", "tiny", {}, 8, 256),
    ("default", "default", {}, 8, 256),
    ("channels32", "default", {"channels": 32}, 8, 256),
    ("v4", "v4", {}, 8, 256),
]


def model_steps() -> List[Tuple[str, str, dict, int, int]]:
    return list(MODEL_STEPS)


def run_model_step(preset: str, overrides: dict, batch: int, frames: int, dtype: str,
                   train: bool = True) -> Optional[str]:
    """One training step (forward under autocast as train.py, L1 loss on mask * mix, backward) on meta tensors;
    fp32 runs without autocast. ``train=False``: one inference forward under no_grad. Returns a reason when
    the preset does not exist (yet) in frame_transformer.model.PRESETS."""
    from frame_transformer import model as M
    if preset not in M.PRESETS:
        return f"no preset {preset!r} in frame_transformer.model.PRESETS"
    with setup(), torch.device("meta"):
        model = M.FrameTransformer(M.preset(preset, dropout=0.0, **overrides), backend="triton")
        x = torch.empty(batch, model.config.in_channels, model.output_bin, frames)
        y = torch.empty_like(x)
    amp = DTYPES[dtype] if dtype != "fp32" else None
    model.train(train)
    if train:
        with _meta_autocast(amp):
            mask = model(x)
        loss = torch.nn.functional.l1_loss(x * mask.float(), y)
        loss.backward()
    else:
        with torch.no_grad(), _meta_autocast(amp):
            model(x)
    return None


def _benchmark_modules():
    for name in ("test_bench_multichannel_linear", "test_bench_frame_norm", "test_bench_squared_relu_ffn",
                 "test_bench_multichannel_attention"):
        try:
            yield importlib.import_module(f"benchmarks.{name}")
        except ImportError:
            continue


def benchmark_cases() -> List[Tuple[Any, str, tuple]]:
    """(module, mode, dims) of every ftkernels case the benchmark suite runs on a GPU: the full run's GPU sizes
    (forward and forward+backward) and the smoke sizes."""
    out = []
    for mod in _benchmark_modules():
        for mode, sizes in (("fwd", mod.GPU), ("fwd+bwd", mod.GPU_BWD), ("fwd", mod.SMOKE), ("fwd+bwd", mod.SMOKE)):
            out += [(mod, mode, tuple(d)) for d in sizes]
    return out


def run_benchmark_case(mod, mode: str, dims: tuple, dtype: str) -> Optional[str]:
    """The ``ftkernels`` provider of a benchmark module on meta inputs; returns a reason when the benchmark
    itself would skip the case on a GPU (``Unsupported``)."""
    from benchmarks import bench_utils
    has_cuda = bench_utils.HAS_CUDA
    bench_utils.HAS_CUDA = True  # make_provider's GPU decisions (e.g. head-dim limits)
    try:
        problem = mod.problem(dims, "meta", DTYPES[dtype])
        try:
            fn = mod.make_provider("ftkernels", dims, True)
        except bench_utils.Unsupported as e:
            return str(e)
        with setup(), torch.device("meta"):
            inputs = problem.make_inputs(0)
        if mode == "fwd":
            fn(*inputs)
            return None
        inputs = [t.detach().requires_grad_(i in problem.grad_argnums) if isinstance(t, torch.Tensor) else t
                  for i, t in enumerate(inputs)]
        out = fn(*inputs)
        out.backward(torch.empty_like(out))
        return None
    finally:
        bench_utils.HAS_CUDA = has_cuda


def model_benchmark_cases() -> List[Tuple[str, str, int, int, bool]]:
    """The whole-model benchmark on CUDA (benchmarks/test_bench_model.py): a training step and a song's inference."""
    try:
        from benchmarks import test_bench_model as tbm
    except ImportError:
        return []
    frames = int(tbm.SONG_S * tbm.SR) // tbm.HOP + 1
    n_crops = -(-frames // tbm.CROP)
    return [c for p in tbm.model_presets()
            for c in ((f"model-train:{p}", p, 4, tbm.CROP, True),
                      (f"model-inference:{p}", p, n_crops, tbm.CROP, False))]


def odd_shape_sweep(dtype: str) -> None:
    """Unusual shapes (the old gate's sweep, trimmed to one case per layer flavour): sizes that are not
    multiples of 16 (so strides lose their divisibility), a single frame, non-contiguous inputs, every
    multichannel-linear path (fused C_out <= 8, two-pass, depth-wise only, biases; position-wise only runs in
    the feed-forward's linear2), both feed-forward paths, attention at head dims 4, 8 and 128 with and
    without rotary and Wk != Wq, from a stored rotary table at head dim 15, and (fp32) with TF32 allowed."""
    import ftkernels
    dt = DTYPES[dtype]

    def rnd(*shape, noncontig=False):
        if noncontig:
            t = torch.empty(*shape[:-2], shape[-1], shape[-2], dtype=dt).transpose(-1, -2)
        else:
            t = torch.empty(*shape, dtype=dt)
        return t.requires_grad_()

    with torch.device("meta"):
        for C_in, C_out, F_in, F_out, W, pw, dw, bias, nc in [(2, 3, 20, 70, 1, True, True, True, True),
                                                               (3, 11, 8, 8, 7, True, True, True, False),
                                                               (3, 20, 40, 8, 5, False, True, False, True)]:
            m = ftkernels.MultichannelLinear(C_in, C_out, F_in, F_out, positionwise=pw, depthwise=dw, bias=bias)
            m.to(dt)(rnd(1, C_in, F_in, W, noncontig=nc)).sum().backward()
        for C1, norm in [(3, True), (17, False)]:
            ffn = ftkernels.SquaredReLUFeedForward(2, 8, expansion=3, out_channels=C1, norm=norm)
            ffn.to(dt)(rnd(1, 2, 8, 5)).sum().backward()
        ftkernels.FrameNorm(2, 9).to(dt)(rnd(1, 2, 9, 5, noncontig=True)).sum().backward()
        for F, H, Wq, Wk, rotary in [(8, 2, 5, 7, True), (40, 5, 5, 6, False), (256, 2, 33, 17, True)]:
            q, k, v = rnd(1, 1, F, Wq), rnd(1, 1, F, Wk), rnd(1, 1, F, Wk, noncontig=True)
            ftkernels.multichannel_attention(q, k, v, H, rotary=rotary).sum().backward()
        # attention from a stored rotary table, odd head dim (15: 7 pairs); in fp32 also with TF32 allowed
        q, k, v = rnd(1, 1, 30, 9), rnd(1, 1, 30, 9), rnd(1, 1, 30, 9)
        freqs = torch.empty(7, dtype=torch.float32)
        ftkernels.multichannel_attention(q, k, v, 2, rotary_freqs=freqs).sum().backward()
        if dt == torch.float32:
            tf32 = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                for F in (64, 256):
                    q, k, v = rnd(1, 1, F, 33), rnd(1, 1, F, 17), rnd(1, 1, F, 17)
                    ftkernels.multichannel_attention(q, k, v, 2).sum().backward()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = tf32


@dataclasses.dataclass
class Workload:
    label: str
    run: Callable[[str], Optional[str]]  # dtype -> None, or a reason it does not apply
    kind: str  # "step" | "benchmark" | "sweep"
    dtypes: Tuple[str, ...] = tuple(DTYPES)  # the dtypes it runs in


def benchmark_dtype() -> str:
    """The dtype the benchmark suite runs in on a GPU: bf16, or FTBENCH_DTYPE."""
    return os.environ.get("FTBENCH_DTYPE") or "bf16"


def workloads() -> List[Workload]:
    out = []
    for label, preset, overrides, batch, frames in model_steps():
        out.append(Workload(f"step:{label}:B{batch}xW{frames}",
                            lambda dt, p=preset, o=overrides, b=batch, w=frames: run_model_step(p, o, b, w, dt),
                            "step"))
    bench = (benchmark_dtype(),)
    for label, preset, batch, frames, train in model_benchmark_cases():
        out.append(Workload(f"bench:{label}:B{batch}xW{frames}",
                            lambda dt, p=preset, b=batch, w=frames, t=train: run_model_step(p, {}, b, w, dt, t),
                            "benchmark", bench))
    for mod, mode, dims in benchmark_cases():
        op = mod.OP
        out.append(Workload(f"bench:{op}:{mode}:{mod.size_label(*dims).replace(' ', '_')}",
                            lambda dt, m=mod, md=mode, d=dims: run_benchmark_case(m, md, d, dt), "benchmark", bench))
    # fp16 takes the same code paths as bf16 but for the MMA operand type; the model steps gate fp16
    out.append(Workload("sweep:odd-shapes", lambda dt: odd_shape_sweep(dt), "sweep", ("fp32", "bf16")))
    return out


def record(selected: Optional[Sequence[str]] = None, dtypes: Sequence[str] = ("fp32", "fp16", "bf16"),
           verbose: bool = False) -> Tuple[Recorder, Dict[str, str]]:
    """Record every workload (or those whose label contains one of ``selected``) in every dtype.
    Returns the recorder and {workload/dtype: reason} for cases the benchmarks themselves skip on a GPU."""
    skipped = {}
    with recording() as rec:
        for w in workloads():
            if selected and not any(s in w.label for s in selected):
                continue
            for dt in dtypes:
                if dt not in w.dtypes:
                    continue
                t0 = time.perf_counter()
                n0 = len(rec.launches)
                with workload(rec, w.label, dt):
                    reason = w.run(dt)
                if reason:
                    skipped[f"{w.label}/{dt}"] = reason
                if verbose:
                    print(f"{w.label} {dt}: {len(rec.launches) - n0} launches, {time.perf_counter() - t0:.2f} s",
                          file=sys.stderr)
    return rec, skipped


def save(rec: Recorder, skipped: Dict[str, str], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**rec.to_json(), "skipped": skipped}, f)
    os.replace(tmp, path)


def load(path: str) -> Tuple[List[Launch], List[dict], Dict[str, str]]:
    """(launches, op calls, skipped workloads) of a recording."""
    d = load_raw(path)
    return [Launch.from_json(x) for x in d["launches"]], d["ops"], d.get("skipped", {})


def load_raw(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


_CACHED: Dict[tuple, str] = {}


def cached_recording(only: Optional[Sequence[str]] = None, dtypes: Sequence[str] = ("fp32", "fp16", "bf16")) -> str:
    """Path of a recording of these workloads, made once per process (the test suite shares it); in this process
    under TRITON_INTERPRET=1, else in a subprocess with it."""
    key = (tuple(only or ()), tuple(dtypes))
    if key not in _CACHED:
        import atexit
        import shutil
        d = tempfile.mkdtemp(prefix="ftkernels-launches-")
        atexit.register(shutil.rmtree, d, True)
        path = os.path.join(d, "launches.json")
        if os.environ.get("TRITON_INTERPRET") == "1":
            rec, skipped = record(only, dtypes)
            save(rec, skipped, path)
        else:
            from ftkernels._compile_gate import record_launches
            record_launches(path, only, dtypes)
        _CACHED[key] = path
    return _CACHED[key]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Record the Triton launches of the model steps, the benchmark cases "
                                             "and an odd-shape sweep (meta tensors; nothing runs).")
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--only", nargs="*", help="record only workloads whose label contains one of these")
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "fp16", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    rec, skipped = record(a.only, a.dtypes, a.verbose)
    save(rec, skipped, a.out)
    print(f"recorded {len(rec.launches)} launches in {len(rec.ops)} op calls -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
