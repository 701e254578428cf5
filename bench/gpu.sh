#!/usr/bin/env bash
# bench/gpu.sh [workloads...]: issue #6's GPU benchmarks, keel and PyTorch
# side by side in one run on the same GPU, then ratio lines:
#   RESULT name=gpu_cnn_b128_ratio value=... unit=x_torch   (>1: keel faster)
#   RESULT name=gpu_clip_adamw_100M_vs_copy value=... unit=x_copy (target >= 0.8)
# Workloads: cnn mlp lstm adamw attn (default: all). On the GPU machine, after
# tools/gpu_bundle.sh here: bash bench/gpu.sh (it uses build/gpu's
# libraries when they are there). env: KEEL_PYTHON (python with a CUDA
# torch; default python3, "none" skips the twin), BENCH_SCALE.
set -uo pipefail
cd "$(dirname "$0")/.."
keel=${KEEL_BIN:-build/release/bin/keel}
[ -x "$keel" ] || { echo "bench/gpu.sh: $keel is not built" >&2; exit 1; }
if [ -d build/gpu/lib ]; then
  cuda_lib=
  if command -v nvcc >/dev/null; then cuda_lib=$(dirname "$(dirname "$(command -v nvcc)")")/lib64; fi
  export LD_LIBRARY_PATH="$PWD/build/gpu/lib${cuda_lib:+:$cuda_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
PY=${KEEL_PYTHON:-python3}
if [ "$PY" != none ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "# no CUDA torch for $PY: keel only" >&2
  PY=none
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | sed 's/^/# gpu: /'
[ "$PY" != none ] && "$PY" -c 'import torch; print("# torch", torch.__version__, "cuda", torch.version.cuda)'

log=$(mktemp -t keel-gpu-bench.XXXXXX)
trap 'rm -f "$log"' EXIT
work=("$@")
[ ${#work[@]} -gt 0 ] || work=(cnn mlp lstm adamw attn)
status=0
for w in "${work[@]}"; do
  # keel first, then torch: each process has the GPU to itself
  "$keel" bench/gpu.lua "$w" 2>&1 | tee -a "$log" || status=1
  if [ "$PY" != none ]; then "$PY" bench/gpu_torch.py "$w" 2>&1 | tee -a "$log" || status=1; fi
done

awk '
  /^RESULT/ { split($2, n, "="); split($3, v, "="); val[n[2]] = v[2] }
  END {
    for (k in val) {
      if (k ~ /^gpu_(cnn|mlp)_b[0-9]+_keel$|^gpu_(lstm|attn)_keel$/) {
        base = substr(k, 1, length(k) - 5)
        if ((base "_torch") in val)
          printf "RESULT name=%s_ratio value=%.4g unit=x_torch\n", base, val[k] / val[base "_torch"]
      }
    }
    if ("gpu_clip_adamw_100M_keel" in val)
      for (p in val)
        if (p ~ /^gpu_clip_adamw_100M_torch_[a-z]+$/)
          printf "RESULT name=gpu_clip_adamw_100M_vs_%s value=%.4g unit=x_torch_time\n", substr(p, 21), val[p] / val["gpu_clip_adamw_100M_keel"]
  }' "$log" | sort
exit $status
