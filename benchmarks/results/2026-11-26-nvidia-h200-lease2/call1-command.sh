#!/usr/bin/env bash
# lease 2: tests first (issue 9's fixes on CUDA), then fwd+bwd with the compile baseline, then the v4 train step
set -uo pipefail
D=/tmp/gl; mkdir -p $D; T0=$(date +%s)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; unset TRITON_INTERPRET
python3 -m benchmarks.gpu_check info $D/device.json
step() { local n=$1 cap=$2; shift 2; local left=$(( ${BUDGET:-530} - ($(date +%s)-T0) - 15 )); ((cap>left)) && cap=$left
  ((cap<20)) && { echo "== $n skipped"; return; }
  local t=$(date +%s); timeout -s INT -k 15 $cap "$@" > $D/$n.log 2>&1; echo "== $n rc $? $(( $(date +%s)-t ))s: $(tail -n1 $D/$n.log)"; }
TESTS=(tests/test_frame_norm.py tests/test_layouts.py tests/test_low_precision_range.py tests/test_model.py
 tests/test_multichannel_attention.py tests/test_multichannel_linear.py tests/test_nonfinite.py tests/test_squared_relu.py
 tests/test_squared_relu_ffn.py tests/test_torch_func.py tests/test_torch_library.py tests/test_validation.py)
step tests 230 env FTKERNELS_AUTOTUNE_OUT=$D/autotune-tests.json python3 -m pytest -p benchmarks.gpu_check -p no:cacheprovider -n 14 -q -rfEs --tb=short --junitxml=$D/tests.xml "${TESTS[@]}"
mkdir -p $D/fb $D/model
step fwd_bwd 170 env FTBENCH_RESULTS_DIR=$D/fb FTBENCH_ROWS_LOG=$D/fb-rows.jsonl FTKERNELS_AUTOTUNE_OUT=$D/autotune-fb.json python3 -m pytest -p benchmarks.gpu_check -p no:cacheprovider --benchmark -q -rs -k "fwd+bwd" benchmarks/test_bench_frame_norm.py benchmarks/test_bench_multichannel_attention.py benchmarks/test_bench_multichannel_linear.py benchmarks/test_bench_squared_relu_ffn.py
step model 200 env FTBENCH_MODEL_PRESETS=v4 FTBENCH_RESULTS_DIR=$D/model FTBENCH_ROWS_LOG=$D/model-rows.jsonl FTKERNELS_AUTOTUNE_OUT=$D/autotune-model.json python3 -m pytest -p benchmarks.gpu_check -p no:cacheprovider --benchmark -q -rs -k "train_step and not compile" benchmarks/test_bench_model.py
grep -E "^(FAILED|ERROR)" $D/tests.log | head -30
tar -czf $OUT/gl.tgz -C /tmp gl; cp $D/tests.log $D/fb-rows.jsonl $D/model-rows.jsonl $OUT/ 2>/dev/null
echo "total $(( $(date +%s)-T0 ))s"
