"""Static performance report: occupancy, SASS/ptxas parsing, FLOP and byte models, the rules and their ratchet.

The ratchet: ``tests/static_violations_known.txt`` lists today's rule violations (sm_90, every recorded launch).
A violation not in the list fails (a regression); a listed one that no longer occurs fails too (delete its
line: the list only shrinks as the kernels are redesigned).
"""
import json
import math
import os

import pytest

from ftkernels import _launch_recorder as lr
from ftkernels import static_report as sr

KNOWN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static_violations_known.txt")


# ----------------------------------------------------------------------------------------------
# pure functions


@pytest.mark.parametrize("arch, regs, shared, warps, blocks, occ, limiter", [
    (90, 255, 0, 4, 2, 0.125, "registers"),  # 8192 regs per warp: 2 warps per sub-partition
    (90, 32, 0, 4, 16, 1.0, "warps"),
    (90, 64, 100 * 1024, 4, 2, 0.125, "shared"),  # 228 KB / (100 KB + 1 KB reserved)
    (90, 40, 0, 1, 32, 0.5, "blocks"),
    (80, 128, 0, 8, 2, 0.25, "registers"),
    (80, 32, 90 * 1024, 4, 1, 0.0625, "shared"),  # 164 KB / 91 KB
    (80, 32, 164 * 1024, 4, 0, 0.0, "shared"),  # over the per-block limit: does not launch
])
def test_occupancy_follows_the_cuda_occupancy_rules(arch, regs, shared, warps, blocks, occ, limiter):
    assert sr.occupancy(sr.CHIPS[arch], regs, shared, warps) == (blocks, occ, limiter)


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/              @!PT LDS RZ, [RZ] ;
        /*0020*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   HMMA.16816.F32.BF16 R16, R8, R14, R16 ;
        /*0040*/               @P0 LDGSTS.E.BYPASS.LTC128B.128 [R3], desc[UR6][R4.64] ;
        /*0050*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24, gsb0 ;
        /*0060*/                   STL.64 [R1+0x8], R10 ;
        /*0070*/                   FFMA R0, R1, R2, R3 ;
