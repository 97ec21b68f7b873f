"""Python side of ``scripts/gpu_check.sh``: device information, the autotuner's picks, the run's summary.

    python -m benchmarks.gpu_check slug                  # folder-safe GPU name (cpu without CUDA)
    python -m benchmarks.gpu_check info OUT.json         # nvidia-smi, torch/triton/CUDA versions, GPU properties
    python -m benchmarks.gpu_check summary DIR [--step NAME=RC ...]   # DIR/README.md indexing the run's files
    pytest -p benchmarks.gpu_check ...                   # plugin: FTKERNELS_AUTOTUNE_OUT=picks.json writes, at
                                                         # the end of the session, every autotuned kernel's
                                                         # best config per key

Autotuned kernels are found generically: every ``triton.autotune`` object (``triton.runtime.autotuner.Autotuner``)
defined at module level in an imported ``ftkernels`` module; its ``cache`` maps each tuning key (the values
of its ``key`` arguments and the argument dtypes) to the chosen ``triton.Config``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

PACKAGES = ("ftkernels",)


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def gpu_slug() -> str:
    import torch
    return slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else "cpu"


def _run(cmd: Sequence[str]) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def device_info() -> dict:
    """Everything needed to reproduce or compare a run: versions, GPU properties, nvidia-smi, git commit."""
    import torch
    info = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "platform": platform.platform(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                       "memory_bytes": p.total_memory, "count": torch.cuda.device_count()}
        info["cudnn"] = torch.backends.cudnn.version()
    smi = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,"
                              "power.limit,pstate", "--format=csv"])
    info["nvidia_smi"] = smi.strip() if smi else None
    here = os.path.dirname(os.path.abspath(__file__))
    commit = _run(["git", "-C", here, "rev-parse", "HEAD"])
    info["git_commit"] = commit.strip() if commit else None
    dirty = _run(["git", "-C", here, "status", "--porcelain"])
    info["git_dirty"] = bool(dirty and dirty.strip()) if dirty is not None else None
    return info


def _autotuners() -> Dict[str, object]:
    """'module:name' -> Autotuner for every autotuned kernel in the imported modules of PACKAGES."""
    if "triton" not in sys.modules:
        return {}
    from triton.runtime.autotuner import Autotuner
    found = {}
    for modname, mod in list(sys.modules.items()):
        if mod is None or not any(modname == p or modname.startswith(p + ".") for p in PACKAGES):
            continue
        for attr, obj in list(vars(mod).items()):
            if isinstance(obj, Autotuner):
                found[f"{modname}:{attr}"] = obj
    return found


def config_dict(cfg) -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages,
            "num_ctas": cfg.num_ctas, "maxnreg": cfg.maxnreg}


def autotune_picks() -> Dict[str, dict]:
    """{kernel: {"key_names": [...], "configs": n, "picks": [{"key": [...], "config": {...}}]}} for every
    autotuned kernel that has tuned at least once in this process."""
    out = {}
    for name, tuner in sorted(_autotuners().items()):
        picks = [{"key": [v if isinstance(v, (int, float, str, bool)) or v is None else str(v) for v in key],
                  "config": config_dict(cfg)} for key, cfg in tuner.cache.items()]
        out[name] = {"key_names": list(tuner.keys), "configs": len(tuner.configs), "picks": picks}
    return out


def write_autotune_picks(path: str, picks: Optional[dict] = None) -> dict:
    """Write ``picks`` (default: this process's) to ``path`` atomically; returns them."""
    picks = autotune_picks() if picks is None else picks
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(picks, f, indent=1)
    os.replace(tmp, path)
    return picks


def _worker_path(path: str, worker: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.{worker}{ext or '.json'}"


def merge_picks(parts: List[dict]) -> dict:
    """One picks dict from several processes' (pytest-xdist workers tune separately): keys deduplicated."""
    out: dict = {}
    for part in parts:
        for name, entry in part.items():
            have = out.setdefault(name, {**entry, "picks": []})
            for p in entry["picks"]:
                if all(q["key"] != p["key"] for q in have["picks"]):
                    have["picks"].append(p)
    return out


# pytest plugin (``-p benchmarks.gpu_check``)
def pytest_sessionfinish(session, exitstatus):
    """Write the picks to FTKERNELS_AUTOTUNE_OUT. Under pytest-xdist each worker writes its own file next to it
    and the controller, which ends last, merges them into the one asked for."""
    path = os.environ.get("FTKERNELS_AUTOTUNE_OUT")
    if not path:
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        write_autotune_picks(_worker_path(path, worker))
        return
    import glob
    parts = sorted(glob.glob(_worker_path(glob.escape(path), "gw*")))
    loaded = []
    for p in parts:
        with open(p) as f:
            loaded.append(json.load(f))
    picks = write_autotune_picks(path, merge_picks([autotune_picks()] + loaded))
    for p in parts:
        os.remove(p)
    n = sum(len(v["picks"]) for v in picks.values())
    print(f"\nautotuner picks: {len(picks)} autotuned kernels, {n} tuned keys -> {path}")


def summary(folder: str, steps: Dict[str, int]) -> str:
    """A README.md for a gpu_check results folder: device, step exit codes, the files."""
    info = {}
    path = os.path.join(folder, "device.json")
    if os.path.exists(path):
        with open(path) as f:
            info = json.load(f)
    gpu = info.get("gpu") or {}
    lines = [f"# GPU check: {gpu.get('name', 'unknown GPU')} ({info.get('date', '?')})", "",
             f"- torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), triton {info.get('triton')}, "
             f"python {info.get('python')}",
             f"- GPU: {gpu.get('name')} sm_{str(gpu.get('capability', '?')).replace('.', '')}, {gpu.get('sms')} SMs, "
             f"{(gpu.get('memory_bytes') or 0) / 2**30:.0f} GiB; driver: "
             f"{(info.get('nvidia_smi') or '').splitlines()[-1] if info.get('nvidia_smi') else 'n/a'}",
             f"- commit {info.get('git_commit')}{' (with uncommitted changes)' if info.get('git_dirty') else ''}", "",
             "| step | exit code |", "|---|---:|"]
    lines += [f"| {k} | {v}{' (failed)' if v else ''} |" for k, v in steps.items()]
    picks_files = sorted(f for f in os.listdir(folder) if f.startswith("autotune") and f.endswith(".json"))
    for pf in picks_files:
        with open(os.path.join(folder, pf)) as f:
            picks = json.load(f)
        lines += ["", f"Autotuner picks ({pf}): " + (", ".join(
            f"`{k.split(':')[-1]}` {len(v['picks'])} keys" for k, v in picks.items()) or "no autotuned kernels")]
    lines += ["", "Files:", ""] + [f"- [{f}]({f})" for f in sorted(os.listdir(folder)) if f != "README.md"]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(text)
    return text


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("slug", help="print the GPU's folder-safe name")
    p = sub.add_parser("info", help="write device information as JSON")
    p.add_argument("out")
    p = sub.add_parser("summary", help="write DIR/README.md for a results folder")
    p.add_argument("folder")
    p.add_argument("--step", action="append", default=[], metavar="NAME=RC", help="a step and its exit code")
    a = ap.parse_args(argv)
    if a.cmd == "slug":
        print(gpu_slug())
    elif a.cmd == "info":
        with open(a.out, "w") as f:
            json.dump(device_info(), f, indent=1)
    else:
        steps = {}
        for s in a.step:
            name, _, rc = s.rpartition("=")
            if not name or not rc.lstrip("-").isdigit():
                ap.error(f"--step expects NAME=RC, got {s!r}")
            steps[name] = int(rc)
        print(summary(a.folder, steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
