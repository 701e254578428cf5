#!/usr/bin/env bash
# bench/train_overhead.sh: issue 4's telemetry overhead on the MNIST CNN
# step (bench/train_overhead.lua), at the thread settings of bench/train.sh
# (keel's threads are OpenBLAS's), 1 thread then 2. Prints
#   RESULT name=overhead_<setting>_t<threads> value=<ratio> unit=x
# env: BENCH_SCALE, BENCH_OVH_ROUNDS, BENCH_OVH_STEPS, BENCH_THREADS ("1 2")
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/.build
mkdir -p "$OUT"
gcc -O2 -shared -fPIC -I/usr/include/lua5.4 bench/benchlib.c -o "$OUT/benchlib.so"
[ -f build/release/lua/keel/core.so ] || tools/build.sh release >/dev/null
for t in ${BENCH_THREADS:-1 2}; do
  OMP_NUM_THREADS=$t OPENBLAS_NUM_THREADS=$t lua5.4 bench/train_overhead.lua |
    sed -u -E "s/^(RESULT name=overhead_[a-z0-9_]+)/\1_t$t/"
done