"""


def test_sass_opcodes_and_mma_kind():
    from ftkernels._compile_gate import sass_opcodes
    ops = sass_opcodes(SASS)
    assert ops == {"LDC": 1, "LDS": 1, "HMMA.16816.F32.BF16": 2, "LDGSTS.E.BYPASS.LTC128B.128": 1,
                   "HGMMA.64x64x16.F32.BF16": 1, "STL.64": 1, "FFMA": 1}
    assert sr.mma_kind(ops, dots=2) == ("wgmma", 1)
    del ops["HGMMA.64x64x16.F32.BF16"]
    assert sr.mma_kind(ops, dots=2) == ("mma.sync", 2)
    assert sr.mma_kind({"FFMA": 9}, dots=1) == ("FFMA", 9)
    assert sr.mma_kind({"FFMA": 9}, dots=0) == ("-", 0)
    s = sr.sass_summary(ops)
    assert (s["HMMA"], s["cp.async"], s["local ld/st"], s["instructions"]) == (2, 1, 1, 7)


def test_ptxas_log_parsing():
    from ftkernels._compile_gate import parse_ptxas_log
    log = ("ptxas info    : 0 bytes gmem\nptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n    264 bytes stack frame, 164 bytes spill stores, "
           "164 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers\n")
    assert parse_ptxas_log(log) == {"registers": 255, "stack_frame": 264, "spill_stores": 164, "spill_loads": 164}
    with pytest.raises(ValueError):
        parse_ptxas_log("ptxas fatal: nothing")


def test_roofline_and_prediction():
    h100 = sr.CHIPS[90]
    assert h100.ridge == pytest.approx(989.4e12 / 3.35e12)
    # compute-bound: the roofline is FLOPs at the dense peak, the prediction divides by the kind's efficiency
    t = sr.roofline(h100, 1e12, 1e6, "bf16", gemm=True)
    assert t == pytest.approx(1e12 / 989.4e12)
    full = 132 * 10
    assert sr.predict(h100, 1e12, 1e6, "wgmma", "bf16", full) == pytest.approx(
        1e12 / (989.4e12 * sr.EFF["wgmma"]) + sr.LAUNCH_S)
    assert sr.predict(h100, 1e12, 1e6, "mma.sync", "bf16", full) > sr.predict(h100, 1e12, 1e6, "wgmma", "bf16", full)
    # one program too many costs a whole extra wave of compute
    assert sr.predict(h100, 1e12, 1e6, "wgmma", "bf16", 133) > 1.9 * (sr.predict(h100, 1e12, 1e6, "wgmma", "bf16",
                                                                                    132) - sr.LAUNCH_S)
    # memory-bound: bytes at 80% of HBM; a grid of 33 programs reaches half of that
    assert sr.predict(h100, 0, 1e9, "-", "bf16", full) == pytest.approx(1e9 / (3.35e12 * 0.8) + sr.LAUNCH_S)
    assert sr.predict(h100, 0, 1e9, "-", "bf16", 33) == pytest.approx(2 * 1e9 / (3.35e12 * 0.8) + sr.LAUNCH_S)
    # before Hopper, mma.sync is the native tensor-core path
    a100 = sr.CHIPS[80]
    assert sr.predict(a100, 1e12, 1e6, "mma.sync", "bf16", 1080) == sr.predict(a100, 1e12, 1e6, "wgmma", "bf16", 1080)


def _t(dtype, shape, sid, offset=0):
    return ["T", dtype, list(shape), [math.prod(shape[i + 1:]) for i in range(len(shape))], offset,
            {"bf16": 2, "fp16": 2, "fp32": 4}[dtype], sid]


def test_launch_bytes_count_each_distinct_tensor_once():
    from ftkernels._launch_recorder import Launch
    x = _t("bf16", (2, 3, 8, 8), 1)
    args = {"x_ptr": x, "gamma_ptr": x, "beta_ptr": x, "out_ptr": _t("bf16", (2, 3, 8, 8), 2),
            "view_ptr": _t("bf16", (2, 3, 8, 4), 2, offset=4), "n": ["i", 5]}
    assert sr.launch_bytes(Launch("m:k", args, {}, [1, 1, 1])) == (384 + 384 + 192) * 2


def test_frame_norm_rereads():
    """The chunked frame norm reads its frame blocks a second time from HBM beyond what L2 still holds; the
    resident kernels (and the one-pass variants) read once."""
    x = _t("bf16", (8, 106, 4096, 256), 1)  # 1.8 GB
    args = dict(x_ptr=x, F=["i", 4096], BC=["i", 1], BW=["i", 64], RESIDENT=["b", False], STORE_Y=["b", True],
                LOAD_STATS=["b", False])
    h100 = sr.CHIPS[90]
    grid = [4, 106, 8]
    big = sr._frame_norm_rereads(args, grid, h100, 4)  # 528 programs x 512 KB live: 50 MB of 270 MB hit L2
    assert 0.7 * sr._numel(x) * 2 < big < sr._numel(x) * 2
    assert sr._frame_norm_rereads(args, grid, h100, 1) < big  # fewer programs live: more of them still in L2
    assert sr._frame_norm_rereads(dict(args, F=["i", 32]), grid, h100, 4) == 0  # the live blocks fit in L2
    for one_pass in (dict(RESIDENT=["b", True]), dict(LOAD_STATS=["b", True]), dict(STORE_Y=["b", False])):
        assert sr._frame_norm_rereads(dict(args, **one_pass), grid, h100, 4) == 0
    bwd = {k: v for k, v in args.items() if k not in ("STORE_Y", "LOAD_STATS")}
    bwd["dy_ptr"] = _t("fp32", (8, 106, 4096, 256), 2)  # dy (fp32) and x (bf16): 3x the bytes, less of them in L2
    assert 3 * big < sr._frame_norm_rereads(bwd, grid, h100, 4) < sr._numel(x) * 6


# ----------------------------------------------------------------------------------------------
# rules on synthetic builds


def _synthetic(specs):
    """A recording and gate result with one launch per spec: (dtype, arch, flops, bytes, dots, sass, spills)."""
    launches, builds, results = [], [], []
    for i, (dtype, arch, flops, nbytes, dots, sass, spills) in enumerate(specs):
        elt = 2 if dtype != "fp32" else 4
        launches.append({"kernel": "synthetic:_toy_gemm", "args": {
            "a_ptr": _t(dtype, (nbytes // elt,), i), "FLOPS": ["i", flops], "BM": ["i", 64 + i]},
            "options": {"num_warps": 4}, "grid": [1024, 1, 1], "workload": "w", "dtype": dtype, "op": "",
            "autotune": None})
        builds.append({"kernel": "synthetic:_toy_gemm", "signature": {"a_ptr": "*" + dtype, "FLOPS": "i32",
                                                                       "BM": "constexpr"},
                       "constexprs": [[2, 64 + i]], "attrs": [[0, []]], "options": {"num_warps": 4}, "arch": arch,
                       "dtype": dtype, "key": f"k{i}", "launches": [i], "declared": [2]})
        results.append({"registers": 100, "spill_stores": spills, "spill_loads": spills, "stack_frame": spills,
                        "shared": 1024, "num_warps": 4, "num_stages": 3, "sass": sass, "dots": dots})
    rec = {"launches": launches, "ops": [], "fills": []}
    gj = {"builds": builds, "results": results, "failures": []}
    return sr.Analysis(rec, gj), gj


def test_rules_flag_compute_bound_gemms_without_wgmma_and_spills(monkeypatch):
    monkeypatch.setitem(sr.FLOP_MODELS, "_toy_gemm", lambda a, g: a["FLOPS"][1])
    hmma, hgmma = {"HMMA.16816.F32.BF16": 8}, {"HGMMA.64x64x16.F32.BF16": 4}
    big = int(1e6)  # bytes
    analysis, gj = _synthetic([
        ("bf16", 90, 400 * big, big, 1, hmma, 0),  # 400 FLOP/B > ridge 295, mma.sync: violation
        ("bf16", 90, 100 * big, big, 1, hmma, 0),  # memory-bound mma.sync: fine
        ("fp16", 90, 400 * big, big, 1, hgmma, 0),  # compute-bound with wgmma: fine
        ("bf16", 90, 0, big, 0, {"FADD": 3}, 8),  # spills: violation
        ("fp32", 90, 400 * big, big, 1, {"FFMA": 64}, 8),  # fp32 is not under the rules
        ("bf16", 80, 400 * big, big, 1, hmma, 8),  # sm_80 is not under the rules
    ])
    got = sr.rule_violations(analysis, gj, 90)
    assert [v.key() for v in got] == ["no-wgmma _toy_gemm[bf16; BM=64; num_warps=4]",
                                      "spills _toy_gemm[bf16; BM=67; num_warps=4]"]
    assert "400 FLOP/B" in got[0].detail and "8 B spill stores" in got[1].detail


# ----------------------------------------------------------------------------------------------
# on the real recording and builds (shared with test_compile_gate: recorded and built once per session)


@pytest.fixture(scope="module")
def analysis():
    rec_path = lr.cached_recording()
    proc, path = sr.cached_gate(rec_path)
    assert os.path.exists(path), proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(path) as f:
        gj = json.load(f)
    return sr.Analysis(lr.load_raw(rec_path), gj), gj, rec_path, path


def test_known_violations_ratchet(analysis):
    a, gj, _, _ = analysis
    got = {v.key(): v for v in sr.rule_violations(a, gj, 90)}
    known = set(sr.load_known(KNOWN))
    new = sorted(set(got) - known)
    fixed = sorted(known - set(got))
    assert not new, "new rule violations (fix the kernel, never extend the list):\n" + "\n".join(
        f"{k}: {got[k].detail}" for k in new)
    assert not fixed, f"no longer violated: delete these lines from {KNOWN}:\n" + "\n".join(fixed)


def test_every_kernel_with_dots_has_a_flop_model(analysis):
    """Without one a GEMM kernel's intensity would read 0 and it would escape the no-wgmma rule."""
    a, _, _, _ = analysis
    gemms = {sr.kernel_name(s.kernel) for s in a.specs if s.dots}
    assert gemms and gemms <= set(sr.FLOP_MODELS), f"add FLOP models to ftkernels/static_report.py for " \
                                                   f"{sorted(gemms - set(sr.FLOP_MODELS))}"
    for i, l in enumerate(a.launches):
        if sr.kernel_name(l.kernel) in gemms:
            assert sr.launch_flops(l) > 0, l


