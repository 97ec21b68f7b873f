#!/usr/bin/env bash
# The GPU check sized for a short device lease: one call of under ten minutes, most valuable step first,
# every step time-boxed (SIGINT, so pytest still writes its partial reports) and everything kept.
#
#   bash scripts/gpu_check_lease.sh [DEST]     # DEST default benchmarks/results/<date>-<gpu>-lease
#   BUDGET=520 (seconds, all steps together), PYTHON=python3, TEST_WORKERS=12
#
# Steps, in order (scripts/gpu_check.sh is the full, hour-long version):
#   1. device.json, nvidia-smi.txt
#   2. ops:      pytest benchmarks/ --benchmark for the four ops, every GPU size, eager baselines + ftkernels
#                (each case is also checked against the float64 reference at model size)
#   3. model:    one training step and a 30 s song at the v4 and default presets, reference vs ftkernels (eager)
#   4. compile:  the torch.compile rows of the four ops
#   5. tests:    the kernel and model test files on CUDA (real fp16/bf16, model-size shapes), pytest-xdist
# Each step writes <step>.log, its benchmark results folder and the autotuner's picks (autotune-<step>.json).
# DEST/results.tgz holds the lot (the device tool returns at most 8 files); summary.md is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${BUDGET:-520}
T0=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check_lease: no CUDA device visible to torch ($PY); run this on a machine with an NVIDIA GPU" >&2
    exit 2
fi
GPU=$("$PY" -m benchmarks.gpu_check slug)
DEST=${1:-benchmarks/results/$(date +%Y-%m-%d)-$GPU-lease}
mkdir -p "$DEST"
declare -A RC

# step NAME CAP_SECONDS CMD...: run CMD with at most CAP seconds (less if the budget runs short)
step() {
    local name=$1 cap=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - T0) - 25 ))
    (( cap > left )) && cap=$left
    if (( cap < 20 )); then
        echo "== $name: skipped, budget spent"; RC[$name]=skipped; return
    fi
    echo "== $name (at most ${cap}s): $*"
    local t=$(date +%s)
    timeout -s INT -k 20 "$cap" "$@" > "$DEST/$name.log" 2>&1
    RC[$name]=$?
    echo "== $name: rc ${RC[$name]} in $(( $(date +%s) - t ))s; $(tail -n 1 "$DEST/$name.log")"
}

bench() {  # bench NAME CAP PYTEST-ARGS...
    local name=$1 cap=$2; shift 2
    mkdir -p "$DEST/$name"
    step "$name" "$cap" env FTBENCH_RESULTS_DIR="$DEST/$name" FTBENCH_ROWS_LOG="$DEST/$name/rows.jsonl" \
        FTKERNELS_AUTOTUNE_OUT="$DEST/autotune-$name.json" \
        "$PY" -m pytest -p benchmarks.gpu_check -p no:cacheprovider --benchmark -q -rs "$@"
}

"$PY" -m benchmarks.gpu_check info "$DEST/device.json"
{ nvidia-smi; nvidia-smi -q; } > "$DEST/nvidia-smi.txt" 2>&1 || true

OPS=(benchmarks/test_bench_frame_norm.py benchmarks/test_bench_multichannel_attention.py
     benchmarks/test_bench_multichannel_linear.py benchmarks/test_bench_squared_relu_ffn.py)
bench ops 120 "${OPS[@]}" -k "not compile"
FTBENCH_MODEL_PRESETS=${FTBENCH_MODEL_PRESETS:-v4,default} bench model 90 benchmarks/test_bench_model.py -k "not compile"
bench compile 80 "${OPS[@]}" -k "compile"
TESTS=(tests/test_frame_norm.py tests/test_layouts.py tests/test_low_precision_range.py tests/test_model.py
       tests/test_multichannel_attention.py tests/test_multichannel_linear.py tests/test_nonfinite.py
       tests/test_squared_relu.py tests/test_squared_relu_ffn.py tests/test_torch_func.py
       tests/test_torch_library.py tests/test_validation.py)
step tests 400 env FTKERNELS_AUTOTUNE_OUT="$DEST/autotune-tests.json" "$PY" -m pytest -p benchmarks.gpu_check \
    -p no:cacheprovider -n "${TEST_WORKERS:-12}" -q -rfEs --tb=short --junitxml="$DEST/tests.xml" "${TESTS[@]}"

{
    echo "# GPU check (lease): $GPU, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo; echo "| step | rc | last line |"; echo "|---|---|---|"
    for s in ops model compile tests; do
        echo "| $s | ${RC[$s]:-not run} | $(tail -n 1 "$DEST/$s.log" 2>/dev/null | tr '|' '/') |"
    done
    for s in ops model compile; do
        for md in "$DEST/$s"/*.md; do
            [[ -f "$md" ]] || continue
            echo; echo "## $s: $(basename "$md")"
            sed -n '/^## Summary/,/^`median`/p' "$md"
        done
    done
    echo; echo "## failures (tests)"; grep -E "^(FAILED|ERROR)" "$DEST/tests.log" 2>/dev/null | head -40
} > "$DEST/summary.md"
tar -czf "$DEST.tgz" -C "$(dirname "$DEST")" "$(basename "$DEST")" && mv "$DEST.tgz" "$DEST/results.tgz"
cat "$DEST/summary.md"
echo "gpu_check_lease: $(( $(date +%s) - T0 ))s; files in $DEST"
