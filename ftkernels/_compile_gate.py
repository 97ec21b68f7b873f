"""Compile gate: build every kernel launch that runs, as Triton's JIT would specialize it, to real cubin.

    python -m ftkernels._compile_gate [--arch 80 90] [--jobs N] [--launches launches.json] [--json out.json]

1. **What runs.** :mod:`ftkernels._launch_recorder` records every launch (meta tensors, nothing executes) of
   the model presets' training steps in fp32, fp16 and bf16 (every dtype the dispatcher takes), of the
   benchmark cases in the dtype the benchmarks run in (bf16, or ``FTBENCH_DTYPE``), and of an odd-shape
   sweep in fp32 and bf16. Without ``--launches`` that recording is made here, in a subprocess with
   ``TRITON_INTERPRET=1``. Launches are deduplicated by runtime specialization before building.
2. **As the JIT specializes it.** :func:`jit_specialization` re-derives, from the recorded arguments, the
   ``(signature, constexprs, attrs)`` that ``JITFunction.run`` passes to ``ASTSource`` in triton 3.9
   (``runtime/jit.py`` ``create_function_from_signature`` + ``_pack_args``, C++ ``specialize_impl``):

   * constexpr parameters: their value;
   * ints: ``== 1`` becomes the constexpr 1 (unless ``do_not_specialize``); else ``i32`` / ``i64`` / ``u64``
     by range, with ``tt.divisibility = 16`` when divisible by 16 (unless ``do_not_specialize`` or
     ``do_not_specialize_on_alignment``);
   * tensors: ``*<dtype>`` (``*k<dtype>`` for ``const`` annotations), divisibility 16 when the data pointer
     is (storage offset x itemsize, GPU allocations being 256-byte aligned);
   * floats ``fp32``, bools ``u1``, ``None`` the constexpr None, no attributes; annotated parameters take
     the annotation's type (floats/bools annotated are not specialized);
   * ``attrs`` lists every non-float position (constexprs included) with ``parse_attr`` of its key.

   Every unique specialization is checked against Triton's own binder on the same arguments
   (:func:`jit_reference_specialization`): a mismatch fails the gate, so the replica cannot drift.
3. **Built and checked.** Each unique (kernel, specialization, launch options) compiles for sm_80 and sm_90
   (``triton.compile`` of an ``ASTSource`` for a ``GPUTarget``: no GPU needed; must run WITHOUT
   ``TRITON_INTERPRET``); shared memory is checked against each chip's per-block limit. Each build's
   ``ptxas -v`` report (registers, spills), SASS instruction counts (``cuobjdump -sass``) and tensor-core
   dot count (TTGIR) are returned for :mod:`ftkernels.static_report`, and cached next to Triton's cache.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, List, Optional, Sequence, Tuple

# Shared memory per block (opt-in maximum), bytes: A100 (sm_80) 163 KB, H100 (sm_90) 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
ALIGN = 16  # the JIT's divisibility specialization
ANALYSIS_VERSION = 2  # bump when build() records something new: cached analyses of older versions are redone


# ----------------------------------------------------------------------------------------------
# recorded arguments -> Python values


def arg_value(d: list):
    """The Python value of a recorded scalar/constexpr argument (see _launch_recorder.describe)."""
    kind = d[0]
    if kind in ("i", "f", "b", "s"):
        return d[1]
    if kind == "n":
        return None
    if kind == "d":
        import triton.language as tl
        return tl.dtype(d[1])
    raise TypeError(f"not a scalar argument: {d!r}")


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64,
            "i32": torch.int32, "i64": torch.int64, "i16": torch.int16, "i8": torch.int8, "u8": torch.uint8,
            "u1": torch.bool}[name]


class _Pointer:
    """What the JIT's binder reads from a tensor argument: its dtype and data pointer."""

    def __init__(self, d: list, base: int = 1 << 20):
        self.dtype = _torch_dtype(d[1])
        self._ptr = base + d[4] * d[5]

    def data_ptr(self) -> int:
        return self._ptr


