#!/usr/bin/env bash
# fuzz.sh — builds the libFuzzer targets with clang-14 (ASan + UBSan) and runs each for a
# bounded time on its checked-in seed corpus. scripts/test.sh (and so CI) runs it after the
# unit tests.
#
#   scripts/fuzz.sh                  build, then run every target for FUZZ_SECONDS
#   scripts/fuzz.sh protocol_fuzz    only the named target(s)
#   scripts/fuzz.sh --build-only     build the targets, run nothing
#   scripts/fuzz.sh --write-corpus   regenerate tests/fuzz/corpus/protocol (after a protocol change)
#
# The targets (tests/fuzz/CMakeLists.txt, a project of its own) link only the sources they
# test, so this clang build is small; the main build stays GCC. Seeds are read from
# tests/fuzz/corpus/<target without _fuzz>/ and never written: what a run discovers goes to
# $FUZZ_BUILD_DIR/corpus/<target>/, and a crashing input to $FUZZ_BUILD_DIR/artifacts/<target>/
# (its bytes are also printed, hex-dumped, so a CI log alone reproduces it). Reproduce with
#   build-fuzz/<target> build-fuzz/artifacts/<target>/crash-...
#
# Environment (optional):
#   FUZZ_SECONDS    run time per target (default 60)
#   FUZZ_BUILD_DIR  the clang build folder (default: <repo>/build-fuzz)
#   JOBS            build parallelism, and how many targets run at once (default 2)
#   CLANGXX         the compiler (default clang++-14)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FUZZ_SECONDS=${FUZZ_SECONDS:-60}
FUZZ_BUILD_DIR=${FUZZ_BUILD_DIR:-$repo/build-fuzz}
JOBS=${JOBS:-2}
CLANGXX=${CLANGXX:-clang++-14}
ALL_TARGETS=(safetensors_header_fuzz protocol_fuzz config_fuzz)

mode=run
targets=()
for arg in "$@"; do
  case $arg in
    --build-only) mode=build ;;
    --write-corpus) mode=corpus ;;
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) targets+=("$arg") ;;
  esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=("${ALL_TARGETS[@]}")
for t in "${targets[@]}"; do
  [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || { echo "fuzz: no target '$t' (have: ${ALL_TARGETS[*]})" >&2; exit 2; }
done
[[ "$FUZZ_SECONDS" =~ ^[1-9][0-9]*$ ]] || { echo "fuzz: FUZZ_SECONDS must be a positive integer, got '$FUZZ_SECONDS'" >&2; exit 2; }

if ! command -v "$CLANGXX" >/dev/null; then
  echo "fuzz: $CLANGXX not found (Debian: apt-get install clang-14 libclang-rt-14-dev; scripts/install-deps.sh does)" >&2
  exit 1
fi
fuzzer_rt=$("$CLANGXX" -print-file-name=libclang_rt.fuzzer-x86_64.a)
if [[ ! -f "$fuzzer_rt" ]]; then
  echo "fuzz: $CLANGXX has no libFuzzer runtime (Debian: apt-get install libclang-rt-14-dev)" >&2
  exit 1
fi

t0=$SECONDS
echo "fuzz: configuring $FUZZ_BUILD_DIR with $CLANGXX"
mkdir -p "$FUZZ_BUILD_DIR"
cmake -S "$repo/tests/fuzz" -B "$FUZZ_BUILD_DIR" -DCMAKE_CXX_COMPILER="$CLANGXX" >"$FUZZ_BUILD_DIR/configure.log" 2>&1 ||
  { cat "$FUZZ_BUILD_DIR/configure.log" >&2; echo "fuzz: configuring failed" >&2; exit 1; }
build=("${targets[@]}")
[[ $mode == corpus ]] && build=(protocol_corpus_gen)
echo "fuzz: building ${build[*]} with -j$JOBS"
cmake --build "$FUZZ_BUILD_DIR" -j "$JOBS" --target "${build[@]}"
echo "fuzz: built in $((SECONDS - t0)) s"

case $mode in
  build) exit 0 ;;
  corpus)
    dir=$repo/tests/fuzz/corpus/protocol
    rm -rf "$dir"
    "$FUZZ_BUILD_DIR/protocol_corpus_gen" "$dir"
    exit 0 ;;
esac

# Per-target libFuzzer options. protocol_fuzz gets a tight allocation limit: a frame is at most
# a few KiB here, so a single allocation of 16 MiB can only come from a trusted length field.
extra_args() {
  case $1 in
    protocol_fuzz) echo "-malloc_limit_mb=16" ;;
    config_fuzz) echo "-dict=$repo/tests/fuzz/config.dict" ;;
  esac
}

# run_target NAME: one bounded run; its output goes to $FUZZ_BUILD_DIR/logs/NAME.log.
run_target() {
  local t=$1 seeds=$repo/tests/fuzz/corpus/${1%_fuzz}
  local work=$FUZZ_BUILD_DIR/corpus/$t art=$FUZZ_BUILD_DIR/artifacts/$t log=$FUZZ_BUILD_DIR/logs/$t.log
  mkdir -p "$work" "$art" "$(dirname "$log")"
  rm -f "$art"/*
  [[ -d "$seeds" ]] || { echo "fuzz: $t: no seed corpus at $seeds" >"$log"; return 1; }
  # shellcheck disable=SC2046  # extra_args is a list of options
  "$FUZZ_BUILD_DIR/$t" -max_total_time="$FUZZ_SECONDS" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$art/" $(extra_args "$t") "$work" "$seeds" >"$log" 2>&1
}

echo "fuzz: running ${targets[*]} for ${FUZZ_SECONDS} s each, $JOBS at a time"
declare -A pid_of=()
failed=()
wait_one() {
  local done_pid="" rc=0 t log
  wait -n -p done_pid || rc=$?
  for t in "${!pid_of[@]}"; do
    [[ ${pid_of[$t]} == "$done_pid" ]] || continue
    unset "pid_of[$t]"
    log=$FUZZ_BUILD_DIR/logs/$t.log
    if [[ $rc -eq 0 ]]; then
      echo "fuzz: $t: ok ($(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | grep -o '[0-9]*$') executions" \
           "in $(grep -o 'Done [0-9]* runs in [0-9]* second(s)' "$log" | grep -o '[0-9]* second' | head -1)s," \
           "$(find "$FUZZ_BUILD_DIR/corpus/$t" -type f | wc -l) inputs in its working corpus)"
    else
      failed+=("$t")
    fi
  done
}
for t in "${targets[@]}"; do
  while [[ ${#pid_of[@]} -ge $JOBS ]]; do wait_one; done
  run_target "$t" &
  pid_of[$t]=$!
done
while [[ ${#pid_of[@]} -gt 0 ]]; do wait_one; done

for t in "${failed[@]}"; do
  echo "fuzz: $t: FAILED; the end of its log ($FUZZ_BUILD_DIR/logs/$t.log):" >&2
  tail -n 60 "$FUZZ_BUILD_DIR/logs/$t.log" >&2
  for f in "$FUZZ_BUILD_DIR/artifacts/$t"/*; do
    [[ -f "$f" ]] || continue
    echo "fuzz: $t: the input that failed, $f ($(stat -c %s "$f") bytes):" >&2
    od -A x -t x1z -v "$f" | head -n 64 >&2
    echo "fuzz: reproduce with: $FUZZ_BUILD_DIR/$t $f" >&2
  done
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz: ${#failed[@]} target(s) failed: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: all ${#targets[@]} target(s) ran clean in $((SECONDS - t0)) s"
