#!/usr/bin/env bash
# tools/gpu_check.sh [suite|cuda|bench|all]: the checks a session with a
# lent GPU runs there, in one command, within the device tool's 10-minute
# limit. Prepare here first:
#   tools/build.sh release && tools/gpu_bundle.sh release
# then, with the device tool: carry ["build/release", "build/gpu"] and run
#   bash tools/gpu_check.sh all
# Logs go to $OUT (the device tool's folder) when it is set, else
# build/gpu-check/; the last lines of each part go to stdout.
#   suite  the whole test suite, CPU default device (CUDA specs run on the GPU)
#   cuda   the whole suite again with KEEL_DEVICE=cuda
#   bench  bench/gpu.sh (keel and PyTorch side by side)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out=${OUT:-build/gpu-check}
mkdir -p "$out"
what=${1:-all}
status=0
nvidia-smi -L 2>&1 | tee "$out/gpu.txt"
part() {   # part <name> <timeout s> <command...>
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s (log $out/$name.log)"
  grep -E "^(RESULT|cuda: |cuda-sim: |test: KEEL)|passed, .* failed|^# |^(Failure|Error) ->" "$out/$name.log" | tail -n 40
  [ $rc -eq 0 ] || status=1
}
# the CUDA specs run on the GPU here: no second pass on the simulator
case "$what" in suite|all) part suite 200 env KEEL_CUDA_SIM=0 bash build/gpu/run.sh release ;; esac
case "$what" in cuda|all) part cuda 200 env KEEL_CUDA_SIM=0 KEEL_DEVICE=cuda bash build/gpu/run.sh release ;; esac
case "$what" in bench|all) part bench 160 bash bench/gpu.sh ;; esac
exit $status
