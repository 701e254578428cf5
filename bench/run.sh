#!/usr/bin/env bash
# bench/run.sh: builds the C peers, runs every keel benchmark, prints
#   RESULT name=<name> value=<number> unit=<unit>
# lines, each name once, at the end (after '#' comment lines for humans:
# progress, spreads, target checks). See bench/README.md.
#
# env:
#   KEEL_CPATH       Lua cpath pattern or directory of keel/core.so
#                    (default: build/release/lua, then /tmp/kb/lua)
#   KEEL_LIB         libkeel.a for the engine-only overhead peer
#                    (default: found beside the keel.core in use)
#   KEEL_PYTHON      python with torch for the PyTorch comparison
#                    (default: python3, then /usr/bin/python3; "none" skips it)
#   BENCH_SCALE      scales iteration counts (0.2 for a smoke run)
#   BENCH_ONLY       space-separated subset of: matmul elementwise overhead
set -euo pipefail
cd "$(dirname "$0")/.."

LUA=${LUA:-lua5.4}
CC=${CC:-gcc}
LUAINC=${LUAINC:-$(pkg-config --cflags lua5.4 2>/dev/null || echo -I/usr/include/lua5.4)}
OUT=bench/.build
mkdir -p "$OUT"
RAW=$OUT/raw.log
: > "$RAW"
only=" ${BENCH_ONLY:-matmul elementwise overhead} "
t_start=$(date +%s)

say() { echo "$@" | tee -a "$RAW"; }
# runs a benchmark: its lines go to the raw log, and to the terminal with
# its RESULT lines commented out ("# raw RESULT ..."): the summary at the
# end prints each RESULT name once (the median over rounds)
bench() { "$@" 2>&1 | tee -a "$RAW" | sed -u 's/^RESULT /# raw RESULT /'; }

# --- keel: find a loadable keel.core (build it once if there is none) -----
keel_cpath() {
  "$LUA" -e 'arg = {[0] = "bench/run.sh"}; package.path = "bench/?.lua;" .. package.path
             local ok, B = pcall(require, "common"); if ok then print(B.keel_cpath) end' 2>/dev/null || true
}
cpath=$(keel_cpath)
if [ -z "$cpath" ] && [ -z "${KEEL_CPATH:-}" ] && [ -x tools/build.sh ]; then
  say "# no loadable keel.core: running tools/build.sh release"
  tools/build.sh release >"$OUT/build.log" 2>&1 || say "# tools/build.sh failed, see $OUT/build.log"
  cpath=$(keel_cpath)
fi
if [ -z "$cpath" ]; then
  echo "bench: no loadable keel.core (tools/build.sh release, or set KEEL_CPATH)" >&2
  exit 1
fi
export KEEL_CPATH=$cpath
say "# keel.core: $cpath"

# libkeel.a beside that module: <dir>/../lib/libkeel.a (project build) or
# <dir>/../libkeel.a (quick build)
kdir=$(dirname "$cpath")
lib=${KEEL_LIB:-}
if [ -z "$lib" ]; then
  for c in "$kdir/../lib/libkeel.a" "$kdir/../libkeel.a" build/release/lib/libkeel.a; do
    if [ -f "$c" ]; then lib=$c; break; fi
  done
fi

# --- C peers ---------------------------------------------------------------
CFLAGS="-O2 -Wall -Wextra"
$CC $CFLAGS -shared -fPIC $LUAINC bench/benchlib.c -o $OUT/benchlib.so
$CC $CFLAGS -shared -fPIC $LUAINC bench/blas_direct.c -o $OUT/blas_direct.so -lopenblas
$CC $CFLAGS -DBLAS_DIRECT_MAIN bench/blas_direct.c -o $OUT/blas_direct -lopenblas
$CC $CFLAGS -shared -fPIC $LUAINC bench/elementwise_peer.c -o $OUT/elementwise_peer.so
have_engine_peer=0
if [ -n "$lib" ] && $CC $CFLAGS -Iengine bench/overhead_c.c "$lib" -lopenblas -lm -o $OUT/overhead_c 2>>"$OUT/build.log"; then
  have_engine_peer=1
  say "# libkeel.a: $lib"
else
  say "# libkeel.a not found or did not link: skipping the engine-only overhead peer"
fi

# --- PyTorch (optional) ----------------------------------------------------
py=""
if [ "${KEEL_PYTHON:-}" != none ]; then
  for p in ${KEEL_PYTHON:-python3 /usr/bin/python3}; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" >/dev/null 2>&1; then py=$p; break; fi
  done
fi

say "# machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"

# --- matmul: OpenBLAS 1 and 2 threads, keel and peer in the same process ---
if [[ $only == *" matmul "* ]]; then
  for t in 1 2; do
    OPENBLAS_NUM_THREADS=$t bench "$LUA" bench/matmul.lua
  done
fi

# --- elementwise: single thread (keel's loops are single-threaded) ---------
if [[ $only == *" elementwise "* ]]; then
  OPENBLAS_NUM_THREADS=1 bench "$LUA" bench/elementwise.lua
fi

# --- per-op overhead; with PyTorch: two alternating rounds -----------------
if [[ $only == *" overhead "* ]]; then
  export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
  if [ -n "$py" ]; then
    say "# PyTorch: $py ($("$py" -c 'import torch; print(torch.__version__)'))"
    for round in 1 2; do
      BENCH_OVH_REPS=3 bench "$LUA" bench/overhead.lua
      [ $have_engine_peer = 1 ] && bench $OUT/overhead_c 3 "$(awk -v s="${BENCH_SCALE:-1}" 'BEGIN{printf "%d", 300000*s}')"
      BENCH_OVH_REPS=3 BENCH_OVH_N=${BENCH_TORCH_N:-100000} BENCH_OVH_N_LINEAR=${BENCH_TORCH_N_LINEAR:-5000} \
        bench "$py" bench/overhead_torch.py
    done
  else
    say "# PyTorch not available: no torch ratios"
    bench "$LUA" bench/overhead.lua
    [ $have_engine_peer = 1 ] && bench $OUT/overhead_c 5 "$(awk -v s="${BENCH_SCALE:-1}" 'BEGIN{printf "%d", 300000*s}')"
  fi
  unset OPENBLAS_NUM_THREADS OMP_NUM_THREADS
fi

echo
echo "# ===== summary (medians over rounds; raw log: $RAW) ====="
"$LUA" bench/summarize.lua < "$RAW"
echo "# total wall time: $(( $(date +%s) - t_start )) s"