def test_flop_models_agree_with_the_benchmarks_counts(analysis):
    """Forward GEMM FLOPs from the launches (kernels with tl.dot) = the benchmark's own count, per case; the
    plain-PyTorch composition's GEMM FLOPs too."""
    import importlib
    a, gj, _, _ = analysis
    dots = {(i, b["arch"]) for b, r in zip(gj["builds"], gj["results"]) if r.get("dots") for i in b["launches"]}
    checked = 0
    for name in ("multichannel_linear", "squared_relu_ffn", "multichannel_attention"):
        mod = importlib.import_module(f"benchmarks.test_bench_{name}")
        for dims in mod.GPU:
            label = f"bench:{mod.OP}:fwd:{mod.size_label(*dims).replace(' ', '_')}"
            idx = [i for i in a.select(label, "bf16") if i in a.picked(90)]  # an autotuned call once
            if not idx:
                continue
            expected = mod.problem(dims, "meta", __import__("torch").bfloat16).flops
            got = sum(sr.launch_flops(a.launches[i]) for i in idx if (i, 90) in dots)
            assert got == pytest.approx(expected, rel=1e-9), (label, got, expected)
            calls = [c for c in a.ops if c["workload"] == label and c["dtype"] == "bf16"]
            pieces = [p for c in calls for p in sr.torch_composition(c) if p.kind in ("gemm", "sdpa_fwd")]
            assert sum(p.flops for p in pieces) == pytest.approx(expected, rel=1e-9), label
            checked += 1
    assert checked >= 10


def test_report_for_the_channels32_step(analysis, tmp_path):
    a, gj, rec_path, gate_path = analysis
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    assert sr.main(["--launches", rec_path, "--gate-json", gate_path, "--workload", "channels32",
                    "--markdown", str(md), "--json", str(js)]) == 0
    text = md.read_text()
    assert "Static analysis and prediction, not a measurement" in text
    for cls in ("multichannel linear", "squared-ReLU feed-forward", "frame norm", "attention", "total (ops only)"):
        assert cls in text
    report = json.loads(js.read_text())
    (w, data), = report["workloads"].items()
    assert w == "step:channels32:B8xW256"
    p = data["prediction"]
    assert p["roofline_s"] < p["triton_s"] and p["pytorch_s"] > 0
    # every launch counted once (an autotuned call: its predicted pick among the configs, all of them gated)
    assert sum(s["launches"] for s in data["specializations"]) == len(set(a.select(w, "bf16")) & a.picked(90))
    # every launch of every workload: the prediction never beats the lower bound
    for i in range(len(a.launches)):
        c = a.launch_cost(i, 90)
        assert c["predicted_s"] >= c["roofline_s"] > 0 or c["bytes"] == 0, c
