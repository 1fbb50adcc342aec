#!/usr/bin/env bash
# bench-e2e.sh — the end-to-end benchmark (issue 6) on the GPU machine in one command: builds
# what it needs with scripts/gpu-check.sh (no tests, no Google Benchmark programs), then runs
# bench/e2e/run.py. See docs/benchmarks.md, "End-to-end harness".
#
#   OUT=/tmp/out bash scripts/bench-e2e.sh [run.py arguments...]
#   e.g. OUT=$OUT bash scripts/bench-e2e.sh --models dit5b --phases limits,rows
#
# Environment: OUT (results; default <repo>/results/e2e-<time>), BUILD_DIR (default
# <repo>/build-gpucheck), DEPS (default /tmp/deps), SKIP_BUILD=1 to reuse a build as it is,
# BUDGET_S (default 450): the harness starts no new repetition once the build and the harness
# together have run this long (it passes --deadline-s; an explicit --deadline-s wins); the rest
# as for gpu-check.sh. The build's logs end up in $OUT/e2e-build-logs.tar.gz.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$repo/results/e2e-$(date +%Y%m%d-%H%M%S)}
BUILD_DIR=${BUILD_DIR:-$repo/build-gpucheck}
DEPS=${DEPS:-/tmp/deps}
BUDGET_S=${BUDGET_S:-450}
mkdir -p "$OUT"
t0=$SECONDS
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  # gpu-check.sh writes several logs; keep them in one tar, since few files come back.
  rc=0
  OUT="$OUT/build" BUILD_DIR="$BUILD_DIR" DEPS="$DEPS" RUN_TESTS=0 PY_TESTS=0 BENCH=1 BENCH_FILTER='^$' \
    TARGETS="weightd weightctl weightd-gen weightd-example weightd_bench_e2e_attach weightd_python" \
    bash "$repo/scripts/gpu-check.sh" >"$OUT/build.log" 2>&1 || rc=$?
  tail -12 "$OUT/build.log"
  tar -czf "$OUT/e2e-build-logs.tar.gz" -C "$OUT" build build.log && rm -rf "$OUT/build" "$OUT/build.log"
  [[ $rc -eq 0 ]] || { echo "bench-e2e: the build failed (see e2e-build-logs.tar.gz)" >&2; exit "$rc"; }
fi
export LD_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
deadline=$((BUDGET_S - (SECONDS - t0)))
(( deadline > 60 )) || deadline=60
echo "bench-e2e: build took $((SECONDS - t0)) s; harness deadline ${deadline} s"
exec python3 "$repo/bench/e2e/run.py" --build "$BUILD_DIR" --out "$OUT" --deadline-s "$deadline" "$@"
