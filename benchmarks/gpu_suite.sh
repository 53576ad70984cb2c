#!/usr/bin/env bash
# The GPU check for a lent machine, bounded in wall time: at most 8 minutes (--quick: 3), its own start excluded.
# For a bare machine with torch, triton, pytest and pytest-benchmark preinstalled and no network. Logs, JSON and a
# summary go to $OUT (the device tool brings that folder back); benchmark JSON is also left in benchmarks/results/.
#
#   bash benchmarks/gpu_suite.sh            install (CUDA extension for this GPU's architecture only), every kernel
#                                           once against float64 (benchmarks/gpu_check.py), the CUDA tests (every op,
#                                           fp32/fp16/bf16, the odd shapes), the realistic-shape benchmarks per op
#   bash benchmarks/gpu_suite.sh --quick    install and the one-check-per-kernel script only
#
# Every step runs under `timeout` with a cap, and never past what is left of the budget, so the whole is bounded
# whatever a step does; a step cut short says so in $OUT/summary.txt (its log keeps what it printed). Estimate
# (README, "GPU check"): install ~1-2 min (2 CUDA and 6 C++ files in parallel), checks ~20 Triton compilations,
# tests and benchmarks up to their caps.
set -uo pipefail
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1
BUDGET=$(( QUICK ? 170 : 460 ))  # seconds; under 3 and 8 minutes, leaving room for `timeout -k` and this script
OUT=${OUT:-$PWD/gpu-suite-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
START=$SECONDS
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
status=0

# step NAME CAP COMMAND...: run COMMAND for at most CAP seconds and never past the budget; log to $OUT/NAME.log
step() {
  local name=$1 cap=$2
  shift 2
  local left=$(( BUDGET - (SECONDS - START) ))
  (( cap > left )) && cap=$left
  if (( cap < 10 )); then
    echo "$name: skipped, budget spent" | tee -a "$SUMMARY"
    status=1
    return 1
  fi
  local began=$SECONDS
  timeout -k 5 "$cap" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local note="exit $rc"
  (( rc == 124 || rc == 137 )) && note="CUT at its cap of $cap s"
  echo "$name: $note, $(( SECONDS - began )) s (total $(( SECONDS - START )) s of $BUDGET)" | tee -a "$SUMMARY"
  (( rc == 0 )) || status=1
  return $rc
}

step device 20 bash -c "nvidia-smi; $PY -c \"import sys, torch, triton; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'triton', triton.__version__, 'gpu', torch.cuda.get_device_name(), \
'capability', torch.cuda.get_device_capability())\""
ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "8.0;9.0")

# the extension for this GPU only (one nvcc pass per .cu file), every file compiled in parallel
if ! step install 150 env FASTKD_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" \
    $PY -m pip install --no-build-isolation --no-deps --no-index -e .; then
  tail -30 "$OUT/install.log"
  exit 1
fi
step extension 30 $PY -c "import fastkd; print('fastkd extension:', fastkd.extension_info())"

step gpu_check 90 $PY -m benchmarks.gpu_check --jobs 8 --out "$OUT/gpu_check.json"
tail -25 "$OUT/gpu_check.log"

if (( ! QUICK )); then
  # CUDA-parametrised tests only (the CPU and interpreter ones run in CI); -x off: see every failure
  # pytest-xdist (on the lent image) spreads them over 8 processes: their time is mostly Triton compilation, one
  # CPU core each; correctness tests may share the GPU
  parallel=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  step tests 150 $PY -m pytest tests -q -rfEs -p no:cacheprovider -k cuda --durations=10 $parallel
  tail -15 "$OUT/tests.log"
  cp "$OUT/tests.log" benchmarks/results/tests-cuda.log 2>/dev/null
  # warm Triton's on-disk cache first: every benchmark case once, untimed, over 8 processes (compilation takes one
  # core per kernel; the timed runs below then find every kernel compiled)
  [[ -n "$parallel" ]] && step bench_warmup 100 $PY -m pytest benchmarks --benchmark --benchmark-disable -q \
    -p no:cacheprovider -k "not torch_compile" $parallel
  # one process per op so that each writes its JSON even if a later one is cut; torch.compile baselines are left
  # out (their compilation alone takes minutes at these shapes)
  ops=(tat_attention_loss masked_pairwise_huber binary_kl_div box_ops host_overhead)
  for i in "${!ops[@]}"; do
    op=${ops[$i]}
    left=$(( BUDGET - (SECONDS - START) ))
    share=$(( left / (${#ops[@]} - i) ))
    step "bench_$op" "$share" $PY -m pytest "benchmarks/test_bench_$op.py" --benchmark -q -p no:cacheprovider \
      -k "not torch_compile" --benchmark-max-time=0.2 --benchmark-min-rounds=3 --benchmark-columns=median,iqr,rounds
    grep -E "wrote|passed|failed|error" "$OUT/bench_$op.log" | tail -3
  done
  cp benchmarks/results/*.json "$OUT/" 2>/dev/null
  $PY benchmarks/make_table.py > "$OUT/tables.md" 2>&1 && tail -40 "$OUT/tables.md"
fi
echo "total $(( SECONDS - START )) s of a $BUDGET s budget" | tee -a "$SUMMARY"
cat "$SUMMARY"
exit $status
