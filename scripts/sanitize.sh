#!/usr/bin/env bash
# sanitize.sh — builds the daemon, the client and the test suite with AddressSanitizer and
# UndefinedBehaviorSanitizer (WEIGHTD_SANITIZE, GCC) and runs the suite. scripts/test.sh (and so
# CI) runs it after the fuzzers.
#
# Left out: the LibTorch shim and its tests (Debian's LibTorch is not built with ASan, and its
# static initializers trip the leak checker), the Python package and its tests (the interpreter
# is not built with ASan and keeps its own allocations to the end), the benchmarks, and the churn soak: its 64 client
# processes are forked (not exec'd) from a threaded test process, and GCC 12's ASan allocator
# has no fork handlers, so a child can inherit its lock held and hang (seen in CI). The soak
# runs in the plain build.
#
# Environment (optional):
#   SANITIZE_BUILD_DIR     the build folder (default: <repo>/build-asan)
#   JOBS                   build and test parallelism (default 2)
#   CTEST_ARGS             extra arguments for ctest
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SANITIZE_BUILD_DIR=${SANITIZE_BUILD_DIR:-$repo/build-asan}
JOBS=${JOBS:-2}

t0=$SECONDS
echo "sanitize: configuring $SANITIZE_BUILD_DIR (ASan + UBSan, no LibTorch, no benchmarks)"
cmake -S "$repo" -B "$SANITIZE_BUILD_DIR" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DWEIGHTD_SANITIZE=ON -DWEIGHTD_WERROR=ON \
  -DWEIGHTD_WITH_TORCH=OFF -DWEIGHTD_WITH_PYTHON=OFF -DWEIGHTD_BUILD_BENCH=OFF -DWEIGHTD_BUILD_TESTS=ON
echo "sanitize: building with -j$JOBS"
cmake --build "$SANITIZE_BUILD_DIR" -j "$JOBS"
echo "sanitize: running the test suite (built in $((SECONDS - t0)) s)"
# Any report fails the test that triggered it: UBSan stops at the first error
# (-fno-sanitize-recover), ASan checks leaks at exit.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0:strict_string_checks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# shellcheck disable=SC2086  # CTEST_ARGS is a list of arguments
ctest --test-dir "$SANITIZE_BUILD_DIR" -j "$JOBS" --output-on-failure --timeout 300 -E '^Soak\.' ${CTEST_ARGS:-}
echo "sanitize: passed in $((SECONDS - t0)) s"
