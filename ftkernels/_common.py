"""Shared plumbing for the ops: backend choice, input validation, autocast, launch helpers.

Backends
--------
``"triton"``     the Triton kernels (CUDA tensors; CPU tensors too when ``TRITON_INTERPRET=1``).
``"reference"``  the plain-PyTorch reference (any device; the oracle in tests).
``"auto"``       (default) Triton for CUDA tensors, the reference otherwise.

The default comes from the ``FTKERNELS_BACKEND`` environment variable (case-insensitive; unset or empty
means ``"auto"``) and can be changed with :func:`set_backend`; every functional op and module also takes
``backend=`` to override it. Meta tensors work on every backend (the Triton path runs the ops' fake kernels).
"""
from __future__ import annotations

import contextlib
import math
import numbers
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

BACKENDS = ("auto", "triton", "reference")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_backend(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def check_backend_arg(name: Optional[str]) -> Optional[str]:
    """A module's ``backend``: None (the process default) or one of BACKENDS."""
    return None if name is None else _check_backend(name)


def _backend_from_env() -> str:
    raw = os.environ.get("FTKERNELS_BACKEND", "")
    name = raw.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"FTKERNELS_BACKEND must be one of {BACKENDS} (or unset/empty for 'auto'), got {raw!r}")
    return name


_default_backend = _backend_from_env()


def set_backend(name: str) -> None:
    """Set the process-wide default backend (``"auto"``, ``"triton"`` or ``"reference"``)."""
    global _default_backend
    _default_backend = _check_backend(name)


def get_backend() -> str:
    return _default_backend


def functorch_autograd_active() -> bool:
    """Whether a torch.func autograd transform (grad, vjp, jacrev, jacfwd, jvp, hessian) is running.

    torch 2.13's custom-op autograd registration builds an ``autograd.Function`` without the
    ``setup_context`` staticmethod that these transforms need, so the ops' Triton path cannot run under
    one (``vmap`` alone works: PyTorch loops the kernels over the batch). Not checked while torch.compile
    traces (dynamo handles transforms itself).
    """
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


def _kernel_device(x: torch.Tensor) -> bool:
    """Where backend="auto" runs the kernels: CUDA tensors in fp32/fp16/bf16."""
    return x.is_cuda and x.dtype != torch.float64


def use_triton(x: torch.Tensor, backend: Optional[str], op: str = "op") -> bool:
    """Whether the op ``op`` called on ``x`` with ``backend`` runs the Triton kernels."""
    name = _check_backend(backend) if backend is not None else _default_backend
    if name == "reference":
        return False
    if name == "triton":
        if functorch_autograd_active():
            raise RuntimeError(
                f"ftkernels.{op}: torch.func autograd transforms (grad, vjp, jacrev, jacfwd, jvp, hessian) cannot "
                "run the Triton kernels: torch 2.13's custom-op autograd registration does not support them. "
                "Use backend='reference' (plain PyTorch, supports every torch.func transform; backend='auto' "
                "takes it automatically under a transform) or torch.autograd.grad for gradients through the "
                "kernels.")
        if not (x.is_cuda or x.is_meta or INTERPRET):
            raise RuntimeError(
                f"ftkernels.{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                f"interpreter); got a tensor on {x.device}. Use backend='auto' or 'reference' on CPU."
            )
        return True
    # auto: the kernels cover fp32/fp16/bf16 on CUDA, outside torch.func autograd transforms
    return _kernel_device(x) and not functorch_autograd_active()


# ----------------------------------------------------------------------------------------------
# validation: every message names the argument and what was expected


def check_tensor(t, name: str, ndim: int, dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {dims}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {dims} ({ndim} dims), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {t.dtype}")


def check_shape(t: Optional[torch.Tensor], name: str, expected: Sequence[int], dims: str) -> None:
    if t is None:
        return
    check_tensor(t, name, len(expected), dims)
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {dims} = {tuple(expected)}, got {tuple(t.shape)}")


def check_same(x: torch.Tensor, named: dict) -> None:
    """All given tensors share x's device and dtype."""
    for name, t in named.items():
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must share a device")
        if t.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {t.dtype} but x has {x.dtype}; all inputs must share a dtype "
                "(use autocast or .to() to mix precisions)"
            )


def check_nonempty(x: torch.Tensor, name: str, dims: str) -> None:
    if x.numel() == 0:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)} for {dims}")


def _autocast_device_types() -> frozenset:
    names = ["cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia", "ipu"]
    try:
        names.append(torch._C._get_privateuse1_backend_name())
    except AttributeError:  # pragma: no cover
        pass
    ok = set()
    for name in names:
        try:
            if torch.amp.is_autocast_available(name):
                ok.add(name)
        except (RuntimeError, ValueError):  # pragma: no cover - a name this torch does not know
            pass
    return frozenset(ok)


