#!/usr/bin/env bash
# tools/test.sh [release|asan|debug]  (default: $KEEL_CONFIG, else release)
# Builds that configuration (incrementally), runs the busted specs in tests/
# against build/<config>/lua/keel/core.so, then the C test keel_ctest, and
# ends with one line: "N passed, N failed" (totals). Exits non-zero when
# anything failed or nothing ran. Before it, a line
# "cuda: N device(s), M GPU tests skipped" (GPU tests skip visibly).
#
# After keel_ctest, the simulator's self-test build/<config>/bin/kcsim_test
# (tests/sim/) runs, its counts in the totals too.
# After the normal passes, the tests/cuda*_spec.lua files run again with
# KEEL_CUDA_PLUGIN set to the CPU simulator plugin (kernels/sim/), so the
# CUDA kernels are tested on any machine; their counts join the totals and
# a line "cuda-sim: N passed, N failed" reports them.
# KEEL_CUDA_SIM=1 makes the simulator the CUDA device for the whole run
# (with KEEL_DEVICE=cuda: every spec on CUDA tensors, on the CPU);
# KEEL_CUDA_SIM=only runs the simulator pass alone. KEEL_CUDA_SIM_ORDER
# (reverse, shuffle[:seed]; kernels/sim/kcsim.h) reorders the simulator's
# blocks and threads: a kernel with a race gives other results.
# KEEL_CUDA_SIM_ASYNC=1 keeps queued work queued until the host waits
# (kernels/sim/sim_stream.cpp): a missing wait gives other results.
#
# KEEL_DEVICE=cuda tools/test.sh runs the same specs with CUDA as the
# default device of the creation functions. Without a usable GPU it says
# so and why, and runs the CPU suite instead (the counts are the CPU
# run's, the exit status too): a CPU-only machine stays green.
#
# On a machine without premake, Lua or busted (the GPU machine), the
# bundle of tools/gpu_bundle.sh runs this same script with KEEL_NO_BUILD=1
# (use build/<config> as it is), KEEL_LUA (the interpreter: the keel
# executable), KEEL_BUSTED (busted's runner script) and KEEL_LUA_PATH /
# KEEL_LUA_CPATH (where busted's modules are).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
root=$PWD

cfg=${1:-${KEEL_CONFIG:-release}}
case "$cfg" in
  release|debug|asan) ;;
  *) echo "usage: tools/test.sh [release|asan|debug]" >&2; exit 2 ;;
esac

if [ -z "${KEEL_NO_BUILD:-}" ]; then
  tools/build.sh "$cfg" || { echo "test: build of $cfg failed" >&2; echo "0 passed, 1 failed"; exit 1; }
fi
lua=${KEEL_LUA:-lua5.4}
busted=${KEEL_BUSTED:-/usr/bin/busted}

# KEEL_CUDA_SIM=1: the whole run on the CUDA simulator (the probe below
# then finds its one device; with KEEL_DEVICE=cuda every spec runs with
# CUDA tensors by default, their kernels on the CPU).
sim_lib="$root/build/$cfg/lib/libkeel_cuda_sim.so"
sim_all=
sim_only=
if [ "${KEEL_CUDA_SIM:-}" = only ]; then
  [ -f "$sim_lib" ] || { echo "test: KEEL_CUDA_SIM=only: $sim_lib was not built" >&2; echo "0 passed, 1 failed"; exit 1; }
  sim_only=1
elif [ -n "${KEEL_CUDA_SIM:-}" ] && [ "${KEEL_CUDA_SIM}" != 0 ]; then
  [ -f "$sim_lib" ] || { echo "test: KEEL_CUDA_SIM: $sim_lib was not built" >&2; echo "0 passed, 1 failed"; exit 1; }
  export KEEL_CUDA_PLUGIN="$sim_lib"
  sim_all=1
  echo "test: KEEL_CUDA_SIM: CUDA is the CPU simulator ($sim_lib) for the whole run"
fi

