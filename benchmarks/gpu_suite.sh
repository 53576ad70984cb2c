#!/usr/bin/env bash
# Everything a lent GPU should run, in one call: build with CUDA, the whole test suite on CUDA (bf16
# included), the benchmarks at realistic shapes, and the markdown tables. Logs and JSON go to $OUT
# (the device tool brings that folder back); JSON is also left in benchmarks/results/ to commit.
#   device tool:  bash benchmarks/gpu_suite.sh   (add --skip-tests to run only the benchmarks)
set -uo pipefail
OUT=${OUT:-$PWD/gpu-suite-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/device.txt" 2>&1

FASTKD_FORCE_CUDA=1 $PY -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 \
  || { tail -40 "$OUT/install.log"; exit 1; }
$PY -c "import fastkd; print('fastkd extension:', fastkd.extension_info())" | tee -a "$OUT/device.txt"

status=0
if [[ "${1:-}" != "--skip-tests" ]]; then
  $PY -m pytest tests -q -rs -p no:cacheprovider > "$OUT/tests.log" 2>&1 || status=1
  tail -15 "$OUT/tests.log"
  cp "$OUT/tests.log" benchmarks/results/tests-cuda.log
fi
$PY -m pytest benchmarks --benchmark -q -p no:cacheprovider --benchmark-columns=median,iqr,rounds \
  > "$OUT/benchmarks.log" 2>&1 || status=1
grep -E "wrote|passed|failed|error" "$OUT/benchmarks.log" | tail -10
cp benchmarks/results/*.json "$OUT/" 2>/dev/null
$PY benchmarks/make_table.py > "$OUT/tables.md" && cat "$OUT/tables.md"
exit $status
