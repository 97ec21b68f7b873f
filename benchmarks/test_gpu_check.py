"""The Python pieces of scripts/gpu_check.sh, on CPU: device info, autotuner picks, the results summary, and the
scripts themselves (gpu_check.sh and gpu_check_lease.sh parse, and refuse to run without a GPU)."""
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from benchmarks import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = [os.path.join(ROOT, "scripts", name) for name in ("gpu_check.sh", "gpu_check_lease.sh")]


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_parses_and_refuses_to_run_without_a_gpu(script, tmp_path):
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("on a GPU the script would run the whole suite")
    r = subprocess.run(["bash", script], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHON=sys.executable))
    assert r.returncode == 2 and "no CUDA device" in r.stderr, r.stderr


def test_device_info_and_slug():
    info = gpu_check.device_info()
    assert info["torch"] == torch.__version__ and info["cuda_available"] == torch.cuda.is_available()
    assert info["git_commit"] is None or len(info["git_commit"]) == 40
    json.dumps(info)  # serialisable as written by `info`
    assert gpu_check.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    if not torch.cuda.is_available():
        assert gpu_check.gpu_slug() == "cpu"


def test_autotune_picks_are_dumped_per_kernel_and_key(tmp_path, monkeypatch):
    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BLOCK": 32}, num_warps=2), triton.Config({"BLOCK": 64}, num_warps=4)],
                     key=["n"])
    @triton.jit
    def tuned(x_ptr, n, BLOCK: tl.constexpr):
        pass

    # what Autotuner.run leaves behind after benchmarking on a GPU: the best config per tuning key
    tuned.cache[(1000, "torch.bfloat16")] = tuned.configs[1]
    tuned.cache[(64, "torch.float32")] = tuned.configs[0]
    mod = types.ModuleType("ftkernels._gpu_check_probe")
    mod.tuned = tuned
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    picks = gpu_check.autotune_picks()
    entry = picks["ftkernels._gpu_check_probe:tuned"]
    assert entry["key_names"] == ["n"] and entry["configs"] == 2
    assert entry["picks"] == [
        {"key": [1000, "torch.bfloat16"], "config": {"kwargs": {"BLOCK": 64}, "num_warps": 4, "num_stages": 3,
                                                     "num_ctas": 1, "maxnreg": None}},
        {"key": [64, "torch.float32"], "config": {"kwargs": {"BLOCK": 32}, "num_warps": 2, "num_stages": 3,
                                                  "num_ctas": 1, "maxnreg": None}}]
    # the pytest plugin writes them at the end of a session when asked to
    out = tmp_path / "picks.json"
    monkeypatch.setenv("FTKERNELS_AUTOTUNE_OUT", str(out))
    gpu_check.pytest_sessionfinish(None, 0)
    assert json.loads(out.read_text()) == picks
    # under pytest-xdist each worker writes its own file and the controller merges them (keys deduplicated)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    gpu_check.pytest_sessionfinish(None, 0)
    worker_file = tmp_path / "picks.gw3.json"
    assert json.loads(worker_file.read_text()) == picks
    other = {"ftkernels.x:k": {"key_names": ["m"], "configs": 1, "picks": [{"key": [2], "config": {}}]}}
    (tmp_path / "picks.gw0.json").write_text(json.dumps(other))
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    out.unlink()
    gpu_check.pytest_sessionfinish(None, 0)
    merged = json.loads(out.read_text())
    assert merged["ftkernels.x:k"] == other["ftkernels.x:k"]
    assert merged["ftkernels._gpu_check_probe:tuned"]["picks"] == entry["picks"]
    assert not worker_file.exists() and not (tmp_path / "picks.gw0.json").exists()


def test_summary_indexes_the_results_folder(tmp_path):
    assert gpu_check.main(["info", str(tmp_path / "device.json")]) == 0
    (tmp_path / "autotune-tests.json").write_text(json.dumps({}))
    (tmp_path / "tests.log").write_text("1 passed")
    assert gpu_check.main(["summary", str(tmp_path), "--step", "tests=0", "--step", "benchmarks=1"]) == 0
    text = (tmp_path / "README.md").read_text()
    assert f"torch {torch.__version__}" in text
    assert "| tests | 0 |" in text and "| benchmarks | 1 (failed) |" in text
    assert "no autotuned kernels" in text and "[tests.log](tests.log)" in text
    with pytest.raises(SystemExit):
        gpu_check.main(["summary", str(tmp_path), "--step", "oops"])