# What CUDA this machine offers, asked of the keel executable (it carries
# its own Lua and finds the plugin beside itself): device count, reason.
probe=$(KEEL_DEVICE= ASAN_OPTIONS=detect_leaks=0 "build/$cfg/bin/keel" -e '
  local ok, why = keel.cuda.is_available()
  io.write(keel.cuda.device_count(), "\t", ok and "" or why, "\n")' 2>&1 | tail -n 1)
cuda_devices=${probe%%$'\t'*}
cuda_why=${probe#*$'\t'}
[[ "$cuda_devices" =~ ^[0-9]+$ ]] || { cuda_why="probe failed: $probe"; cuda_devices=0; }
case "${KEEL_DEVICE:-}" in
  ""|cpu) ;;
  cuda|cuda:0)
    if [ "$cuda_devices" -gt 0 ]; then
      echo "test: KEEL_DEVICE=$KEEL_DEVICE: the specs run with CUDA as the default device"
    else
      echo "test: KEEL_DEVICE=$KEEL_DEVICE: GPU run skipped, CUDA is not available: $cuda_why"
      echo "test: running the CPU suite instead"
      unset KEEL_DEVICE
    fi ;;
  *) echo "test: KEEL_DEVICE=$KEEL_DEVICE: expected cpu, cuda or cuda:0" >&2; echo "0 passed, 1 failed"; exit 1 ;;
esac

passed=0
failed=0
log=$(mktemp -t keel-test.XXXXXX)
trap 'rm -f "$log"' EXIT

# ---------------------------------------------------------------- busted
# lua5.4 explicitly: busted's shebang is `env lua`, which may be another Lua.
unset LUA_PATH_5_4 LUA_CPATH_5_4 LUA_INIT LUA_INIT_5_4
export LUA_PATH="bindings/?.lua;bindings/?/init.lua;tests/?.lua;${KEEL_LUA_PATH:+$KEEL_LUA_PATH;};"
export LUA_CPATH="build/$cfg/lua/?.so;${KEEL_LUA_CPATH:+$KEEL_LUA_CPATH;};"
export KEEL_BIN="$root/build/$cfg/bin/keel"

busted_env=()
if [ "$cfg" = asan ]; then
  # lua5.4 itself is not instrumented: the ASan runtime must come first.
  # Leaks are not checked here (the interpreter's own exit is not clean);
  # keel_ctest below runs with leak detection on.
  busted_env=(
    "LD_PRELOAD=$(gcc -print-file-name=libasan.so)"
    "ASAN_OPTIONS=detect_leaks=0:abort_on_error=0"
    "UBSAN_OPTIONS=print_stacktrace=1"
  )
fi

# One busted run per spec file: a crash (or an ASan abort) in one file
# costs that file's count, not the whole run's.
# One spec file: adds its counts to passed/failed/pending (and, with
# count_gpu, its GPU skips to gpu_skipped); extra arguments are
# environment settings for it.
run_spec() {
  local spec=$1 label=$2 count_gpu=$3
  shift 3
  echo "test: busted $spec ($label)"
  env "${busted_env[@]}" "$@" "$lua" "$busted" --lang=en -o plainTerminal "$spec" 2>&1 | tee "$log"
  local brc=${PIPESTATUS[0]} summary s f e p gs ub
  summary=$(grep -E '^[0-9]+ success(es)? / [0-9]+ failures? / [0-9]+ errors? / [0-9]+ pending' "$log" | tail -n 1)
  if [ -n "$summary" ]; then
    read -r s f e p <<<"$(echo "$summary" | sed -E 's#^([0-9]+) [a-z]+ / ([0-9]+) [a-z]+ / ([0-9]+) [a-z]+ / ([0-9]+) .*#\1 \2 \3 \4#')"
    passed=$((passed + s))
    failed=$((failed + f + e))
    pending=$((pending + p))
    # GPU tests skipped without a GPU: pending tests named "... [gpu]" (helper.lua)
    if [ "$count_gpu" = 1 ]; then
      gs=$(grep -c ' \[gpu\]$' "$log" || true)
      gpu_skipped=$((gpu_skipped + gs))
    fi
    if [ "$brc" -ne 0 ] && [ $((f + e)) -eq 0 ]; then
      echo "test: $spec: busted exited with status $brc despite no failures" >&2
      failed=$((failed + 1))
    fi
  else
    echo "test: $spec: busted printed no summary (exit status $brc): counted as 1 failure" >&2
    failed=$((failed + 1))
  fi
  # UBSan reports and goes on: count each report as a failure.
  if [ "$cfg" = asan ]; then
    ub=$(grep -c 'runtime error:' "$log" || true)
    if [ "$ub" -gt 0 ]; then
      echo "test: $spec: $ub UBSan report(s)" >&2
      failed=$((failed + ub))
    fi
  fi
}

