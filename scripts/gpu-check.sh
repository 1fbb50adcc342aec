#!/usr/bin/env bash
# gpu-check.sh — builds weightd on the GPU machine and runs the GPU tests and benchmarks, in
# one command (../shared/GPU.md). Prints a results table last.
#
# Prerequisite: scripts/fetch-gpu-debs.sh was run on the development machine, and .deps/debs
# travels with the checkout (it is git-ignored: pass it as a carried path).
#
# Environment (all optional):
#   OUT          where logs go (default: <repo>/results/gpu-check-<time>)
#   DEBS         folder of .deb files (default: <repo>/.deps/debs)
#   DEPS         extraction root (default: /tmp/deps)
#   BUILD_DIR    build folder, reused between runs (default: <repo>/build-gpucheck)
#   JOBS         build parallelism (default: nproc)
#   TARGETS      space-separated CMake targets to build (default: all)
#   TORCH_PREFIX LibTorch's CMake prefix (default: from the python3 torch package)
#   TESTS        extended regex of test program names to run (default: all test programs)
#   RUN_TESTS    0 to build only, without running any test program (default 1)
#   BENCH        1 to build and run bench/ programs whose name matches BENCH_FILTER (default 1)
#   BENCH_FILTER extended regex of benchmark program names (default: gpu|cuda)
#   LOAD_BENCH   1 to run the control-plane load benchmark with BENCH=1 (default 1): 64 client
#                processes acquiring and releasing resident models, 10,000 connection attempts
#                from one uid (as root; bench/README.md, weightd_bench_load)
#   ZIPF_BENCH   1 to run weightd_bench_zipf with BENCH=1 (default 0): 50 classifier-sized models,
#                a budget of 10, Zipf s=1, 2,000 requests from 16 clients, once per device of
#                ZIPF_DEVICES (default cuda:0; e.g. "cpu cuda:0"), with ZIPF_ARGS appended (e.g.
#                "--eviction lru", "--max-loads 0", "--requests 1000"); its figures go in the table
#   TEST_TIMEOUT seconds per test program (default 300)
#   PY_TESTS     1 to run the Python package's tests (tests/python, CUDA cases on) (default 1)
# Before the tests, the Python safetensors library writes a file of every dtype it can
# (tests/data/dtypes/write_with_safetensors.py, step "stdtypes"); the tests read it from
# $WEIGHTD_SAFETENSORS_LIBRARY_DIR.
# Exit status: 0 when every step and every test program passed.
set -euo pipefail
# shellcheck disable=SC2317  # the step functions are invoked indirectly, through step()

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$repo/results/gpu-check-$(date +%Y%m%d-%H%M%S)}
DEBS=${DEBS:-$repo/.deps/debs}
DEPS=${DEPS:-/tmp/deps}
BUILD_DIR=${BUILD_DIR:-$repo/build-gpucheck}
JOBS=${JOBS:-$(nproc)}
TESTS=${TESTS:-.}
RUN_TESTS=${RUN_TESTS:-1}
BENCH=${BENCH:-1}
BENCH_FILTER=${BENCH_FILTER:-gpu|cuda}
LOAD_BENCH=${LOAD_BENCH:-1}
ZIPF_BENCH=${ZIPF_BENCH:-0}
ZIPF_DEVICES=${ZIPF_DEVICES:-cuda:0}
ZIPF_ARGS=${ZIPF_ARGS:-}
TEST_TIMEOUT=${TEST_TIMEOUT:-300}
PY_TESTS=${PY_TESTS:-1}
ARCH_LIB=usr/lib/x86_64-linux-gnu
# The build runs test programs too (gtest_discover_tests), so the carried libraries must be
# found from the start.
export LD_LIBRARY_PATH="$DEPS/$ARCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

mkdir -p "$OUT/tests" "$OUT/xml" "$OUT/bench"
summary_steps=()   # "name|status|seconds|note"
summary_tests=()   # "name|passed|failed|skipped|rc"
overall=0

log() { echo "[gpu-check $(date +%H:%M:%S)] $*" | tee -a "$OUT/gpu-check.log"; }