# Decided once at import: dynamo (torch 2.11) cannot trace torch.amp.is_autocast_available, so calling it in an
# op's wrapper broke torch.compile(fullgraph=True); a set lookup traces as a constant.
_AUTOCAST_DEVICE_TYPES = _autocast_device_types()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype if autocast is enabled for ``device_type`` (None on devices without autocast,
    such as meta)."""
    if device_type not in _AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_inputs(*tensors):
    """Under autocast, cast inputs as torch.matmul does: floating tensors on the autocast device except
    float64 (autocast leaves float64 alone) to the autocast dtype."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            dev = t.device.type
            break
    else:
        return tensors
    dtype = autocast_dtype(dev)
    if dtype is None:
        return tensors

    def cast(t):
        eligible = (isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                    and t.device.type == dev)
        return t.to(dtype) if eligible else t
    return tuple(cast(t) for t in tensors)


def check_eps(eps) -> float:
    """eps: a positive finite real number (Python or NumPy scalar; not a bool or a tensor)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    return float(eps)


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class BackendAttribute:
    """Mixin for the op modules: ``backend`` (None = the process default, or one of BACKENDS), validated when
    set (in the constructor, by FrameTransformer.set_backend, or by hand), not at the first forward."""

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, name: Optional[str]) -> None:
        self._backend = check_backend_arg(name)


# ----------------------------------------------------------------------------------------------
# kernel-side helpers


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernel statistics/partials: fp32, or fp64 when the interpreter runs the float64 oracle."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for inputs of ``dtype``: fp32 follows torch's TF32 setting for CUDA matmuls
    (``"tf32"`` after ``torch.set_float32_matmul_precision("high")`` or ``torch.backends.cuda.matmul.allow_tf32 =
    True``, ``"ieee"`` otherwise, torch's default), as ``torch.matmul`` does; fp16/bf16/float64 use ``"ieee"``
    (a no-op for half types, exact for the float64 interpreter oracle). Read at launch time, not at import."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def kernel_dtype_ok(x: torch.Tensor, name: str = "x") -> None:
    """float64 runs in the interpreter (the test oracle) but is not a GPU specialization."""
    if x.dtype == torch.float64 and x.is_cuda:
        raise TypeError(f"{name}: the Triton kernels take fp32/fp16/bf16 on CUDA, got float64; use backend='reference'")


# ----------------------------------------------------------------------------------------------
# autotuning


def dtype_group(dtype: torch.dtype) -> str:
    """The config group of a compute dtype: "16" (fp16/bf16 operands) or "32" (fp32; float64 in the interpreter)."""
    return "16" if dtype in (torch.float16, torch.bfloat16) else "32"


class Autotuners:
    """One ``triton.autotune`` per key of ``configs`` (``(kernel, *class)`` -> its config list), each bound as a
    module attribute ``prefix + "_".join(key)`` of ``namespace`` (``benchmarks.gpu_check`` finds autotuners at
    module level). Under the interpreter every variant of a kernel runs that kernel's one
    ``interpreter_configs`` entry; :meth:`forced` makes them run a given config instead (the tests push every GPU
    config through the interpreter this way). ``keys``: the tuning-key argument names, per kernel or shared."""

    def __init__(self, configs: Mapping[tuple, list], interpreter_configs: Mapping[str, object],
                 kernels: Mapping[str, object], keys: Union[List[str], Mapping[str, List[str]]],
                 namespace: dict, prefix: str):
        import triton
        self._forced: Dict[str, object] = {}
        self._interpreter_configs = interpreter_configs
        self.tuners: Dict[tuple, object] = {}
        for key, cfgs in configs.items():
            kernel = key[0]
            tuning_key = keys[kernel] if isinstance(keys, Mapping) else keys
            tuner = triton.autotune(cfgs, key=tuning_key,
                                    prune_configs_by={"early_config_prune": self._prune(kernel)})(kernels[kernel])
            self.tuners[key] = namespace[prefix + "_".join(key)] = tuner

    def _prune(self, kernel: str):
        def prune(configs, named_args, **kwargs):
            if kernel in self._forced:
                return [self._forced[kernel]]
            return [self._interpreter_configs[kernel]] if INTERPRET else configs
        return prune

    def __getitem__(self, key: Tuple[str, ...]):
        return self.tuners[key]

    @contextlib.contextmanager
    def forced(self, kernel: str, config):
        """Run every variant of ``kernel`` with ``config``, whatever its autotuner would pick."""
        tuners = [t for key, t in self.tuners.items() if key[0] == kernel]
        self._forced[kernel] = config
        for t in tuners:
            t.cache.clear()
        try:
            yield
        finally:
            del self._forced[kernel]
            for t in tuners:
                t.cache.clear()
