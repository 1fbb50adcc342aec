#!/usr/bin/env bash
# demo.sh — the README's first command. Installs what weightd needs (Debian 12), builds the
# daemon, weightctl and the example, then:
#   1. writes the example classifier's weights (a ResNet-50-sized network, ~100 MB of
#      safetensors) with the generator, once;
#   2. starts weightd on an embedded default config whose socket, segments and runtime dir
#      live under the build tree (no root needed, nothing under /run or /etc is touched);
#   3. runs the example network three times: reading the checkpoint file itself, attaching
#      through weightd while the daemon loads it (cold), and attaching to the resident copy
#      (warm). Each run prints its time to ready and its top-5 class scores;
#   4. attaches from Python (examples/python_attach.py with the weightd package and Debian's
#      python3-torch), checking every tensor against the file bytes;
#   5. checks that all three runs computed bit-identical scores, prints a summary table, and
#      stops the daemon.
#
# Environment (optional):
#   BUILD_DIR  build folder (default: <repo>/build)
#   JOBS       build parallelism (default 2)
#   PRESET     example preset: classifier (default) or tiny
#   KEEP=1     leave the daemon running at the end (the script prints how to stop it)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$repo/build}
JOBS=${JOBS:-2}
PRESET=${PRESET:-classifier}
demo=$BUILD_DIR/demo
run=$demo/run

bash "$repo/scripts/install-deps.sh"
echo "demo: building weightd, weightctl, weightd-gen, weightd-example and the Python package"
cmake -S "$repo" -B "$BUILD_DIR" -DPython_EXECUTABLE=/usr/bin/python3 -DWEIGHTD_WITH_PYTHON=ON >/dev/null
cmake --build "$BUILD_DIR" -j "$JOBS" --target weightd weightctl weightd-gen weightd-example weightd_python

weightd=$BUILD_DIR/cached/weightd
weightctl=$BUILD_DIR/client/weightctl
gen=$BUILD_DIR/examples/weightd-gen
example=$BUILD_DIR/examples/weightd-example
model_dir=$demo/models/$PRESET
socket=ipc://$run/weightd.sock

mkdir -p "$run" "$demo/models"
chmod 0750 "$run"
if [[ ! -f "$model_dir/model.safetensors" && ! -f "$model_dir/model.safetensors.index.json" ]]; then
  echo "demo: generating the '$PRESET' checkpoint in $model_dir"
  "$gen" --preset "$PRESET" --out "$model_dir" --seed 1 | tail -1
fi

# The embedded default config: everything under the build tree, segments under a prefix of
# their own so that the demo never meets a system daemon's segments.
cat >"$demo/weightd.toml" <<TOML
# Written by scripts/demo.sh. See README.md, "Configuration".
[daemon]
socket = "$socket"
shm_prefix = "weightd-demo-$(id -u)"
heartbeat_timeout = "10s"

[models.$PRESET]
path = "$model_dir"
TOML

if "$weightctl" --socket "$socket" --timeout 2 stats >/dev/null 2>&1; then
  echo "demo: a daemon already serves $socket; stop it first (kill \$(cat $run/weightd.pid))" >&2
  exit 1
fi
echo "demo: starting weightd (config $demo/weightd.toml, log $run/weightd.log)"
"$weightd" --config "$demo/weightd.toml" >"$run/weightd.log" 2>&1 &
daemon=$!
echo "$daemon" >"$run/weightd.pid"
stop_daemon() {
  if kill -0 "$daemon" 2>/dev/null; then
    kill -TERM "$daemon" && wait "$daemon" 2>/dev/null || true
  fi
  rm -f "$run/weightd.pid"
}
if [[ "${KEEP:-0}" != 1 ]]; then trap stop_daemon EXIT; fi

for _ in $(seq 1 100); do
  "$weightctl" --socket "$socket" --timeout 1 list >/dev/null 2>&1 && break
  kill -0 "$daemon" 2>/dev/null || { echo "demo: weightd exited:" >&2; cat "$run/weightd.log" >&2; exit 1; }
  sleep 0.1
done

declare -A ready weights digest
run_example() {  # label, then the example's arguments
  local label=$1; shift
  echo
  echo "---- $label: weightd-example $* ----"
  local out
  out=$("$example" --preset "$PRESET" "$@")
  echo "$out"
  ready[$label]=$(sed -n 's/^time to ready: \([0-9.]*\) ms.*/\1/p' <<<"$out")
  weights[$label]=$(sed -n 's/^time to ready: .*weights \([0-9.]*\) ms.*/\1/p' <<<"$out")
  digest[$label]=$(sed -n 's/^scores digest: //p' <<<"$out")
}
run_example from-file --from-file "$model_dir"
run_example attach-cold --attach "$PRESET" --socket "$socket"
run_example attach-warm --attach "$PRESET" --socket "$socket"

echo
echo "---- python-attach: examples/python_attach.py $PRESET ----"
py_out=$(PYTHONPATH=$BUILD_DIR/python /usr/bin/python3 "$repo/examples/python_attach.py" "$PRESET" --socket "$socket")
echo "$py_out"
py_ms=$(sed -n 's/.*: \([0-9.]*\) ms$/\1/p' <<<"$py_out")
py_equal=$(sed -n 's/^bitwise equal to the files: //p' <<<"$py_out")

echo
echo "---- weightctl stats ----"
"$weightctl" --socket "$socket" stats

echo
echo "==================== weightd demo: $PRESET ===================="
printf '%-12s %16s %14s  %s\n' RUN "TIME TO READY" "OF IT WEIGHTS" "SCORES DIGEST"
for label in from-file attach-cold attach-warm; do
  printf '%-12s %13s ms %11s ms  %s\n' "$label" "${ready[$label]}" "${weights[$label]}" "${digest[$label]}"
done
if [[ "${digest[from-file]}" != "${digest[attach-cold]}" || "${digest[from-file]}" != "${digest[attach-warm]}" ]]; then
  echo "demo: FAILED: the runs computed different scores" >&2
  exit 1
fi
echo "all three runs computed identical class scores"
printf '%-12s %13s ms %14s  %s\n' python-attach "$py_ms" "-" "tensors bitwise equal to the files: $py_equal"
if [[ "$py_equal" != yes ]]; then
  echo "demo: FAILED: the Python attach did not see the file's bytes" >&2
  exit 1
fi
if [[ "${KEEP:-0}" == 1 ]]; then
  echo "weightd keeps running (pid $daemon): WEIGHTD_SOCKET=$socket $weightctl list; stop it with kill $daemon"
fi