# step NAME COMMAND...: runs COMMAND with its output in $OUT/step-NAME.log, records the result
# and leaves its exit status in last_rc. Never call it in an `if`/`||` context: bash would then
# ignore errexit inside the step.
last_rc=0
step() {
  local name=$1; shift
  local t0=$SECONDS rc=0
  log "step $name: $*"
  # A subshell outside any `||` context, so that errexit holds inside the step's function.
  set +e
  ( set -e; "$@" ) >"$OUT/step-$name.log" 2>&1
  rc=$?
  set -e
  local dt=$((SECONDS - t0))
  if [[ $rc -eq 0 ]]; then
    summary_steps+=("$name|ok|$dt|")
  else
    summary_steps+=("$name|FAIL(rc=$rc)|$dt|see step-$name.log")
    overall=1
    log "step $name failed (rc=$rc); last lines:"
    tail -15 "$OUT/step-$name.log" | sed 's/^/    /' | tee -a "$OUT/gpu-check.log"
  fi
  last_rc=$rc
}

print_table() {
  echo
  echo "==================== weightd gpu-check: results ===================="
  echo "machine: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1 || echo 'nvidia-smi unavailable')"
  echo "logs:    $OUT"
  printf '%-12s %-14s %6s  %s\n' STEP STATUS SECONDS NOTE
  for row in "${summary_steps[@]}"; do
    IFS='|' read -r n s d note <<<"$row"
    printf '%-12s %-14s %6s  %s\n' "$n" "$s" "$d" "$note"
  done
  if [[ ${#summary_tests[@]} -gt 0 ]]; then
    echo
    printf '%-34s %7s %7s %8s %5s\n' PROGRAM PASSED FAILED SKIPPED RC
    for row in "${summary_tests[@]}"; do
      IFS='|' read -r n p f s rc <<<"$row"
      printf '%-34s %7s %7s %8s %5s\n' "$n" "$p" "$f" "$s" "$rc"
    done
  fi
  local b
  for b in "$OUT"/bench/*.txt; do
    [[ -f "$b" ]] || continue
    echo
    echo "benchmark $(basename "$b" .txt):"
    grep -vE '^\*\*\*WARNING|^Running |^Run on|^CPU Caches|^  L[0-9]|^Load Average' "$b"
  done
  if [[ -s "$OUT/skipped.txt" ]]; then
    echo
    echo "skipped tests:"
    sort -u "$OUT/skipped.txt"
  fi
  echo "overall: $([[ $overall -eq 0 ]] && echo PASS || echo FAIL)"
}
trap print_table EXIT

# ---- 1. dependencies ----------------------------------------------------------------------------
extract_debs() {
  shopt -s nullglob
  local debs=("$DEBS"/*.deb)
  if [[ ${#debs[@]} -eq 0 ]]; then
    echo "no .deb files in $DEBS: run scripts/fetch-gpu-debs.sh on the development machine and carry .deps/debs"
    return 1
  fi
  rm -rf "$DEPS"
  mkdir -p "$DEPS"
  for f in "${debs[@]}"; do dpkg -x "$f" "$DEPS"; done
  # Where the machine already has a runtime library (same soname), use its (newer) copy, so
  # that LD_LIBRARY_PATH never shadows a system library with an older Debian one.
  local lib name
  for lib in "$DEPS/$ARCH_LIB"/lib*.so.*; do
    name=$(basename "$lib")
    [[ "$name" =~ \.so\.[0-9]+$ ]] || continue
    if [[ -e "/$ARCH_LIB/$name" ]]; then
      rm -f "$lib"
      ln -s "/$ARCH_LIB/$name" "$lib"
      echo "using system $name"
    fi
  done
  echo "extracted ${#debs[@]} packages into $DEPS"
}

# ---- 2. configure -------------------------------------------------------------------------------
configure() {
  local torch_prefix
  if [[ -v TORCH_PREFIX ]]; then
    torch_prefix=$TORCH_PREFIX
  else
    torch_prefix=$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
  fi
  echo "torch cmake prefix: $torch_prefix"
  # The Python package: this machine's python3 (torch 2.x with CUDA) and pip's pybind11.
  local py pybind_dir
  py=$(command -v python3)
  pybind_dir=$(python3 -m pybind11 --cmakedir 2>/dev/null || true)
  echo "python: $py ($(python3 -c 'import sys; print(sys.version.split()[0])')), pybind11 cmake: ${pybind_dir:-none}"
  local cuda_args=()
  if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
    cuda_args+=("-DCUDAToolkit_ROOT=/usr/local/cuda" "-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc")
  fi
  local gen=()
  if command -v ninja >/dev/null; then gen=(-G Ninja); fi
  # A build folder from another generator cannot be reused.
  if [[ -f "$BUILD_DIR/CMakeCache.txt" ]] && ! grep -q "CMAKE_GENERATOR:INTERNAL=${gen[1]:-Unix Makefiles}" "$BUILD_DIR/CMakeCache.txt"; then
    rm -rf "$BUILD_DIR"
  fi
  local bench=OFF
  [[ "$BENCH" == 1 ]] && bench=ON
  cmake -S "$repo" -B "$BUILD_DIR" "${gen[@]}" \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_PREFIX_PATH="$torch_prefix;${pybind_dir:+$pybind_dir;}$DEPS/usr;$DEPS/$ARCH_LIB/cmake" \
    -DPython_EXECUTABLE="$py" \
    -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DWEIGHTD_WITH_CUDA=ON -DWEIGHTD_WITH_TORCH=ON -DWEIGHTD_BUILD_TESTS=ON -DWEIGHTD_BUILD_BENCH="$bench" \
    "${cuda_args[@]}" | tee "$OUT/cmake-configure.txt"
  # WEIGHTD_WITH_CUDA silently turns off without a toolkit; on this machine that is an error.
  if ! grep -q 'weightd: GPU tier enabled' "$OUT/cmake-configure.txt"; then
    echo "the GPU tier is not enabled: CMake found no CUDA toolkit"
    return 1
  fi
}

# ---- 3. build (keeps going past failures, so that whatever built still runs) -------------------
build() {
  if grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja' "$BUILD_DIR/CMakeCache.txt"; then
    cmake --build "$BUILD_DIR" -j "$JOBS" ${TARGETS:+--target $TARGETS} -- -k 0
  else
    cmake --build "$BUILD_DIR" -j "$JOBS" ${TARGETS:+--target $TARGETS} -- -k
  fi
}

# ---- 4. tests -----------------------------------------------------------------------------------
# Files of every dtype written by the Python safetensors library itself (the peer users write
# checkpoints with); tests/dtype_test.cc and tests/torch/shim_test.cc check them when
# WEIGHTD_SAFETENSORS_LIBRARY_DIR names them, and skip those tests otherwise.
write_safetensors_dtypes() {
  rm -rf "$OUT/safetensors-dtypes"
  python3 "$repo/tests/data/dtypes/write_with_safetensors.py" "$OUT/safetensors-dtypes"
}

run_tests() {
  local prog name rc log passed failed skipped expected
  local found=0 gpu_present=0 gpus
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  if (( ${gpus:-0} > 0 )); then gpu_present=1; fi
  for prog in "$BUILD_DIR"/tests/*_test "$BUILD_DIR"/tests/torch/*_test; do
    [[ -x "$prog" && -f "$prog" ]] || continue
    name=$(basename "$prog")
    [[ "$name" =~ $TESTS ]] || continue
    found=1
    log="$OUT/tests/$name.log"
    rc=0
    log "test $name"
    # GpuRealChild.* is the importer half of gpu_real_test; its parent tests start it.
    timeout --kill-after=10 "$TEST_TIMEOUT" "$prog" --gtest_output="xml:$OUT/xml/$name.xml" \
      --gtest_filter='-GpuRealChild.*:GpuE2EChild.*' >"$log" 2>&1 || rc=$?
    # The last summary line is the program's own: a test that runs a child gtest (gpu_real_test)
    # has the child's summaries earlier in the log.
    passed=$(grep -oE '^\[  PASSED  \] [0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
    failed=$(grep -oE '^\[  FAILED  \] [0-9]+ tests?, listed' "$log" | grep -oE '[0-9]+' | tail -1 || true)
    skipped=$(grep -oE '^\[  SKIPPED \] [0-9]+ tests?, listed' "$log" | grep -oE '[0-9]+' | tail -1 || true)
    # On a machine with a GPU, a skipped GPU test means the GPU tier did not find it: a failure.
    # Tests that need two GPUs skip on a machine with one, as expected (they stay listed).
    expected=0
    if (( ${gpus:-0} < 2 )); then expected=$(grep -c 'skipped, needs two GPUs' "$log" || true); fi
    if [[ $gpu_present -eq 1 && "$name" =~ gpu|cuda && ${skipped:-0} -gt ${expected:-0} && $rc -eq 0 ]]; then
      rc=skip!
      log "test $name skipped GPU tests on a machine with a GPU:"
      grep -A1 'Skipped$' "$log" | head -6 | sed 's/^/    /' | tee -a "$OUT/gpu-check.log" || true
    fi
    summary_tests+=("$name|${passed:-0}|${failed:-0}|${skipped:-0}|$rc")
    grep -E '^\[  SKIPPED \] [A-Za-z]' "$log" | grep -v ' ms)$' | sed "s/^\[  SKIPPED \] /  $name: /" >>"$OUT/skipped.txt" || true
    if [[ $rc != 0 ]]; then
      overall=1
      log "test $name failed (rc=$rc):"
      grep -E '^\[  FAILED  \]|Failure|error' "$log" | head -10 | sed 's/^/    /' | tee -a "$OUT/gpu-check.log" || true
    fi
  done
  if [[ $found -eq 0 ]]; then
    summary_tests+=("(no test programs built)|0|0|0|1")
    overall=1
  fi
}

# ---- 4b. the Python package's tests, CUDA cases included -------------------------------------
# unittest_count KEY SUMMARY: the number after KEY= in unittest's last line, or 0.
unittest_count() {
  local n
  n=$(grep -oE "$1=[0-9]+" <<<"$2" | cut -d= -f2 || true)
  echo "${n:-0}"
}

run_python_tests() {
  local cls log rc passed failed skipped ran result
  if [[ ! -d "$BUILD_DIR/python/weightd" ]]; then
    summary_tests+=("python (package not built)|0|0|0|1")
    overall=1
    return
  fi
  for cls in test_weightd test_frameworks; do
    log="$OUT/tests/python-$cls.log"
    rc=0
    log "test python $cls"
    (cd "$repo/tests/python" && WEIGHTD_TEST_GPU=1 PYTHONPATH="$BUILD_DIR/python" WEIGHTD_BIN="$BUILD_DIR/cached/weightd" \
      PYTHONDONTWRITEBYTECODE=1 timeout --kill-after=10 "$TEST_TIMEOUT" python3 -m unittest -v "$cls") >"$log" 2>&1 || rc=$?
    # unittest's own summary ("Ran N tests", then "OK (skipped=K)" or "FAILED (failures=F,
    # errors=E, skipped=K)"), not its per-test lines: a test's output can split "... ok".
    ran=$(grep -oE '^Ran [0-9]+ tests?' "$log" | grep -oE '[0-9]+' | tail -1 || true)
    result=$(grep -E '^(OK|FAILED)' "$log" | tail -1 || true)
    failed=$(( $(unittest_count failures "$result") + $(unittest_count errors "$result") ))
    skipped=$(unittest_count skipped "$result")
    passed=$(( ${ran:-0} - failed - skipped ))
    if [[ -z $result && $rc == 0 ]]; then rc=1; fi  # no summary: the run died before it ended
    summary_tests+=("python:$cls|${passed:-0}|${failed:-0}|${skipped:-0}|$rc")
    grep -E '\.\.\. skipped' "$log" | sed "s/^/  python:$cls: /" >>"$OUT/skipped.txt" || true
    if [[ $rc != 0 ]]; then
      overall=1
      log "python $cls failed (rc=$rc):"
      grep -E '^(FAIL|ERROR):|Error' "$log" | head -10 | sed 's/^/    /' | tee -a "$OUT/gpu-check.log" || true
    fi
  done
}

# ---- 5. benchmarks ------------------------------------------------------------------------------
run_benchmarks() {
  local prog name rc
  for prog in "$BUILD_DIR"/bench/*; do
    [[ -x "$prog" && -f "$prog" ]] || continue
    name=$(basename "$prog")
    [[ "$name" =~ $BENCH_FILTER ]] || continue
    rc=0
    log "bench $name"
    "$prog" --benchmark_out="$OUT/bench/$name.json" --benchmark_out_format=json >"$OUT/bench/$name.txt" 2>&1 || rc=$?
    summary_steps+=("bench:$name|$([[ $rc -eq 0 ]] && echo ok || echo "FAIL(rc=$rc)")|-|bench/$name.txt")
    [[ $rc -eq 0 ]] || overall=1
  done
  # The control plane under load (issue 15's targets on 16 cores: >= 20,000 acquire + release
  # pairs/s with p99 <= 2 ms at 64 clients; the flood's excess shed; another user's list within
  # 50 ms). A plain program, not Google Benchmark.
  local load=$BUILD_DIR/bench/weightd_bench_load
  if [[ "$LOAD_BENCH" == 1 && -x "$load" ]]; then
    rc=0
    log "bench weightd_bench_load"
    "$load" --clients 64 --seconds 10 --flood 10000 --json "$OUT/bench/weightd_bench_load.json" \
      >"$OUT/bench/weightd_bench_load.txt" 2>&1 || rc=$?
    summary_steps+=("bench:load|$([[ $rc -eq 0 ]] && echo ok || echo "FAIL(rc=$rc)")|-|bench/weightd_bench_load.txt")
    [[ $rc -eq 0 ]] || overall=1
  fi
  # Many models, one budget (issue 17): the hit rate, time-to-tensors and the budget (host
  # /dev/shm, and the GPU tier's from the daemon's stats) under 16 concurrent clients.
  local zipf=$BUILD_DIR/bench/weightd_bench_zipf dev tag txt note
  if [[ "$ZIPF_BENCH" == 1 && -x "$zipf" ]]; then
    for dev in $ZIPF_DEVICES; do
      tag=zipf-${dev//:/}
      txt=$OUT/bench/weightd_bench_$tag.txt
      rc=0
      log "bench weightd_bench_zipf --device $dev $ZIPF_ARGS"
      # shellcheck disable=SC2086  # ZIPF_ARGS is a list of arguments
      "$zipf" --device "$dev" --clients 16 --work "${TMPDIR:-/tmp}/weightd-bench-zipf" \
        --json "$OUT/bench/weightd_bench_$tag.json" $ZIPF_ARGS >"$txt" 2>&1 || rc=$?
      # The figures: hit rate (daemon), LRU replay, p50/p99, lone cold acquire, throughput, budget.
      note=$(awk '
        /^calibration/ { for (i = 1; i <= NF; i++) if ($i == "cold") cold = $(i + 2) }
        /^hit rate, daemon counters/ { hit = $(NF - 1) }
        /^hit rate, sequential LRU replay/ { lru = $(NF - 1) }
        /^time-to-tensors, all/ { p50 = $4; p99 = $8 }
        /^wall time/ { rps = $(NF - 3) }
        /^max .* bytes/ { budget = ($0 ~ /EXCEEDED/) ? "EXCEEDED" : "held" }
        END { printf "hit %s%% (LRU %s%%) p50 %s p99 %s ms cold %s ms %s req/s budget %s", hit, lru, p50, p99, cold, rps, budget }
      ' "$txt" 2>/dev/null || true)
      summary_steps+=("bench:$tag|$([[ $rc -eq 0 ]] && echo ok || echo "FAIL(rc=$rc)")|-|$note")
      [[ $rc -eq 0 ]] || overall=1
    done
  fi
}

log "repo $repo, out $OUT, build $BUILD_DIR"
{ nvidia-smi || true; } >"$OUT/nvidia-smi.txt" 2>&1
step deps extract_debs
[[ $last_rc -eq 0 ]] || exit 1
step configure configure
[[ $last_rc -eq 0 ]] || exit 1
step build build  # on failure, run whatever built; the table shows the build failure
if [[ "$RUN_TESTS" == 1 ]]; then
  step stdtypes write_safetensors_dtypes
  if [[ $last_rc -eq 0 ]]; then export WEIGHTD_SAFETENSORS_LIBRARY_DIR=$OUT/safetensors-dtypes; fi
  run_tests
fi
if [[ "$PY_TESTS" == 1 ]]; then run_python_tests; fi
if [[ "$BENCH" == 1 ]]; then run_benchmarks; fi
exit $overall