def _pointer_aligned(d: list) -> bool:
    return (d[4] * d[5]) % ALIGN == 0


def _int_type(v: int) -> str:
    if -2 ** 31 <= v < 2 ** 31:
        return "i32"
    if -2 ** 63 <= v < 2 ** 63:
        return "i64"
    if 0 <= v < 2 ** 64:
        return "u64"
    raise ValueError(f"integer argument {v} does not fit in 64 bits")


def _specialize(d: list, is_const: bool, specialize: bool, align: bool) -> Tuple[Any, Any]:
    """(type, specialization key) as triton 3.9's native specialize_impl returns them."""
    kind = d[0]
    if kind == "T":
        ty = ("*k" if is_const else "*") + d[1]
        if not specialize:
            return ty, None
        return ty, ("D" if align and _pointer_aligned(d) else "")
    if kind == "b":
        return "u1", None
    if kind == "i":
        v = d[1]
        if specialize and v == 1:
            return "constexpr", 1
        ty = _int_type(v)
        if not specialize:
            return ty, None
        return ty, ("D" if align and v % ALIGN == 0 else "")
    if kind == "f":
        return "fp32", None
    if kind == "n":
        return "constexpr", None
    raise TypeError(f"the JIT cannot specialize a non-constexpr argument {d!r}")


