"""Benchmark-suite pytest config.

``pytest benchmarks/``              smoke: every case once on tiny shapes, outputs checked against float64.
``pytest benchmarks/ --benchmark``  full timing on CUDA if present, else CPU; writes benchmarks/results/.

``--benchmark`` is our own flag (exact name; pytest-benchmark's options all start with ``--benchmark-``
and pytest disables argparse abbreviations, so the two cannot be confused).
"""
from __future__ import annotations

import os

import pytest
import torch

from benchmarks import bench_utils

_BENCH_KEY = pytest.StashKey()


def pytest_addoption(parser):
    group = parser.getgroup("ftkernels benchmarks")
    group.addoption("--benchmark", action="store_true", dest="ft_benchmark", default=False,
                    help="ftkernels: run the full benchmark suite (model-sized shapes, timing, "
                         "results written to benchmarks/results/) instead of the smoke run")


def pytest_configure(config):
    # FTBENCH_THREADS=n pins torch's intra-op threads for the run (recorded in the results): on small shared
    # VMs two threads can stall on each other (see BENCHMARKS.md) and one gives reproducible CPU numbers
    threads = os.environ.get("FTBENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    config.stash[_BENCH_KEY] = bench_utils.Bench(config)
    # one torch.compile wrapper per case: every shape recompiles (dynamic=False), so lift dynamo's
    # per-function recompile limit, past which it would silently fall back to eager
    import torch._dynamo.config as dcfg
    for name, value in (("recompile_limit", 256), ("cache_size_limit", 256),
                        ("accumulated_recompile_limit", 4096), ("accumulated_cache_size_limit", 4096)):
        if hasattr(dcfg, name):
            setattr(dcfg, name, max(getattr(dcfg, name), value))


@pytest.fixture(scope="session")
def bench(pytestconfig) -> bench_utils.Bench:
    return pytestconfig.stash[_BENCH_KEY]


def pytest_deselected(items):
    for item in items:
        b = item.config.stash.get(_BENCH_KEY, None)
        if b is not None:
            b.partial = True
            return


def pytest_collection_finish(session):
    """A run that does not cover every benchmark module (file args, -k, -m) writes ``*-partial.*`` results
    instead of overwriting the day's full results."""
    b = session.config.stash.get(_BENCH_KEY, None)
    if b is None:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    wanted = {f for f in os.listdir(here) if f.startswith("test_bench_") and f.endswith(".py")}
    seen = {os.path.basename(str(item.fspath)) for item in session.items
            if os.path.dirname(os.path.abspath(str(item.fspath))) == here}
    if not wanted <= seen:
        b.partial = True


def pytest_sessionfinish(session, exitstatus):
    b = session.config.stash.get(_BENCH_KEY, None)
    if b is not None and b.full:
        b.written = bench_utils.write_reports(b)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    b = config.stash.get(_BENCH_KEY, None)
    if b is None:
        return
    if not b.full:
        terminalreporter.write_line("ftkernels benchmarks ran in smoke mode (tiny shapes, correctness only); "
                                    "add --benchmark for timings")
        return
    for path in getattr(b, "written", []):
        terminalreporter.write_line(f"ftkernels benchmark results: {path}")
