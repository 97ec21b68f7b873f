"""Benchmark harness shared by ``benchmarks/test_bench_*.py``.

Two modes, chosen by ``--benchmark`` (defined in ``benchmarks/conftest.py``):

smoke (default, CI)  every (op, mode, size, provider) case runs once on tiny shapes and its output (and, for
                     ``fwd+bwd``, its gradients) is checked against the float64 reference. Nothing is timed,
                     nothing is written.
full (--benchmark)   model-sized shapes; the same check, then timing: ``triton.testing.do_bench`` (median) on
                     CUDA, pytest-benchmark's ``benchmark`` fixture (median of ``pedantic`` rounds) on CPU. Warm-up
                     (and torch.compile's compilation) is excluded and several input sets are cycled so caches do
                     not flatter. At the end of the session ``benchmarks/results/<device>-<date>.{json,md}`` and
                     one PNG per (op, mode) are written. Timings are never asserted.

A test builds a :class:`Problem` (inputs, FLOP/byte counts, the float64 oracle) and a provider callable, and
calls :meth:`Bench.run`. Providers that cannot run a case raise :class:`Unsupported` (recorded, then skipped).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import pytest
import torch

# FTBENCH_RESULTS_DIR redirects the full run's files (scripts/gpu_check.sh collects one run in one folder)
RESULTS_DIR = (os.environ.get("FTBENCH_RESULTS_DIR")
               or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
# FTBENCH_ROWS_LOG=path appends every row as one JSON line the moment it is measured (a run cut short by a
# device lease keeps what it timed; the session-end reports need the session to end)
ROWS_LOG = os.environ.get("FTBENCH_ROWS_LOG")
HAS_CUDA = torch.cuda.is_available()

# relative L2 error allowed against the float64 reference, by compute dtype (fp32 allows for TF32 convs
# and compiled reductions; a wrong formulation is off by O(1))
TOLERANCE = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2, torch.float64: 1e-9}


class Unsupported(Exception):
    """A provider cannot run this case (reason in the message); the case is recorded and skipped."""


@dataclasses.dataclass
class Problem:
    """One op at one size. ``make_inputs(i)`` builds input set ``i`` (device/dtype already applied);
    ``oracle(*inputs)`` is the reference, called on float64 copies. ``flops``/``bytes`` are the forward
    pass's minimal counts (bytes: read inputs and weights once, write the output once)."""
    op: str
    size: str
    dims: Dict[str, int]
    make_inputs: Callable[[int], Tuple[torch.Tensor, ...]]
    oracle: Callable[..., torch.Tensor]
    flops: float
    bytes: float
    grad_argnums: Tuple[int, ...] = (0,)
    bwd_flops_factor: float = 2.0  # backward FLOPs = factor * forward FLOPs
    bwd_bytes_factor: float = 2.0
    metric: str = "flops"  # what the plots show as throughput: "flops" or "bytes"

    def counts(self, mode: str) -> Tuple[float, float]:
        if mode == "fwd":
            return self.flops, self.bytes
        return self.flops * (1 + self.bwd_flops_factor), self.bytes * (1 + self.bwd_bytes_factor)


# ----------------------------------------------------------------------------------------------
# session configuration


def is_full(config) -> bool:
    return bool(config.getoption("ft_benchmark", default=False))


def bench_device() -> torch.device:
    return torch.device("cuda") if HAS_CUDA else torch.device("cpu")


def bench_dtype() -> torch.dtype:
    """bf16 on CUDA (what the model trains in), fp32 on CPU; FTBENCH_DTYPE=fp32|fp16|bf16 overrides."""
    name = os.environ.get("FTBENCH_DTYPE")
    if name:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    return torch.bfloat16 if HAS_CUDA else torch.float32


def pick_sizes(config, smoke: Sequence, cpu: Sequence, gpu: Sequence) -> list:
    if not is_full(config):
        return list(smoke)
    return list(gpu if HAS_CUDA else cpu)


