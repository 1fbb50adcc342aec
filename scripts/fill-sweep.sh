#!/usr/bin/env bash
# fill-sweep.sh — on the GPU machine: the host fill of a ~10 GB checkpoint from the page cache,
# fill = write against fill = map, at loader_threads 4, 8 and 16, next to `cat FILES >
# /dev/null` of the same files (the limit), all in one run (issue 18). Prints a table last.
#
# Each measurement is a fresh daemon (--no-gpu: the host fill alone) that loads the model with
# `weightctl load`; the time is the daemon's own "resident ... in N ms" log line (plan and fill,
# page cache -> segments). Before each load the files are read with cat, which both makes sure
# that they are in the page cache and gives a cat sample (the first cat, which may read the
# disk, is not counted). Settings are interleaved, REPS rounds of all of them.
#
# Environment (all optional):
#   OUT         where logs and fill-sweep.tsv go (default: <repo>/results/fill-sweep-<time>)
#   BUILD_DIR   build folder (default: <repo>/build-gpucheck)
#   DEPS        extraction root of the carried libraries (default: /tmp/deps)
#   SKIP_BUILD  1 to reuse BUILD_DIR as it is (default: build weightd, weightctl and
#               weightd-gen with scripts/gpu-check.sh, RUN_TESTS=0)
#   WORK        where the checkpoint lives (default: /tmp/wd-e2e; the model is
#               $WORK/models/dit5b, the same as bench/e2e/run.py's, so either reuses the other's)
#   PRESET      weightd-gen preset (default: dit5b, 10.19 GB in 3 shards)
#   THREADS     loader_threads values (default: "4 8 16")
#   FILLS       fill methods (default: "write map")
#   REPS        rounds (default: 3)
#   BUDGET_S    stop starting rounds when less than a round's worth is left (default: 290)
# Exit status: 0 when every load succeeded.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$repo/results/fill-sweep-$(date +%Y%m%d-%H%M%S)}
BUILD_DIR=${BUILD_DIR:-$repo/build-gpucheck}
DEPS=${DEPS:-/tmp/deps}
WORK=${WORK:-/tmp/wd-e2e}
PRESET=${PRESET:-dit5b}
THREADS=${THREADS:-4 8 16}
FILLS=${FILLS:-write map}
REPS=${REPS:-3}
BUDGET_S=${BUDGET_S:-290}
mkdir -p "$OUT"
t0=$SECONDS
say() { echo "[fill-sweep $(date +%H:%M:%S) +$((SECONDS - t0))s] $*" | tee -a "$OUT/fill-sweep.log"; }

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  say "building weightd weightctl weightd-gen in $BUILD_DIR"
  rc=0
  OUT="$OUT/build" BUILD_DIR="$BUILD_DIR" DEPS="$DEPS" RUN_TESTS=0 PY_TESTS=0 BENCH=0 \
    TARGETS="weightd weightctl weightd-gen" bash "$repo/scripts/gpu-check.sh" >"$OUT/build.log" 2>&1 || rc=$?
  tail -5 "$OUT/build.log"
  tar -czf "$OUT/build-logs.tar.gz" -C "$OUT" build build.log && rm -rf "$OUT/build" "$OUT/build.log"
  [[ $rc -eq 0 ]] || { echo "fill-sweep: the build failed (see build-logs.tar.gz)" >&2; exit "$rc"; }
  say "build done"
fi
export LD_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
weightd=$BUILD_DIR/cached/weightd
weightctl=$BUILD_DIR/client/weightctl
gen=$BUILD_DIR/examples/weightd-gen
for b in "$weightd" "$weightctl"; do [[ -x $b ]] || { echo "fill-sweep: $b is not built" >&2; exit 2; }; done

model=$WORK/models/$PRESET
if [[ ! -e $model/model.safetensors.index.json && ! -e $model/model.safetensors ]]; then
  [[ -x $gen ]] || { echo "fill-sweep: $gen is not built and $model does not exist" >&2; exit 2; }
  say "generating $PRESET into $model"
  mkdir -p "$WORK/models"
  "$gen" --preset "$PRESET" --out "$model" --seed 1 >"$OUT/gen.log" 2>&1
  sync
  say "generated"
fi
mapfile -t files < <(find "$model" -maxdepth 1 -name '*.safetensors' | sort)
file_bytes=$(stat -c %s "${files[@]}" | awk '{s += $1} END {print s}')
say "$PRESET: ${#files[@]} shards, $file_bytes bytes; $(nproc) cores; $(awk '/MemTotal/ {print $2 / 1048576 " GiB"}' /proc/meminfo); /dev/shm $(df -h --output=avail /dev/shm | tail -1) free"
say "shmem_enabled: $(cat /sys/kernel/mm/transparent_hugepage/shmem_enabled 2>/dev/null || echo '?')"

run=$WORK/fill-sweep-run
mkdir -p "$run"
sock="ipc://$run/w.sock"
prefix="wdsweep$$"
daemon_pid=
stop_daemon() {
  if [[ -n $daemon_pid ]]; then
    kill -TERM "$daemon_pid" 2>/dev/null || true
    wait "$daemon_pid" 2>/dev/null || true
    daemon_pid=
  fi
}
trap stop_daemon EXIT

