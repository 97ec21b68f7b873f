#!/usr/bin/env bash
# One command for the first GPU: tests, benchmarks, autotuner picks and device info, in one folder to commit.
#
#   bash scripts/gpu_check.sh            # everything (about an hour on an H100, most of it the benchmarks)
#   GPU_CHECK_SKIP="benchmarks" bash scripts/gpu_check.sh     # skip steps: tests benchmarks static
#
# Writes benchmarks/results/<date>-<gpu>/:
#   device.json, nvidia-smi.txt        versions (torch, triton, CUDA, driver), GPU properties, commit
#   tests.log, tests.xml               the CUDA test suite (fp16/bf16 tolerance tests at model sizes)
#   benchmarks.log, <gpu>-<date>.*     `pytest benchmarks/ --benchmark` at every model preset (tables, plots, JSON)
#   autotune-tests.json, autotune-benchmarks.json   each autotuned kernel's best config per tuning key
#   static-report.md/.json             the static prediction for the same commit, to set beside the timings
#   README.md                          index of the above with each step's exit code
# Environment: PYTHON (default python), FTBENCH_MODEL_PRESETS (default: every preset but micro).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
SKIP=" ${GPU_CHECK_SKIP:-} "

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA device visible to torch ($PY); run this on a machine with an NVIDIA GPU" >&2
    exit 2
fi
unset TRITON_INTERPRET

GPU=$("$PY" -m benchmarks.gpu_check slug)
OUT="benchmarks/results/$(date +%Y-%m-%d)-$GPU"
mkdir -p "$OUT"
echo "gpu_check: writing $OUT"

"$PY" -m benchmarks.gpu_check info "$OUT/device.json"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
nvidia-smi -q >> "$OUT/nvidia-smi.txt" 2>&1 || true

STEPS=()

if [[ "$SKIP" != *" tests "* ]]; then
    FTKERNELS_AUTOTUNE_OUT="$OUT/autotune-tests.json" "$PY" -m pytest -p benchmarks.gpu_check tests/ -q -rs \
        --junitxml="$OUT/tests.xml" 2>&1 | tee "$OUT/tests.log"
    STEPS+=("--step" "tests=${PIPESTATUS[0]}")
fi

if [[ "$SKIP" != *" benchmarks "* ]]; then
    PRESETS=${FTBENCH_MODEL_PRESETS:-$("$PY" -c \
        "from frame_transformer.model import PRESETS; print(','.join(p for p in PRESETS if p != 'micro'))")}
    FTBENCH_RESULTS_DIR="$OUT" FTBENCH_MODEL_PRESETS="$PRESETS" FTKERNELS_AUTOTUNE_OUT="$OUT/autotune-benchmarks.json" \
        "$PY" -m pytest -p benchmarks.gpu_check benchmarks/ --benchmark -q -rs 2>&1 | tee "$OUT/benchmarks.log"
    STEPS+=("--step" "benchmarks=${PIPESTATUS[0]}")
fi

if [[ "$SKIP" != *" static "* ]]; then
    "$PY" -m ftkernels.static_report --workload step: --markdown "$OUT/static-report.md" \
        --json "$OUT/static-report.json" > "$OUT/static-report.log" 2>&1
    STEPS+=("--step" "static_report=$?")
fi

"$PY" -m benchmarks.gpu_check summary "$OUT" "${STEPS[@]}"
echo "gpu_check: done; review and commit $OUT"
for s in "${STEPS[@]}"; do
    [[ "$s" == *=0 || "$s" == "--step" ]] || exit 1
done
