#!/usr/bin/env bash
# tools/build.sh [release|debug|asan|all]  (default: release)
# Generates build/ with premake4 (premake5 when premake4 is absent) and
# builds the configuration(s) into build/<config>/.
set -euo pipefail
cd "$(dirname "$0")/.."

cfg=${1:-release}
case "$cfg" in
  release|debug|asan) configs=("$cfg") ;;
  all) configs=(release debug asan) ;;
  *) echo "usage: tools/build.sh [release|debug|asan|all]" >&2; exit 2 ;;
esac

jobs=${KEEL_JOBS:-$(nproc 2>/dev/null || echo 2)}

# Rerun premake every time: it globs the sources when it generates.
if command -v premake4 >/dev/null; then
  premake4 --file=premake5.lua gmake >/dev/null
elif command -v premake5 >/dev/null; then
  premake5 --file=premake5.lua gmake2 >/dev/null
else
  echo "build: premake4 not found (run tools/deps.sh)" >&2
  exit 1
fi

for c in "${configs[@]}"; do
  echo "build: $c"
  make -C build -j"$jobs" --no-print-directory config="$c"
done