now_ns() { date +%s%N; }
tsv=$OUT/fill-sweep.tsv
printf 'what\tfill\tthreads\trep\tms\tgbps\n' >"$tsv"

cat_once() {  # rep: prints the time of `cat files > /dev/null`
  local a b
  a=$(now_ns)
  cat "${files[@]}" >/dev/null
  b=$(now_ns)
  echo $(((b - a) / 1000000))
}

failures=0
load_once() {  # fill threads rep
  local fill=$1 threads=$2 rep=$3 log="$OUT/weightd-$1-$2-$3.log" line ms bytes
  "$weightd" --socket "$sock" --shm-prefix "$prefix" --model "$PRESET=$model" --no-gpu \
    --fill "$fill" --loader-threads "$threads" >"$log" 2>&1 </dev/null &
  daemon_pid=$!
  for _ in $(seq 300); do
    "$weightctl" --socket "$sock" --timeout 1 list >/dev/null 2>&1 && break
    kill -0 "$daemon_pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! "$weightctl" --socket "$sock" --timeout 300 load "$PRESET" >>"$OUT/weightctl.log" 2>&1; then
    say "  $fill threads $threads rep $rep: load FAILED (see $log)"
    failures=$((failures + 1))
    stop_daemon
    return
  fi
  stop_daemon
  # "model 'dit5b' resident: 3 shards, 270 tensors, N bytes in M ms (X GB/s; 16 readers: read ...%, ...)"
  line=$(grep -m1 "model '$PRESET' resident:" "$log" || true)
  profile=$(sed -n 's/.* GB\/s; \(.*\))$/\1/p' <<<"$line")
  bytes=$(sed -n 's/.* tensors, \([0-9]*\) bytes in .*/\1/p' <<<"$line")
  ms=$(sed -n 's/.* bytes in \([0-9]*\) ms.*/\1/p' <<<"$line")
  if [[ -z $ms || -z $bytes ]]; then
    say "  $fill threads $threads rep $rep: no 'resident' line in $log"
    failures=$((failures + 1))
    return
  fi
  printf 'fill\t%s\t%s\t%s\t%s\t%s\n' "$fill" "$threads" "$rep" "$ms" \
    "$(awk -v b="$bytes" -v ms="$ms" 'BEGIN {printf "%.2f", b / (ms > 0 ? ms : 1) / 1e6}')" >>"$tsv"
  say "  $fill threads $threads rep $rep: $ms ms${profile:+ ($profile)}"
}

say "warming the page cache (first cat, not counted): $(cat_once) ms"
n_settings=$(($(wc -w <<<"$FILLS") * $(wc -w <<<"$THREADS")))
for rep in $(seq "$REPS"); do
  round_t0=$SECONDS
  for threads in $THREADS; do
    for fill in $FILLS; do
      ms=$(cat_once)
      printf 'cat\t-\t-\t%s\t%s\t%s\n' "$rep" "$ms" \
        "$(awk -v b="$file_bytes" -v ms="$ms" 'BEGIN {printf "%.2f", b / (ms > 0 ? ms : 1) / 1e6}')" >>"$tsv"
      load_once "$fill" "$threads" "$rep"
    done
  done
  round_s=$((SECONDS - round_t0))
  say "round $rep of $REPS ($n_settings settings) took ${round_s} s"
  if ((rep < REPS && SECONDS - t0 + round_s + 10 > BUDGET_S)); then
    say "stopping after $rep rounds: another would pass BUDGET_S=$BUDGET_S"
    break
  fi
done
rm -rf "$run"

# The table: median (min-max) GB/s per setting, and the median over the median of cat.
{
  echo
  echo "host fill from the page cache, $PRESET ($file_bytes file bytes), $(nproc) cores; GB/s = bytes / time"
  awk -F'\t' '
    function sort(a, n,   i, j, t) { for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] > a[j]; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t } }
    function med(a, n) { sort(a, n); return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    NR == 1 { next }
    { key = $1 == "cat" ? "cat" : $2 " " $3; n[key]++; v[key, n[key]] = $6; if (!(key in seen)) { seen[key] = 1; order[++k] = key } }
    END {
      for (i = 1; i <= n["cat"]; i++) c[i] = v["cat", i]
      catm = n["cat"] ? med(c, n["cat"]) : 0
      printf "%-22s %6s %10s %16s %8s\n", "setting", "reps", "median GB/s", "min-max", "of cat"
      for (j = 1; j <= k; j++) {
        key = order[j]; delete a
        for (i = 1; i <= n[key]; i++) a[i] = v[key, i]
        m = med(a, n[key])
        split(key, p, " ")
        name = key == "cat" ? "cat > /dev/null" : "fill=" p[1] " threads=" p[2]
        ratio = catm > 0 ? sprintf("%.2f", m / catm) : "-"
        printf "%-22s %6d %10.2f %7.2f-%-8.2f %8s\n", name, n[key], m, a[1], a[n[key]], ratio
      }
    }' "$tsv"
} | tee "$OUT/fill-sweep.txt"
say "done in $((SECONDS - t0)) s; raw samples in $tsv"
[[ $failures -eq 0 ]]