def device_slug() -> str:
    name = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    env = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if HAS_CUDA else f"CPU: {cpu_model()}",
        "device_slug": device_slug(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "dtype": str(bench_dtype()).replace("torch.", ""),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        env["triton"] = None
    if HAS_CUDA:
        env["cuda"] = torch.version.cuda
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                           cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or None
    except Exception:
        env["git_commit"] = None
    return env


# ----------------------------------------------------------------------------------------------
# timing


def _sync():
    if HAS_CUDA:
        torch.cuda.synchronize()


def cpu_median(fn: Callable[[], object], target_s: float = 0.3, max_rounds: int = 20) -> float:
    """Median wall time of fn() on CPU with our own timer (roofline probes and the model benchmark)."""
    fn()
    times = []
    t_end = time.perf_counter() + target_s
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < max_rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gpu_median(fn: Callable[[], object], grad_to_none=None, warmup: int = 25, rep: int = 100) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                   return_mode="median") * 1e-3


def measure_roofline() -> dict:
    """Peaks measured in this run: a large matmul in the benchmark dtype (FLOP/s) and a large copy (B/s)."""
    dev, dt = bench_device(), bench_dtype()
    if HAS_CUDA:
        n, copy_bytes = 8192, 1 << 30
        timer = gpu_median
    else:
        n, copy_bytes = 2048, 1 << 28
        timer = cpu_median
    a = torch.randn(n, n, device=dev, dtype=dt)
    b = torch.randn(n, n, device=dev, dtype=dt)
    t_mm = timer(lambda: torch.matmul(a, b))
    del a, b
    src = torch.empty(copy_bytes // 4, device=dev, dtype=torch.float32).normal_()
    dst = torch.empty_like(src)
    t_cp = timer(lambda: dst.copy_(src))
    del src, dst
    return {"matmul_n": n, "matmul_dtype": str(dt).replace("torch.", ""), "matmul_flops_per_s": 2 * n ** 3 / t_mm,
            "copy_bytes": copy_bytes, "copy_bytes_per_s": 2 * copy_bytes / t_cp}


# ----------------------------------------------------------------------------------------------
# checks


def _float64(t):
    return t.detach().double() if isinstance(t, torch.Tensor) else t


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double().to(a.device)
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != reference {tuple(b.shape)}")
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grad_seed_like(out: torch.Tensor) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(1234)
    return torch.randn(out.shape, generator=g, dtype=torch.float32).to(out.device, out.dtype)


def forward_backward(fn, inputs, grad_argnums, grad_out=None):
    """Run fn on inputs with grads on ``grad_argnums``; returns (out, [grads])."""
    inputs = [t.detach().requires_grad_(i in grad_argnums) if isinstance(t, torch.Tensor) else t
              for i, t in enumerate(inputs)]
    out = fn(*inputs)
    g = grad_seed_like(out) if grad_out is None else grad_out
    out.backward(g)
    return out, [inputs[i].grad for i in grad_argnums]


# ----------------------------------------------------------------------------------------------
# per-op test modules: parametrization and one case


CPU_REFERENCE_NOTE = "reference path (CPU; not the Triton kernels)"


def case_parametrizer(providers: Iterable[str], size_label: Callable[..., str], smoke: Sequence, cpu: Sequence,
                      cpu_bwd: Sequence, gpu: Sequence, gpu_bwd: Sequence) -> Callable:
    """A ``pytest_generate_tests`` hook for an op's test module: parametrizes ``case`` = (mode, dims, provider)
    over ``fwd`` at ``smoke``/``cpu``/``gpu`` sizes and ``fwd+bwd`` at ``smoke``/``cpu_bwd``/``gpu_bwd`` sizes
    (see :func:`pick_sizes`), each with every provider; ids ``<mode>-<size_label(*dims), '_' for ' '>-<provider>``."""
    def pytest_generate_tests(metafunc):
        if "case" not in metafunc.fixturenames:
            return
        cfg = metafunc.config
        cases = [("fwd", d) for d in pick_sizes(cfg, smoke, cpu, gpu)]
        cases += [("fwd+bwd", d) for d in pick_sizes(cfg, smoke, cpu_bwd, gpu_bwd)]
        params = [(m, d, p) for m, d in cases for p in providers]
        metafunc.parametrize("case", params,
                             ids=[f"{m}-{size_label(*d).replace(' ', '_')}-{p}" for m, d, p in params])
    return pytest_generate_tests


def run_case(request, bench: "Bench", case: tuple, problem: Callable[..., Problem],
             make_provider: Callable[[str, tuple, bool], Callable], baseline: str, note: str = "",
             cpu_reference_note: bool = False) -> Optional[dict]:
    """Run one ``case`` from :func:`case_parametrizer`: ``problem(dims, device, dtype)`` at the session's device
    and dtype, the provider built (inside :meth:`Bench.run`, so it may raise :class:`Unsupported`) by
    ``make_provider(provider, dims, bench.full)``. With ``cpu_reference_note`` the ``ftkernels`` rows on CPU
    get :data:`CPU_REFERENCE_NOTE`."""
    mode, dims, provider = case
    if cpu_reference_note and provider == "ftkernels" and not HAS_CUDA:
        note = CPU_REFERENCE_NOTE
    return bench.run(request, problem(dims, bench.device, bench.dtype), provider,
                     lambda: make_provider(provider, dims, bench.full), mode, baseline=baseline, note=note)


# ----------------------------------------------------------------------------------------------
# the runner


class Bench:
    """Per-session state: mode, device, collected rows, roofline, oracle cache."""

    def __init__(self, config):
        self.config = config
        self.full = is_full(config)
        self.device = bench_device()
        self.dtype = bench_dtype()
        self.rows: List[dict] = []
        self._roofline: Optional[dict] = None
        self._oracle: Dict[tuple, tuple] = {}
        self.t_start = time.time()
        self.partial = False  # set by conftest when only part of the suite ran

    @property
    def roofline(self) -> dict:
        if self._roofline is None:
            self._roofline = measure_roofline()
        return self._roofline

    def n_sets(self, problem: Problem) -> int:
        """Input sets to cycle: enough that one pass over them exceeds the L2 (GPU) or LLC (CPU)."""
        if not self.full:
            return 1
        one = sum(t.numel() * t.element_size() for t in problem.make_inputs(0) if isinstance(t, torch.Tensor))
        budget = 64 << 20 if HAS_CUDA else 48 << 20
        return int(max(2, min(4, math.ceil(budget / max(one, 1)))))

    def oracle(self, problem: Problem, mode: str, inputs) -> tuple:
        key = (problem.op, problem.size, mode)
        if key not in self._oracle:
            x64 = [_float64(t) for t in inputs]
            if mode == "fwd":
                with torch.no_grad():
                    self._oracle[key] = (problem.oracle(*x64), [])
            else:
                ins = [t.detach().requires_grad_(i in problem.grad_argnums) if isinstance(t, torch.Tensor) else t
                       for i, t in enumerate(x64)]
                out = problem.oracle(*ins)
                # the provider's grad_out (drawn in the benchmark dtype), widened
                out.backward(grad_seed_like(out.detach().to(self.dtype)).double())
                self._oracle[key] = (out.detach(), [ins[i].grad for i in problem.grad_argnums])
        return self._oracle[key]

    def check(self, problem: Problem, provider: str, fn, mode: str, inputs, tol: Optional[float]) -> float:
        tol = TOLERANCE[self.dtype] if tol is None else tol
        ref_out, ref_grads = self.oracle(problem, mode, inputs)
        if mode == "fwd":
            with torch.no_grad():
                out = fn(*inputs)
            errs = {"out": rel_err(out, ref_out)}
        else:
            out, grads = forward_backward(fn, inputs, problem.grad_argnums)
            errs = {"out": rel_err(out, ref_out)}
            for i, g, rg in zip(problem.grad_argnums, grads, ref_grads):
                if g is None:
                    raise AssertionError(f"{provider}: no gradient reached input {i}")
                errs[f"grad{i}"] = rel_err(g, rg)
        worst = max(errs.values())
        assert worst <= tol, (f"{problem.op} {mode} {problem.size} {provider}: relative error vs float64 reference "
                              f"{errs} > {tol}")
        return worst

    def _keep(self, row: dict) -> None:
        self.rows.append(row)
        if ROWS_LOG and self.full:
            with open(ROWS_LOG, "a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    def run(self, request, problem: Problem, provider: str, make_fn: Callable[[], Callable], mode: str = "fwd",
            baseline: str = "seed", note: str = "", tol: Optional[float] = None) -> Optional[dict]:
        row = {"op": problem.op, "mode": mode, "size": problem.size, "dims": problem.dims, "provider": provider,
               "baseline": baseline, "note": note, "dtype": str(self.dtype).replace("torch.", ""),
               "metric": problem.metric}
        try:
            fn = make_fn()
        except Unsupported as e:
            if self.full:
                self._keep({**row, "skipped": str(e)})
            pytest.skip(f"{provider}: {e}")
        n = self.n_sets(problem)
        sets = [problem.make_inputs(i) for i in range(n)]
        row["max_rel_err"] = self.check(problem, provider, fn, mode, sets[0], tol)
        if not self.full:
            return None
        flops, nbytes = problem.counts(mode)
        self._last_spread = {}
        t, rounds, peak = self._time(request, fn, mode, sets, problem)
        row.update(self._last_spread)
        row.update(median_s=t, rounds=rounds, input_sets=n, flops=flops, bytes=nbytes,
                   flops_per_s=flops / t, bytes_per_s=nbytes / t, peak_mem_bytes=peak)
        rl = self.roofline
        row["frac_matmul_peak"] = row["flops_per_s"] / rl["matmul_flops_per_s"]
        row["frac_copy_bw"] = row["bytes_per_s"] / rl["copy_bytes_per_s"]
        self._keep(row)
        return row

    def _time(self, request, fn, mode, sets, problem):
        grad_argnums = problem.grad_argnums
        if mode == "fwd":
            prepared = sets

            def step(*a):
                with torch.no_grad():
                    return fn(*a)
        else:
            prepared = [[t.detach().requires_grad_(i in grad_argnums) if isinstance(t, torch.Tensor) else t
                         for i, t in enumerate(s)] for s in prepared_sets(sets)]
            with torch.no_grad():
                g = grad_seed_like(fn(*[_detach(t) for t in sets[0]]))

            def step(*a):
                fn(*a).backward(g)

        leaves = [t for s in prepared for t in s if isinstance(t, torch.Tensor) and t.requires_grad]
        return self.time_step(request, step, prepared, leaves, f"{problem.op} {mode} {problem.size}")

    def time_step(self, request, step, prepared, leaves=(), group="", target_s=0.8, max_rounds=30):
        """Median seconds of ``step(*s)`` cycling the input sets ``prepared``; ``leaves`` get .grad = None
        before each call. Returns (median, rounds or None, CUDA peak allocated bytes or None); min and IQR of
        the CPU rounds go to ``self._last_spread``."""
        counter = [0]
        leaves = list(leaves)

        def clear():
            for t in leaves:
                t.grad = None

        peak = None
        if HAS_CUDA:
            def rotating():
                s = prepared[counter[0] % len(prepared)]
                counter[0] += 1
                step(*s)
            t = gpu_median(rotating, grad_to_none=leaves or None)
            clear()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(*prepared[0])
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            clear()
            return t, None, peak
        # CPU: pytest-benchmark's timer; one untimed call (warm-up) sizes the round count
        clear()
        t0 = time.perf_counter()
        step(*prepared[1 % len(prepared)])
        one = time.perf_counter() - t0
        clear()
        rounds = int(min(max_rounds, max(3, target_s / max(one, 1e-6))))

        def setup():
            clear()
            s = prepared[counter[0] % len(prepared)]
            counter[0] += 1
            return tuple(s), {}

        benchmark = request.getfixturevalue("benchmark")
        benchmark.group = group
        benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=1 if one < 0.2 else 0, iterations=1)
        clear()
        stats = getattr(benchmark, "stats", None)
        if stats is None or getattr(stats, "stats", None) is None:  # --benchmark-disable: fall back
            return cpu_median(lambda: step(*prepared[0])), None, None
        self._last_spread = {"min_s": stats.stats.min, "iqr_s": stats.stats.iqr}
        return stats.stats.median, rounds, None

    def record(self, row: dict) -> None:
        """Add a row timed outside :meth:`run` (fills the derived rates and roofline fractions)."""
        t = row["median_s"]
        rl = self.roofline
        for key, peak_key, out in (("flops", "matmul_flops_per_s", "frac_matmul_peak"),
                                   ("bytes", "copy_bytes_per_s", "frac_copy_bw")):
            rate = row[key] / t if row.get(key) else None
            row[f"{key}_per_s"] = rate
            row[out] = rate / rl[peak_key] if rate else None
        self._keep(row)


