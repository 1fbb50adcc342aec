#!/usr/bin/env bash
# test.sh — installs what weightd needs (Debian 12), builds everything with -Werror into build/,
# checks the daemon's lock annotations with clang (scripts/thread-safety.sh), runs the whole
# test suite, checks the systemd files (scripts/check-systemd.sh), the installed package with a
# downstream project (scripts/check-install.sh), the Kubernetes manifests, containers and a
# real systemd (scripts/k8s-check.sh, container-check.sh, systemd-check.sh), runs the fuzzers
# (scripts/fuzz.sh) and the suite again under ASan + UBSan
# (scripts/sanitize.sh). This is the README's test command and what CI runs (.ci/run).
# Idempotent: re-running rebuilds only what changed.
#
# Environment (optional):
#   BUILD_DIR  build folder (default: <repo>/build)
#   JOBS       build and test parallelism (default 2: the CI machine has 2 cores)
#   CTEST_ARGS extra arguments for ctest, e.g. "-R Daemon"
#   FUZZ_SECONDS  run time of each libFuzzer target (default 60; scripts/fuzz.sh)
#   SKIP_FUZZ     1: leave out the fuzzers (quick local runs; CI always fuzzes)
#   SKIP_SANITIZE 1: leave out the ASan + UBSan build and run of the suite (scripts/sanitize.sh;
#                 quick local runs; CI always runs it)
#   SKIP_OPS      1: leave out the operator checks (k8s-check.sh, container-check.sh,
#                 systemd-check.sh; they need root; CI always runs them)
#   SYSTEMD_KILLS SIGKILLs in systemd-check.sh's crash loop (default 5; the full check is 100)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$repo/build}
JOBS=${JOBS:-2}

t0=$SECONDS
bash "$repo/scripts/install-deps.sh"

echo "test: configuring $BUILD_DIR"
# Debian's interpreter (python3-torch is for it), whatever python3 comes first on PATH.
cmake -S "$repo" -B "$BUILD_DIR" -DWEIGHTD_WERROR=ON -DWEIGHTD_BUILD_TESTS=ON -DWEIGHTD_BUILD_BENCH=ON \
  -DPython_EXECUTABLE=/usr/bin/python3 -DWEIGHTD_WITH_PYTHON=ON
echo "test: building with -j$JOBS"
cmake --build "$BUILD_DIR" -j "$JOBS"
echo "test: checking the lock annotations with clang (scripts/thread-safety.sh)"
BUILD_DIR=$BUILD_DIR JOBS=$JOBS bash "$repo/scripts/thread-safety.sh"
echo "test: running the test suite"
# shellcheck disable=SC2086  # CTEST_ARGS is a list of arguments
ctest --test-dir "$BUILD_DIR" -j "$JOBS" --output-on-failure --timeout 300 ${CTEST_ARGS:-}
echo "test: checking the systemd unit, sysusers.d and tmpfiles.d as installed"
BUILD_DIR=$BUILD_DIR bash "$repo/scripts/check-systemd.sh"
echo "test: checking the installed package with a downstream project (scripts/check-install.sh)"
BUILD_DIR=$BUILD_DIR JOBS=$JOBS bash "$repo/scripts/check-install.sh"
if [[ ${SKIP_OPS:-0} == 1 ]]; then
  echo "test: SKIP_OPS=1: not running the operator checks"
else
  echo "test: the Kubernetes manifests in deploy/ (scripts/k8s-check.sh)"
  bash "$repo/scripts/k8s-check.sh"
  echo "test: the daemon and its clients in containers (scripts/container-check.sh)"
  BUILD_DIR=$BUILD_DIR bash "$repo/scripts/container-check.sh"
  echo "test: weightd under a real systemd, ${SYSTEMD_KILLS:-5} SIGKILLs (scripts/systemd-check.sh; KILLS=100 for the full run)"
  BUILD_DIR=$BUILD_DIR KILLS=${SYSTEMD_KILLS:-5} bash "$repo/scripts/systemd-check.sh"
fi
if [[ ${SKIP_FUZZ:-0} == 1 ]]; then
  echo "test: SKIP_FUZZ=1: not running the fuzzers"
else
  echo "test: fuzzing (scripts/fuzz.sh: clang-14 libFuzzer targets, ${FUZZ_SECONDS:-60} s each)"
  JOBS=$JOBS bash "$repo/scripts/fuzz.sh"
fi
if [[ ${SKIP_SANITIZE:-0} == 1 ]]; then
  echo "test: SKIP_SANITIZE=1: not running the sanitizer build"
else
  echo "test: the suite under ASan + UBSan (scripts/sanitize.sh)"
  JOBS=$JOBS bash "$repo/scripts/sanitize.sh"
fi
echo "test: all passed in $((SECONDS - t0)) s"