def jit_specialization(fn, args: Dict[str, list]) -> Tuple[Dict[str, str], Dict[tuple, Any], Dict[tuple, list]]:
    """(signature, constexprs, attrs) that ``JITFunction.run`` hands to ``ASTSource`` for these arguments."""
    from triton.backends.compiler import BaseBackend
    signature, constexprs, attrs = {}, {}, {}
    for i, kp in enumerate(fn.params):
        d = args[kp.name]
        if kp.is_constexpr:
            ty, key = "constexpr", arg_value(d)
        else:
            ty, key = _specialize(d, kp.is_const, not kp.do_not_specialize, not kp.do_not_specialize_on_alignment)
            ann = kp.annotation_type
            if ann:
                if ann == "u1" or ann[:2] in ("fp", "bf"):
                    ty, key = ann, None
                else:
                    ty = ann
        signature[kp.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = arg_value(d) if d[0] != "T" else None
            key = ""
        if isinstance(key, str):
            attrs[(i,)] = BaseBackend.parse_attr(key)
    return signature, constexprs, attrs


def _jit_kwargs(fn, options: Dict[str, Any]) -> Dict[str, Any]:
    """The launch keywords as ``JITFunction.run`` completes them before binding."""
    from triton import knobs
    kw = dict(options)
    kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
    kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kw["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return kw


def jit_reference_specialization(fn, args: Dict[str, list], options: Dict[str, Any], arch: int = 90):
    """The same triple computed by Triton's own binder (``create_function_from_signature`` + ``_pack_args``)
    on stand-ins that carry each tensor's dtype and data-pointer alignment."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    values = [(_Pointer(d) if d[0] == "T" else arg_value(d)) for d in (args[kp.name] for kp in fn.params)]
    kw = _jit_kwargs(fn, options)
    bound, specialization, opts = binder(*values, **kw)
    _, signature, constexprs, attrs = fn._pack_args(backend, kw, bound, specialization, opts)
    return signature, constexprs, attrs


def resolve_kernel(qualified: str):
    """'module:qualname' -> the JITFunction (unwrapping autotune/heuristics decorators)."""
    from triton.runtime.jit import JITFunction
    module, qualname = qualified.split(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    while not isinstance(obj, JITFunction):
        if not hasattr(obj, "fn"):
            raise TypeError(f"{qualified} is not a Triton kernel (got {type(obj).__name__}); "
                            "run the gate without TRITON_INTERPRET=1")
        obj = obj.fn
    return obj


# ----------------------------------------------------------------------------------------------
# unique builds


def _encode(v):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)  # tl.dtype


@dataclasses.dataclass
class Build:
    """One unique (kernel, runtime specialization, launch options, arch)."""
    kernel: str
    signature: Dict[str, str]
    constexprs: List[list]  # [[index, value], ...]
    attrs: List[list]  # [[index, parse_attr list], ...]
    options: Dict[str, Any]
    arch: int
    dtype: str = ""  # the element type of the first pointer argument (the kernel's data dtype)
    sass: bool = True  # also disassemble the cubin (the static report's instruction counts)
    declared: List[int] = dataclasses.field(default_factory=list)  # indices of the kernel's constexpr parameters
    key: str = ""
    launches: List[int] = dataclasses.field(default_factory=list)

    def meta(self) -> Dict[str, Any]:
        """The kernel's constexpr parameters (tiles, flags) by name."""
        return {self._param(i): v for i, v in self.constexprs if i in self.declared}

    def label(self) -> str:
        """kernel[dtype; constexprs; options; how many runtime args are divisible by 16; ints specialized to 1]."""
        name = self.kernel.split(":")[-1]
        cx = ",".join(f"{k}={v}" for k, v in self.meta().items())
        div = sum(1 for _, a in self.attrs if a)
        n_args = sum(1 for t in self.signature.values() if t != "constexpr")
        ones = [self._param(i) for i, v in self.constexprs if i not in self.declared]
        opt = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{name}[{self.dtype}; {cx}; {opt}; div16={div}/{n_args}{'; ==1: ' + ','.join(ones) if ones else ''}]"

    def _param(self, i: int) -> str:
        return list(self.signature)[i]


def _dtype_of(signature: Dict[str, str]) -> str:
    for ty in signature.values():
        if ty.startswith("*"):
            return ty.lstrip("*k")
    return ""


# The odd-shape sweep (strides that lose their divisibility by 16, single frames, views) is built for sm_90 only:
# it is there for the rules (spills, wgmma on the report's target) and for compile errors of the variants the JIT
# makes for odd user shapes; sm_80 builds every training step and benchmark launch. This keeps the CPU test
# suite's cold-cache gate about a minute shorter (the sweep's sm_80 builds were 12% of its CPU time).
SWEEP_ARCHS = (90,)


def launch_archs(launch, archs: Sequence[int]) -> List[int]:
    """The archs a recorded launch is built for: every one, but the sweep's only SWEEP_ARCHS."""
    if launch.workload.startswith("sweep:"):
        return [a for a in archs if a in SWEEP_ARCHS]
    return list(archs)


def unique_builds(launches, archs: Sequence[int] = ARCHS, verify: bool = True,
                  sass_archs: Sequence[int] = (90,)) -> Tuple[List[Build], List[str]]:
    """Dedupe recorded launches by runtime specialization; with ``verify``, check the replica against the JIT's
    binder for every unique one. SASS is read for ``sass_archs`` (the rules and the report's default target).
    Returns (builds, failures)."""
    fns = {}
    by_key: Dict[str, Build] = {}
    failures = []
    for idx, l in enumerate(launches):
        fn = fns.get(l.kernel) or fns.setdefault(l.kernel, resolve_kernel(l.kernel))
        sig, cx, at = jit_specialization(fn, l.args)
        options = {k: v for k, v in l.options.items()}
        body = json.dumps([l.kernel, sig, sorted((k[0], _encode(v)) for k, v in cx.items()),
                           sorted((k[0], v) for k, v in at.items()), sorted(options.items())], default=str)
        for arch in launch_archs(l, archs):
            key = hashlib.sha1(f"{body}|{arch}".encode()).hexdigest()[:16]
            b = by_key.get(key)
            if b is None:
                if verify:
                    ref = jit_reference_specialization(fn, l.args, options, arch)
                    if ref != (sig, cx, at):
                        failures.append(f"{l.kernel}: specialization replica {sig, cx, at} != JIT binder {ref}")
                b = by_key[key] = Build(l.kernel, sig, sorted([k[0], _encode(v)] for k, v in cx.items()),
                                        sorted([k[0], v] for k, v in at.items()), options, arch,
                                        _dtype_of(sig), arch in sass_archs,
                                        [i for i, kp in enumerate(fn.params) if kp.is_constexpr], key)
            b.launches.append(idx)
    return list(by_key.values()), failures


# ----------------------------------------------------------------------------------------------
# building one specialization and reading its cubin

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_SASS_LINE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)")
_DOT_OPS = re.compile(r"=\s*(?:tt\.dot|ttng\.warp_group_dot|tt\.dot_scaled)\s")


def parse_ptxas_log(log: str) -> Dict[str, int]:
    regs = _PTXAS_REGS.findall(log)
    frame = _PTXAS_FRAME.findall(log)
    if not regs or not frame:
        raise ValueError(f"no register/spill report in the ptxas log:\n{log[:2000]}")
    stack, st, ld = (int(x) for x in frame[-1])
    return {"registers": int(regs[-1]), "stack_frame": stack, "spill_stores": st, "spill_loads": ld}


def sass_opcodes(sass: str) -> Dict[str, int]:
    """Static instruction count per full opcode (with modifiers) in ``cuobjdump -sass`` output."""
    return dict(collections.Counter(_SASS_LINE.findall(sass)))


def _tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} not found at {path} (it ships with triton's NVIDIA backend)")
    return path


def _run_ptxas(ptx: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                            f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True, check=True)
        return r.stderr + r.stdout


def _sass(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout


def _analysis_dir() -> str:
    from triton import knobs
    d = os.path.join(knobs.cache.dir, "ftkernels-static")
    os.makedirs(d, exist_ok=True)
    return d


def build(b: Build) -> Dict[str, Any]:
    """Compile one specialization; returns its resources and instruction counts (or the error)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import resource
    import time

    def cpu() -> float:
        return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))

    t0, c0 = time.perf_counter(), cpu()
    out: Dict[str, Any] = {"key": b.key}
    try:
        fn = resolve_kernel(b.kernel)
        src = ASTSource(fn=fn, signature=b.signature, constexprs={(i,): _decode_constexpr(b, i, v)
                                                                  for i, v in b.constexprs},
                        attrs={(i,): a for i, a in b.attrs})
        log = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                k = triton.compile(src, target=GPUTarget("cuda", b.arch, 32), options=_jit_kwargs(fn, b.options))
        finally:
            knobs.nvidia.dump_ptxas_log = False
        cached = os.path.join(_analysis_dir(), f"{k.hash}-v{ANALYSIS_VERSION}.json")
        if os.path.exists(cached):
            with open(cached) as f:
                done = json.load(f)
            if done.get("sass") is not None or not b.sass:
                return {**done, "key": b.key}
        text = log.getvalue()
        if "registers" not in text:  # Triton's cache had the cubin: ptxas did not run here
            text = _run_ptxas(k.asm["ptx"], b.arch)
        out.update(parse_ptxas_log(text))
        out.update({"shared": int(k.metadata.shared), "num_warps": int(k.metadata.num_warps),
                    "num_stages": int(k.metadata.num_stages), "dots": len(_DOT_OPS.findall(k.asm["ttgir"])),
                    "hash": k.hash, "sass": sass_opcodes(_sass(k.asm["cubin"])) if b.sass else None})
        out["build_s"] = round(time.perf_counter() - t0, 3)
        out["build_cpu_s"] = round(cpu() - c0, 3)
        tmp = cached + f".{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump({k_: v for k_, v in out.items() if k_ != "key"}, f)
        os.replace(tmp, cached)
    except Exception as e:  # report every failure, not just the first
        out["error"] = f"{type(e).__name__}: {str(e)[:3000]}"
    return out


def _decode_constexpr(b: Build, i: int, v):
    """Constexpr values were encoded for JSON; tl dtypes come back from their names."""
    if isinstance(v, str) and b.signature[list(b.signature)[i]] == "constexpr":
        import triton.language as tl
        if v in _TL_DTYPE_NAMES:
            return tl.dtype(v)
    return v


_TL_DTYPE_NAMES = {"fp8e4nv", "fp8e5", "fp16", "bf16", "fp32", "fp64", "int1", "int8", "int16", "int32", "int64",
                   "uint8", "uint16", "uint32", "uint64"}


def check(builds: List[Build], results: List[Dict[str, Any]]) -> List[str]:
    failures = []
    for b, r in zip(builds, results):
        if "error" in r:
            failures.append(f"sm_{b.arch} {b.label()}: {r['error']}")
        elif r["shared"] > SHARED_LIMIT[b.arch]:
            failures.append(f"sm_{b.arch} {b.label()}: shared memory {r['shared']} B > the chip's per-block limit "
                            f"{SHARED_LIMIT[b.arch]} B")
    return failures


def build_all(builds: List[Build], jobs: int = 2) -> List[Dict[str, Any]]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run the compile gate without TRITON_INTERPRET=1")
    # big kernels first so the pool does not end on a straggler
    order = sorted(range(len(builds)), key=lambda i: -len(builds[i].signature))
    results: List[Optional[Dict[str, Any]]] = [None] * len(builds)
    if jobs <= 1:
        for i in order:
            results[i] = build(builds[i])
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for i, r in zip(order, pool.map(build, [builds[i] for i in order], chunksize=1)):
                results[i] = r
    return results  # type: ignore[return-value]


def record_launches(path: str, only: Optional[Sequence[str]] = None, dtypes: Optional[Sequence[str]] = None) -> None:
    """Run the launch recorder in a subprocess with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "ftkernels._launch_recorder", path]
    if only:
        cmd += ["--only", *only]
    if dtypes:
        cmd += ["--dtypes", *dtypes]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"recording launches failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")


