#!/usr/bin/env bash
# bench/train.sh: issue #3 training benchmarks, keel and PyTorch side by
# side in one run, at 1 and 2 threads, then ratio lines:
#   RESULT name=train_cnn_b64_t1_ratio value=... unit=x_torch   (>1: keel faster)
#   RESULT name=clip_adamw_10M_t1_ratio value=... unit=x_memcpy (target <= 1.5)
# env: KEEL_PYTHON (python with torch; default /usr/bin/python3, "none"
# skips the twin), BENCH_SCALE (iteration scale), BENCH_ONLY (subset of
# "cnn64 cnn128 lstm adamw").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/.build
mkdir -p "$OUT"
LOG=$OUT/train.log
: > "$LOG"
PY=${KEEL_PYTHON:-/usr/bin/python3}
if [ "$PY" != none ] && ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "# no torch for $PY: keel only" >&2
  PY=none
fi
gcc -O2 -shared -fPIC -I/usr/include/lua5.4 bench/benchlib.c -o "$OUT/benchlib.so"
[ -f build/release/lua/keel/core.so ] || tools/build.sh release >/dev/null

only=" ${BENCH_ONLY:-cnn64 cnn128 lstm adamw} "
# keel's threads are OpenBLAS's; PyTorch gets its best configuration from
# BASELINE.md: t intra-op threads with one BLAS thread each (giving BLAS its
# own t threads as well oversubscribes the cores and halves its speed).
run() {   # run <threads> <workload> [batch]
  local t=$1; shift
  OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t lua5.4 bench/train.lua "$@" | tee -a "$LOG"
  if [ "$PY" != none ]; then
    TORCH_THREADS=$t OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=1 "$PY" bench/train_torch.py "$@" | tee -a "$LOG"
  fi
}
for t in 1 2; do
  case "$only" in *" cnn64 "*) run $t cnn 64 ;; esac
  case "$only" in *" cnn128 "*) run $t cnn 128 ;; esac
  case "$only" in *" lstm "*) run $t lstm ;; esac
  case "$only" in *" adamw "*) run $t adamw ;; esac
done

# ratios: keel throughput / torch throughput (times: torch / keel)
awk '
  /^RESULT/ {
    split($2, n, "="); split($3, v, "="); val[n[2]] = v[2]
  }
  END {
    for (k in val) {
      if (k ~ /_keel$/ && k !~ /clip_adamw/) {
        base = substr(k, 1, length(k) - 5)
        if ((base "_torch") in val)
          printf "RESULT name=%s_ratio value=%.4g unit=x_torch\n", base, val[k] / val[base "_torch"]
      }
      if (k ~ /clip_adamw_10M_t[0-9]+_keel$/) {
        base = substr(k, 1, length(k) - 5)
        if ((base "_torch_loop") in val)
          printf "RESULT name=%s_vs_torch value=%.4g unit=x_torch_time\n", base, val[base "_torch_loop"] / val[k]
      }
    }
  }' "$LOG" | sort | tee -a "$LOG"
