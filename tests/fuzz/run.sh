#!/usr/bin/env bash
# tests/fuzz/run.sh [SECONDS [NAME...]]  (default 30 s; NAMEs pick harnesses
# fuzz_<NAME>.c, default all)
#
# Builds the libFuzzer harnesses tests/fuzz/fuzz_*.c against the engine
# sources (clang, -fsanitize=fuzzer,address,undefined) into build/fuzz/,
# writes their seed corpora (tests/fuzz/seeds*.py OUTDIR write OUTDIR/<name>/
# for fuzz_<name>.c), and runs each harness
# for SECONDS. Prints one line per harness; exits non-zero when a harness
# crashed, leaked or hit undefined behaviour (its log and the crashing input
# stay in build/fuzz/), or when the build failed. Environment: CC (clang),
# FUZZ_JOBS (parallel compiles, 2).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
secs=${1:-30}
case "$secs" in ''|*[!0-9]*) echo "usage: tests/fuzz/run.sh [SECONDS [NAME...]]" >&2; exit 2 ;; esac
cc=${CC:-clang}
out=build/fuzz
mkdir -p "$out/obj"

san="-fsanitize=address,undefined -fno-sanitize-recover=undefined"
cflags="-std=c11 -D_GNU_SOURCE -g -O1 -fno-omit-frame-pointer $san -Iengine -Ikernels -w"

# The engine, into one archive (objects rebuilt when their source or a header changed).
objs=()
pids=()
for src in engine/*.c; do
  obj="$out/obj/$(basename "${src%.c}").o"
  objs+=("$obj")
  if [ ! -f "$obj" ] || [ "$src" -nt "$obj" ] || [ engine/keel.h -nt "$obj" ] || [ engine/keel_impl.h -nt "$obj" ] || [ kernels/keel_cuda.h -nt "$obj" ]; then
    $cc $cflags -fsanitize=fuzzer-no-link -c "$src" -o "$obj" &
    pids+=($!)
    if [ ${#pids[@]} -ge "${FUZZ_JOBS:-2}" ]; then
      wait "${pids[0]}" || { echo "fuzz: compiling failed" >&2; exit 2; }
      pids=("${pids[@]:1}")
    fi
  fi
done
for p in "${pids[@]}"; do wait "$p" || { echo "fuzz: compiling failed" >&2; exit 2; }; done
rm -f "$out/libkeel_fuzz.a"
ar rcs "$out/libkeel_fuzz.a" "${objs[@]}" || exit 2

rm -rf "$out/seeds"
for py in tests/fuzz/seeds*.py; do
  python3 "$py" "$out/seeds" || { echo "fuzz: $py failed" >&2; exit 2; }
done

status=0
only=" ${*:2} "
for h in tests/fuzz/fuzz_*.c; do
  name=$(basename "${h%.c}")
  kind=${name#fuzz_}
  [ "$only" = "  " ] || [[ "$only" == *" $kind "* ]] || continue
  bin="$out/$name"
  if ! $cc $cflags -fsanitize=fuzzer -Itests/fuzz "$h" "$out/libkeel_fuzz.a" \
       -lopenblas -lz -lpthread -lm -o "$bin"; then
    echo "$name: BUILD FAILED"
    status=1
    continue
  fi
  corpus="$out/corpus/$kind"
  mkdir -p "$corpus" "$out/crashes/$kind" "$out/seeds/$kind"
  log="$out/$name.log"
  # decoded images grow with the input (up to 8256 pixels a byte): keep them small
  maxlen=65536
  [ "$kind" = image ] && maxlen=1024
  ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1 \
    "$bin" -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=1024 -max_len=$maxlen \
      -timeout=10 -print_final_stats=1 -artifact_prefix="$out/crashes/$kind/" \
      "$corpus" "$out/seeds/$kind" >"$log" 2>&1
  rc=$?
  runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n 1)
  cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -n 1)
  if [ "$rc" -eq 0 ]; then
    echo "$name: ok, ${runs:-?} inputs in ${secs}s, ${cov:-cov: ?}, corpus $(ls "$corpus" | wc -l)"
  else
    what=$(grep -Eo 'ERROR: [A-Za-z]+: [a-z-]+|runtime error: .*|ERROR: libFuzzer: [a-z-]+' "$log" | head -n 1)
    echo "$name: FAILED (exit $rc): ${what:-see log} — log $log, input in $out/crashes/$kind/"
    status=1
  fi
done
exit $status