def run(launches_path: Optional[str] = None, archs: Sequence[int] = ARCHS, jobs: int = 2, verbose: bool = False,
        json_out: Optional[str] = None, only: Optional[Sequence[str]] = None,
        dtypes: Optional[Sequence[str]] = None, sass_archs: Sequence[int] = (90,)) -> List[str]:
    from ftkernels import _launch_recorder as lr
    with tempfile.TemporaryDirectory() as tmp:
        if launches_path is None:
            launches_path = os.path.join(tmp, "launches.json")
            record_launches(launches_path, only, dtypes)
        launches, _, skipped = lr.load(launches_path)
    builds, failures = unique_builds(launches, archs, sass_archs=sass_archs)
    results = build_all(builds, jobs)
    failures += check(builds, results)
    if verbose:
        for b, r in zip(builds, results):
            if "error" not in r:
                print(f"ok sm_{b.arch} shared={r['shared']:6d} regs={r['registers']:3d} "
                      f"spills={r['spill_stores']}/{r['spill_loads']} {b.label()}")
    for k, reason in sorted(skipped.items()):
        print(f"not recorded: {k}: {reason}")
    kernels = len({l.kernel for l in launches})
    print(f"compile gate: {len(launches)} launches of {kernels} kernels -> {len(builds)} builds "
          f"({', '.join(f'sm_{a} {sum(b.arch == a for b in builds)}' for a in archs)}), {len(failures)} failures")
    if json_out:
        with open(json_out + ".tmp", "w") as f:
            json.dump({"builds": [dataclasses.asdict(b) for b in builds], "results": results,
                       "failures": failures}, f)
        os.replace(json_out + ".tmp", json_out)
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SHARED_LIMIT))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--launches", help="a recording from ftkernels._launch_recorder (default: record now)")
    ap.add_argument("--only", nargs="*", help="record only workloads whose label contains one of these")
    ap.add_argument("--dtypes", nargs="+", help="record only these dtypes (fp32 fp16 bf16)")
    ap.add_argument("--json", help="write the builds and their resources here (input of the static report)")
    ap.add_argument("--sass-arch", type=int, nargs="*", default=[90], help="disassemble the cubins of these archs")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    fails = run(a.launches, tuple(a.arch), a.jobs, a.verbose, a.json, a.only, a.dtypes, a.sass_arch)
    for f in fails:
        print("FAIL", f, file=sys.stderr)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
