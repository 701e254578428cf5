#!/usr/bin/env bash
# tools/build.sh [release|debug|asan|all] [--with-cuda|--without-cuda]
# (default: release). Generates build/ with premake4 (premake5 when
# premake4 is absent) and builds the configuration(s) into build/<config>/.
# The CUDA plugin (build/<config>/lib/libkeel_cuda.so) is built when nvcc
# is found; --with-cuda makes its absence an error, --without-cuda skips it.
# KEEL_CUDA=with|without does the same for every later build (tools/test.sh
# calls this script without options). The CPU simulator plugin
# (build/<config>/lib/libkeel_cuda_sim.so, kernels/sim/) is built always.
# The last line says what CUDA got.
set -euo pipefail
cd "$(dirname "$0")/.."

cfg=release
cuda_opt=
case "${KEEL_CUDA:-}" in
  with|on) cuda_opt=--with-cuda ;;
  without|off) cuda_opt=--without-cuda ;;
  ""|auto) ;;
  *) echo "build: KEEL_CUDA=$KEEL_CUDA: expected with, without or auto" >&2; exit 2 ;;
esac
for a in "$@"; do
  case "$a" in
    release|debug|asan|all) cfg=$a ;;
    --with-cuda|--without-cuda) cuda_opt=$a ;;
    *) echo "usage: tools/build.sh [release|debug|asan|all] [--with-cuda|--without-cuda]" >&2; exit 2 ;;
  esac
done
case "$cfg" in
  all) configs=(release debug asan) ;;
  *) configs=("$cfg") ;;
esac

jobs=${KEEL_JOBS:-$(nproc 2>/dev/null || echo 2)}

# Rerun premake every time: it globs the sources when it generates.
if command -v premake4 >/dev/null; then
  premake4 --file=premake5.lua $cuda_opt gmake >/dev/null
elif command -v premake5 >/dev/null; then
  premake5 --file=premake5.lua $cuda_opt gmake2 >/dev/null
else
  echo "build: premake4 not found (run tools/deps.sh)" >&2
  exit 1
fi

for c in "${configs[@]}"; do
  echo "build: $c"
  make -C build -j"$jobs" --no-print-directory config="$c"
done

# The CUDA simulator plugin (kernels/sim/) is built in every case.
for c in "${configs[@]}"; do
  if [ -f "build/$c/lib/libkeel_cuda_sim.so" ]; then
    echo "build: CUDA simulator built: build/$c/lib/libkeel_cuda_sim.so"
  else
    echo "build: CUDA simulator missing: build/$c/lib/libkeel_cuda_sim.so" >&2; exit 1
  fi
done

# What CUDA got (premake5.lua writes the decision to build/cuda.txt).
note=$(cat build/cuda.txt 2>/dev/null || echo "unknown")
case "$note" in
  on*)
    for c in "${configs[@]}"; do
      if [ -f "build/$c/lib/libkeel_cuda.so" ]; then
        echo "build: CUDA plugin built: build/$c/lib/libkeel_cuda.so (${note#on })"
      else
        echo "build: CUDA plugin missing: build/$c/lib/libkeel_cuda.so" >&2; exit 1
      fi
    done ;;
  *)
    # a plugin left by an earlier CUDA build would still be found and used
    for c in "${configs[@]}"; do rm -f "build/$c/lib/libkeel_cuda.so"; done
    echo "build: CUDA plugin not built (${note#off: })" ;;
esac