specs=$(find tests -name '*_spec.lua' | sort)
[ -n "$specs" ] || echo "test: no tests/*_spec.lua found" >&2
pending=0
gpu_skipped=0
[ -n "$sim_only" ] && specs=
for spec in $specs; do
  run_spec "$spec" "$cfg" 1
done
[ "$pending" -gt 0 ] && echo "test: busted: $pending pending (not counted)"

# ------------------------------------------------------------- C test programs
# A test program that ends with its own "N passed, N failed" line (with
# leak detection and UBSan reports counted under asan): adds its counts.
run_ctest() {
  local bin=$1 name
  name=$(basename "$bin")
  echo "test: $bin"
  if [ ! -x "$bin" ]; then
    echo "test: $bin was not built" >&2
    failed=$((failed + 1))
    return
  fi
  ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 "$bin" 2>&1 | tee "$log"
  local rc=${PIPESTATUS[0]} line cp cf ub
  line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$log" | tail -n 1)
  if [ -n "$line" ]; then
    read -r cp _ cf _ <<<"$line"
    passed=$((passed + cp))
    failed=$((failed + cf))
    if [ "$rc" -ne 0 ] && [ "$cf" -eq 0 ]; then
      echo "test: $name exited with status $rc" >&2
      failed=$((failed + 1))
    fi
  else
    echo "test: $name printed no summary (exit status $rc)" >&2
    failed=$((failed + 1))
  fi
  if [ "$cfg" = asan ]; then
    ub=$(grep -c 'runtime error:' "$log" || true)
    failed=$((failed + ub))
  fi
}

# keel_ctest: the engine's C API (tests/c/).
if [ -n "$sim_only" ]; then
  echo "test: KEEL_CUDA_SIM=only: the CPU specs and keel_ctest skipped"
elif compgen -G "tests/c/*.c" >/dev/null; then
  run_ctest "build/$cfg/bin/keel_ctest"
else
  echo "test: no tests/c/*.c, keel_ctest skipped"
fi

# kcsim_test: the simulator's self-test (tests/sim/, built with the
# simulator): its scheduling, failure reports, shuffles, shared memory and
# queued work, pinned down by small kernels. Runs with KEEL_CUDA_SIM=only
# too; not with KEEL_CUDA_SIM=0 (a GPU machine, whose bundle does not
# carry it).
if [ "${KEEL_CUDA_SIM:-}" = 0 ]; then
  echo "test: KEEL_CUDA_SIM=0: kcsim_test skipped"
elif compgen -G "tests/sim/*.cu" >/dev/null; then
  run_ctest "build/$cfg/bin/kcsim_test"
fi

# ---------------------------------------------------------------- simulator
# The CUDA specs (tests/cuda_spec.lua, tests/cuda_*_spec.lua) again, their
# kernels run by the CPU simulator (build/<cfg>/lib/libkeel_cuda_sim.so,
# kernels/sim/): the CUDA code path checked without a GPU. Skipped when
# the whole run is on the simulator (KEEL_CUDA_SIM=1), and with
# KEEL_CUDA_SIM=0 (a GPU machine: the specs ran on the GPU already).
sim_line=
if [ "${KEEL_CUDA_SIM:-}" = 0 ]; then
  sim_line="cuda-sim: not run (KEEL_CUDA_SIM=0)"
elif [ -z "$sim_all" ] && [ -f "$sim_lib" ]; then
  sim_p0=$passed sim_f0=$failed
  for spec in $(find tests -name 'cuda_*spec.lua' | sort); do
    run_spec "$spec" "$cfg, CUDA simulator" 0 "KEEL_CUDA_PLUGIN=$sim_lib" KEEL_CUDA_SIM_QUIET=1
  done
  sim_line="cuda-sim: $((passed - sim_p0)) passed, $((failed - sim_f0)) failed (kernels on the CPU simulator${KEEL_CUDA_SIM_ORDER:+, order $KEEL_CUDA_SIM_ORDER}${KEEL_CUDA_SIM_ASYNC:+, queued work runs at waits})"
elif [ -z "$sim_all" ]; then
  sim_line="cuda-sim: not run ($sim_lib was not built)"
fi
[ -n "$sim_line" ] && echo "$sim_line"

echo "cuda: $cuda_devices device(s), $gpu_skipped GPU tests skipped${cuda_why:+ ($cuda_why)}"
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ $((passed + failed)) -gt 0 ]
