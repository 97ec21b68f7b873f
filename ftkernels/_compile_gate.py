"""Compile gate: build every kernel specialization the dispatchers can launch to real cubin.

    python -m ftkernels._compile_gate [--arch 80 90] [--jobs 2]

Runs without a GPU (Triton's compiler targets a GPUTarget), and must run WITHOUT TRITON_INTERPRET
(under it ``@triton.jit`` yields an interpreter object that ``triton.compile`` cannot build).
Each op module exposes ``compile_specializations() -> list[Specialization]``: the exact
(kernel, dtype, constexpr) combinations its launch code can pick. Conventions for kernel arguments:
names ending in ``_ptr`` are pointers of the specialization's dtype (``_f32_ptr``: always fp32
scratch/statistics), names listed in ``Specialization.floats`` are fp32 scalars, the rest i32.
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Tuple

from ftkernels._common import Specialization, spec  # noqa: F401  (re-exported for op modules)

# Shared-memory limits per SM for one block (opt-in maximum).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
OP_MODULES = (
    "ftkernels.multichannel_linear",
    "ftkernels.frame_norm",
    "ftkernels.squared_relu_ffn",
    "ftkernels.multichannel_attention",
)


def _signature(fn, s: Specialization) -> Dict[str, str]:
    cx = dict(s.constexprs)
    sig = {}
    for name in fn.arg_names:
        if name in cx:
            sig[name] = "constexpr"
        elif name.endswith("_f32_ptr"):
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + s.dtype
        elif name in s.floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _build(args) -> Tuple[str, int, int, str]:
    module, s, arch = args
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), s.kernel_name)
    try:
        src = ASTSource(fn=fn, signature=_signature(fn, s), constexprs=dict(s.constexprs))
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": s.num_warps, "num_stages": s.num_stages})
        return s.label(), arch, int(k.metadata.shared), ""
    except Exception as e:  # report every failure, not just the first
        return s.label(), arch, -1, f"{type(e).__name__}: {str(e)[:2000]}"


def collect() -> List[Tuple[str, Specialization]]:
    import importlib

    out = []
    for module in OP_MODULES:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue  # op not written yet
            raise
        out += [(module, s) for s in mod.compile_specializations()]
    return out


def run(archs=(80, 90), jobs=2, verbose=False) -> List[str]:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("run the compile gate without TRITON_INTERPRET=1")
    work = [(m, s, a) for m, s in collect() for a in archs]
    failures = []
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for label, arch, shared, err in pool.map(_build, work, chunksize=4):
            if err:
                failures.append(f"sm_{arch} {label}: {err}")
            elif shared > SHARED_LIMIT[arch]:
                failures.append(f"sm_{arch} {label}: shared memory {shared} B > limit {SHARED_LIMIT[arch]} B")
            elif verbose:
                print(f"ok sm_{arch} shared={shared:6d} {label}")
    print(f"compile gate: {len(work)} builds, {len(failures)} failures")
    return failures


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args()
    fails = run(tuple(a.arch), a.jobs, a.verbose)
    for f in fails:
        print("FAIL", f, file=sys.stderr)
    sys.exit(1 if fails else 0)
