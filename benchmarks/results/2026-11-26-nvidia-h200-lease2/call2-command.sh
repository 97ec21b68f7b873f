#!/usr/bin/env bash
set -uo pipefail
D=/tmp/g2; mkdir -p $D; T0=$(date +%s)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; unset TRITON_INTERPRET
timeout -s INT -k 10 85 python3 .lease/diag.py > $D/diag.log 2>&1; echo "== diag rc $? $(( $(date +%s)-T0 ))s"
cat $D/diag.log | grep -v "^  File\|^    " | head -60
left=$(( 275 - ($(date +%s)-T0) ))
timeout -s INT -k 10 $left python3 -m pytest -p benchmarks.gpu_check -p no:cacheprovider -n 14 -q -rfEs --tb=short --junitxml=$D/tests2.xml \
  tests/test_torch_library.py tests/test_validation.py tests/test_multichannel_attention.py tests/test_model.py \
  "tests/test_multichannel_linear.py::test_split_k_partials_match_reference" "tests/test_multichannel_linear.py::test_cpu_auto_backend_is_reference" \
  tests/test_squared_relu_ffn.py > $D/tests2.log 2>&1; echo "== tests rc $? $(( $(date +%s)-T0 ))s: $(tail -n1 $D/tests2.log)"
grep -E "^(FAILED|ERROR)" $D/tests2.log | head -40
cp $D/diag.log $D/tests2.log $D/tests2.xml $OUT/ 2>/dev/null; echo "total $(( $(date +%s)-T0 ))s"
