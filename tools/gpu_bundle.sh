#!/usr/bin/env bash
# tools/gpu_bundle.sh [release|debug]  (default: release)
# Makes build/gpu/: what a GPU machine without premake, Lua, busted or
# OpenBLAS needs to run this repository's tests against build/<config>/
# (built here, CUDA plugin included): the shared libraries the programs
# need beyond glibc and CUDA, busted and its Lua modules, and
# build/gpu/run.sh, which runs tools/test.sh there with the keel
# executable as the Lua interpreter and no build step.
#
# Both folders travel together (build/ is git-ignored), from the
# repository root there:
#   bash build/gpu/run.sh [release|debug]          the suite, CPU default device
#   KEEL_DEVICE=cuda bash build/gpu/run.sh         the suite, CUDA default device
set -euo pipefail
cd "$(dirname "$0")/.."

cfg=${1:-release}
case "$cfg" in
  release|debug) ;;
  *) echo "usage: tools/gpu_bundle.sh [release|debug]" >&2; exit 2 ;;
esac
[ -x "build/$cfg/bin/keel" ] || { echo "gpu_bundle: build/$cfg is not built (tools/build.sh $cfg)" >&2; exit 1; }
[ -f "build/$cfg/lib/libkeel_cuda.so" ] || echo "gpu_bundle: warning: build/$cfg has no CUDA plugin" >&2

out=build/gpu
rm -rf "$out"
mkdir -p "$out/lib" "$out/lua" "$out/clib"

# Shared libraries beyond glibc and the CUDA toolkit (the GPU machine has
# those): OpenBLAS and what it pulls in, libedit, zlib.
skip='^(libc|libm|libdl|libpthread|librt|ld-linux-x86-64|libgcc_s|libstdc\+\+|libcudart|libcublas|libcublasLt)\.so'
for f in "build/$cfg/bin/keel" "build/$cfg/bin/keel_ctest" "build/$cfg/lua/keel/core.so" \
         /usr/lib/x86_64-linux-gnu/lua/5.4/system/core.so /usr/lib/x86_64-linux-gnu/lua/5.4/term/core.so \
         /usr/lib/x86_64-linux-gnu/lua/5.4/lfs.so; do
  [ -e "$f" ] || continue
  ldd "$f" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
    base=$(basename "$lib")
    [[ "$base" =~ $skip ]] && continue
    cp -L "$lib" "$out/lib/$base"
  done
done

# busted and its modules (Debian links some into ../5.1: copy the files)
cp -rL /usr/share/lua/5.4/. "$out/lua/"
cp -rL /usr/lib/x86_64-linux-gnu/lua/5.4/. "$out/clib/"
cp /usr/bin/busted "$out/busted"

cat >"$out/run.sh" <<'EOF'
#!/usr/bin/env bash
# build/gpu/run.sh [release|debug]: tools/test.sh on a machine without
# premake, Lua or busted, against the build/<config> that came with it.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 1
b=$PWD/build/gpu
cfg=${1:-release}
# the toolkit's libraries, wherever nvcc lives here (the plugin's rpath
# names the build machine's)
cuda_lib=
if command -v nvcc >/dev/null; then cuda_lib=$(dirname "$(dirname "$(command -v nvcc)")")/lib64; fi
export LD_LIBRARY_PATH="$b/lib${cuda_lib:+:$cuda_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export KEEL_NO_BUILD=1 KEEL_LUA="$PWD/build/$cfg/bin/keel" KEEL_BUSTED="$b/busted"
export KEEL_LUA_PATH="$b/lua/?.lua;$b/lua/?/init.lua" KEEL_LUA_CPATH="$b/clib/?.so"
# specs that start `lua5.4` themselves get the keel executable (same options)
mkdir -p "$b/bin"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$KEEL_LUA" >"$b/bin/lua5.4"
chmod +x "$b/bin/lua5.4"
export PATH="$b/bin:$PATH"
exec tools/test.sh "$cfg"
EOF
chmod +x "$out/run.sh"
echo "gpu_bundle: $out ($(du -sh "$out" | cut -f1)) with build/$cfg ($(du -sh "build/$cfg" | cut -f1)):"
echo "  carry [\"build/$cfg\", \"build/gpu\"], then run: bash build/gpu/run.sh $cfg"