def _detach(t):
    return t.detach() if isinstance(t, torch.Tensor) else t


def prepared_sets(sets):
    return [[_detach(t) for t in s] for s in sets]


# ----------------------------------------------------------------------------------------------
# reports

def _fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt_rate(x: Optional[float], unit: str) -> str:
    if x is None:
        return "-"
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M")):
        if x >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def add_ratios(rows: List[dict]) -> None:
    """speedup = t_baseline / t_provider, baseline = the row's ``baseline`` provider at the same (op, mode, size)."""
    times = {(r["op"], r["mode"], r["size"], r["provider"]): r.get("median_s") for r in rows}
    for r in rows:
        tb = times.get((r["op"], r["mode"], r["size"], r["baseline"]))
        r["speedup_vs_baseline"] = tb / r["median_s"] if tb and r.get("median_s") else None


def group_rows(rows: List[dict]) -> Dict[Tuple[str, str], List[dict]]:
    groups: Dict[Tuple[str, str], List[dict]] = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"]), []).append(r)
    return groups


def markdown(rows: List[dict], env: dict, roofline: Optional[dict], plots: Dict[Tuple[str, str], str]) -> str:
    out = [f"# ftkernels benchmarks: {env['device']} ({env['date']})", ""]
    out.append(f"torch {env['torch']}, triton {env.get('triton')}, python {env['python']}, dtype {env['dtype']}, "
               f"{env['cpu_threads']} CPU threads, commit {env.get('git_commit')}")
    if env.get("device_slug") == "cpu":
        out += ["", "**CPU run.** ftkernels' backend `auto` runs the plain-PyTorch reference on CPU, so the "
                "`ftkernels` rows are the reference formulation, not the Triton kernels (skipped where an `eager` "
                "reference row already measures the same code)."]
    if roofline:
        out += ["", f"Roofline measured in this run: matmul {roofline['matmul_n']}^3 {roofline['matmul_dtype']} = "
                f"{_fmt_rate(roofline['matmul_flops_per_s'], 'FLOP/s')}; copy of {roofline['copy_bytes'] >> 20} MiB = "
                f"{_fmt_rate(roofline['copy_bytes_per_s'], 'B/s')} (read + write)."]
    out += ["", "## Summary: geometric-mean speedup over the baseline, across sizes", "",
            "| op | mode | baseline | " + " | ".join(["provider: speedup (sizes)"]) + " |", "|---|---|---|---|"]
    for (op, mode), rs in group_rows(rows).items():
        cells = []
        for p in dict.fromkeys(r["provider"] for r in rs):
            sp = [r["speedup_vs_baseline"] for r in rs if r["provider"] == p and r.get("speedup_vs_baseline")]
            if sp:
                cells.append(f"{p}: {math.exp(sum(map(math.log, sp)) / len(sp)):.2f}x ({len(sp)})")
            else:
                cells.append(f"{p}: skipped")
        out.append(f"| {op} | {mode} | {rs[0]['baseline']} | {'; '.join(cells)} |")
    out += ["", "`median` is the statistic; `min` (CPU only) shows how much a shared, loaded machine spread the rounds. "
            "`speedup` = baseline median / provider median (> 1: faster than the baseline). `% mm` = achieved "
            "FLOP/s over the measured matmul peak, `% bw` = minimal bytes/s over the measured copy bandwidth."]
    for (op, mode), rs in group_rows(rows).items():
        out += ["", f"## {op} ({mode}; baseline `{rs[0]['baseline']}`)", ""]
        if (op, mode) in plots:
            out += [f"![{op} {mode}]({plots[(op, mode)]})", ""]
        out.append("| size | provider | median | min | speedup | FLOP/s | bytes/s | % mm | % bw | peak mem | note |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in rs:
            if "skipped" in r:
                out.append(f"| {r['size']} | {r['provider']} | skipped | | | | | | | | {r['skipped']} |")
                continue
            sp = r.get("speedup_vs_baseline")
            pk = r.get("peak_mem_bytes")
            out.append(
                f"| {r['size']} | {r['provider']} | {_fmt_time(r['median_s'])} | {_fmt_time(r.get('min_s'))} | "
                f"{'-' if sp is None else f'{sp:.2f}x'} | {_fmt_rate(r['flops_per_s'], 'FLOP/s')} | "
                f"{_fmt_rate(r['bytes_per_s'], 'B/s')} | {_pct(r['frac_matmul_peak'])} | "
                f"{_pct(r['frac_copy_bw'])} | {'-' if pk is None else f'{pk / 2**20:.0f} MiB'} | {r['note']} |")
    return "\n".join(out) + "\n"


def plot(rows: List[dict], path: str, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return False
    rs = [r for r in rows if r.get("median_s")]
    if not rs:
        return False
    sizes = list(dict.fromkeys(r["size"] for r in rs))
    providers = list(dict.fromkeys(r["provider"] for r in rs))
    metric = rs[0]["metric"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for p in providers:
        xs, ts, th = [], [], []
        for r in rs:
            if r["provider"] == p:
                xs.append(sizes.index(r["size"]))
                ts.append(r["median_s"] * 1e3)
                rate = r.get("flops_per_s") if metric == "flops" else r.get("bytes_per_s")
                th.append(rate / 1e9 if rate else float("nan"))
        axes[0].plot(xs, ts, marker="o", label=p)
        axes[1].plot(xs, th, marker="o", label=p)
    axes[0].set_ylabel("median time (ms)")
    axes[1].set_ylabel("GFLOP/s" if metric == "flops" else "GB/s (minimal bytes)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)))
        ax.set_xticklabels(sizes, rotation=30, ha="right", fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_reports(bench: Bench) -> List[str]:
    if not bench.rows:
        return []
    env = environment()
    env["wall_s"] = round(time.time() - bench.t_start, 1)
    env["partial"] = bench.partial
    return _write(bench.rows, env, bench._roofline)


def _write(rows: List[dict], env: dict, roofline: Optional[dict]) -> List[str]:
    add_ratios(rows)
    os.makedirs(RESULTS_DIR, exist_ok=True)
    stem = f"{env['device_slug']}-{env['date']}" + ("-partial" if env.get("partial") else "")
    plots = {}
    for (op, mode), rs in group_rows(rows).items():
        name = f"{stem}-{op}-{mode.replace('+', '_')}.png"
        if plot(rs, os.path.join(RESULTS_DIR, name), f"{op} {mode} on {env['device']} ({env['dtype']})"):
            plots[(op, mode)] = name
    with open(os.path.join(RESULTS_DIR, stem + ".json"), "w") as f:
        json.dump({"environment": env, "roofline": roofline, "rows": rows}, f, indent=1, default=str)
    with open(os.path.join(RESULTS_DIR, stem + ".md"), "w") as f:
        f.write(markdown(rows, env, roofline, plots))
    return [os.path.join(RESULTS_DIR, stem + ext) for ext in (".json", ".md")] + \
        [os.path.join(RESULTS_DIR, p) for p in plots.values()]


if __name__ == "__main__":  # re-render the markdown and plots of a results JSON: python -m benchmarks.bench_utils X.json
    with open(sys.argv[1]) as f:
        data = json.load(f)
    for path in _write(data["rows"], data["environment"], data["roofline"]):
        print(path)
