#!/usr/bin/env bash
# systemd-check.sh — runs weightd under a real systemd, as an operator would, and checks what
# the unit promises (README.md, "Running weightd as a system service" and "Crash safety").
#
# The development and CI machines run no systemd as PID 1, but Debian 12's systemd 252 boots as
# PID 1 in a container: a root made from Debian packages (mmdebstrap, cached), booted with
# systemd-nspawn. qemu-system was not used: the machines have no KVM, so a VM boot would cost
# minutes, and the container's systemd is the same binary with the same unit semantics. nspawn
# needs --register=no (no machined/D-Bus on the host: without it nspawn stops at "Failed to open
# system bus") and a private network (the daemon's metrics listener then binds the container's
# own loopback).
#
# What it does:
#   1. a bookworm root with systemd, dbus and the daemon's runtime libraries (ldd of weightd:
#      libzmq5, libspdlog1.10, libfmt9, libcpp-httplib0.11, libxxhash0; no LibTorch) and procps
#      (the unit's ExecReload= runs its /bin/kill; standard Debian installs have it, a minbase
#      root does not), cached as a tarball keyed by its package list (scripts/ops-lib.sh);
#   2. `DESTDIR=ROOT cmake --install BUILD_DIR`, the example checkpoints written by weightd-gen
#      into ROOT/srv/models, a weightd.toml with preloads (one of them a corrupt model);
#   3. boots it; inside, the shipped sysusers.d and tmpfiles.d files applied by the real
#      systemd-sysusers and systemd-tmpfiles; users alice (in group weightd) and bob (not);
#   4. `systemctl start weightd`: returns only after the preloads (ActiveEnterTimestamp after the
#      daemon's own start-to-ready time, the models resident, /readyz 200), STATUS= showed
#      "preloading: ..." while it ran, the corrupt preload failed without failing the unit;
#   5. alice attaches and verifies every byte (weightctl attach --verify); bob is refused;
#   6. `systemctl reload weightd` (SIGHUP) makes a model added to the file attachable, same PID;
#   7. KILLS times `systemctl kill -s SIGKILL weightd` while weightd_ops_client_loop (outside
#      the container's mount namespace, with only /run/weightd bound in, in its PID namespace,
#      as alice's uid and the weightd gid) loops over attach, verify, forward: each time the
#      unit is active again with a new PID, the new daemon adopted every resident model and
#      read 0 bytes from disk (its metrics), and at the end the client reports 0 errors;
#   8. the journal carries the daemon's lines at their priorities (a failed preload at err,
#      adoption lines at info: the daemon's "<N>" prefixes under journald);
#   9. `systemd-analyze security weightd.service` on the running system: exposure <= MAX_EXPOSURE;
#  10. `systemctl stop weightd` stops it cleanly; the container is powered off.
#
# Needs root, systemd-container and mmdebstrap (scripts/install-deps.sh installs them), Debian's
# mirror on first use, and a built tree with weightd, weightctl, weightd-gen and
# weightd_ops_client_loop (the test build has them).
#
# Environment (optional):
#   BUILD_DIR     built tree (default <repo>/build)
#   KILLS         SIGKILLs in step 7 (default 100, about 4 min; scripts/test.sh runs 5)
#   MAX_EXPOSURE  highest acceptable `systemd-analyze security` exposure (default 2.0)
#   ROOT_CACHE    where the root tarball is cached (default /var/cache/weightd-check)
#   KEEP          1: leave the container running at the end (prints how to reach it)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$repo/build}
KILLS=${KILLS:-100}
MAX_EXPOSURE=${MAX_EXPOSURE:-2.0}
ROOT_CACHE=${ROOT_CACHE:-/var/cache/weightd-check}
KEEP=${KEEP:-0}
# shellcheck source=scripts/ops-lib.sh
source "$repo/scripts/ops-lib.sh"
ops_name=systemd-check

[[ $(id -u) -eq 0 ]] || fail "needs root (it boots a container)"
for tool in systemd-nspawn mmdebstrap nsenter unshare setpriv; do
  command -v "$tool" >/dev/null || fail "$tool not found (scripts/install-deps.sh installs it)"
done
gen=$BUILD_DIR/examples/weightd-gen
loop=$BUILD_DIR/tests/weightd_ops_client_loop
for f in "$BUILD_DIR/cached/weightd" "$BUILD_DIR/client/weightctl" "$gen" "$loop"; do
  [[ -x "$f" ]] || fail "$f is not built (build the tree first)"
done

scratch=$(mktemp -d /var/tmp/weightd-systemd-check.XXXXXX)
root=$scratch/root
nspawn_pid=
client_pid=
cleanup() {
  local rc=$?
  [[ -n "$client_pid" ]] && kill "$(pgrep -P "$client_pid")" "$client_pid" 2>/dev/null || true
  if [[ "$KEEP" == 1 && -n "$nspawn_pid" ]]; then
    say "KEEP=1: the container runs (nspawn pid $nspawn_pid); enter it with: nsenter -t $leader -a bash"
    say "stop it with: nsenter -t $leader -a systemctl poweroff; rm -rf $scratch"
    exit "$rc"
  fi
  if [[ -n "$nspawn_pid" ]] && kill -0 "$nspawn_pid" 2>/dev/null; then
    nsenter -t "$leader" -a systemctl poweroff 2>/dev/null || kill "$nspawn_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$nspawn_pid" 2>/dev/null || true
  fi
  rm -rf "$scratch"
  exit "$rc"
}
trap cleanup EXIT

# ---- 1. the root ------------------------------------------------------------------------------
ops_debian_root "$root"

# ---- 2. the install, the models, the configuration -------------------------------------------
DESTDIR=$root cmake --install "$BUILD_DIR" >"$scratch/install.log" 2>&1 ||
  { cat "$scratch/install.log" >&2; fail "cmake --install failed"; }
unit=$(cd "$root" && find . -path '*/lib/systemd/system/weightd.service' -printf '/%P\n' -quit)
config=$(cd "$root" && find . -path '*/etc/weightd/weightd.toml' -printf '/%P\n' -quit)
[[ -n "$unit" && -n "$config" ]] || fail "the install has no weightd.service or weightd.toml"
bindir=$(dirname "$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$root$unit")")
say "installed: unit $unit, config $config, binaries in $bindir"

models=$root/srv/models
mkdir -p "$models"
"$gen" --preset classifier --out "$models/classifier" --seed 1 >/dev/null
# Two more preloads of the same size (hard links: other directories, the same bytes), so that the
# preloading phase lasts long enough for STATUS= to be seen.
for m in c2 c3; do
  mkdir "$models/$m"
  ln "$models/classifier/"* "$models/$m/"
done
"$gen" --preset tiny --out "$models/tiny" --seed 2 >/dev/null
mkdir "$models/broken"
# A header length far beyond the file: the loader's typed error, never a crash.
printf '\xff\xff\xff\x00\x00\x00\x00\x00{}' >"$models/broken/model.safetensors"
chmod -R a+rX "$models"
{
  printf '[daemon]\nsocket = "ipc:///run/weightd/weightd.sock"\nloader_threads = 1\n'
  printf 'http_listen = "127.0.0.1:9464"\n'
  for m in classifier c2 c3 broken; do
    printf '\n[models.%s]\npath = "/srv/models/%s"\npreload = ["host"]\n' "$m" "$m"
  done
} >"$root$config"

# ---- 3. boot -----------------------------------------------------------------------------------
# /run/weightd is a host directory bound in, as a hostPath socket directory is for a DaemonSet:
# the client of step 7 lives outside the container and sees only that directory. The unit's
# RuntimeDirectory= still owns it (systemd chowns and chmods it at each start).
sockdir=$scratch/run-weightd
mkdir -p "$sockdir"
ops_boot "$root" "$scratch/console.log" --bind="$sockdir:/run/weightd"
in_root ldconfig
# The shipped files, applied by the real tools (boot ran them too; running them again must be
# clean and idempotent).
out=$(in_root systemd-sysusers 2>&1) || fail "systemd-sysusers failed: $out"
out=$(in_root systemd-tmpfiles --create 2>&1) || fail "systemd-tmpfiles --create failed: $out"
grep -Eq '^x +/dev/shm/weightd-\*' <<<"$(in_root systemd-tmpfiles --cat-config)" ||
  fail "tmpfiles.d: the installed weightd.conf is not in systemd-tmpfiles' configuration"
in_root getent passwd weightd >/dev/null || fail "sysusers.d created no user weightd"
in_root getent group weightd >/dev/null || fail "sysusers.d created no group weightd"
in_root useradd --create-home --groups weightd alice
in_root useradd --create-home bob
alice_uid=$(in_root id -u alice)
alice_gid=$(in_root id -g alice)
weightd_gid=$(in_root getent group weightd | cut -d: -f3)
say "sysusers.d: $(in_root id weightd); users: $(in_root id alice); $(in_root id bob)"
in_root systemctl daemon-reload

# ---- 4. start: READY=1 after the preloads, STATUS=, a failed preload -----------------------------
in_root systemctl start weightd &
start_job=$!
statuses=$scratch/statuses
: >"$statuses"
while kill -0 "$start_job" 2>/dev/null; do
  in_root systemctl show -p ActiveState -p StatusText weightd 2>/dev/null | sort | paste -sd' ' >>"$statuses" || true
done
wait "$start_job" || fail "systemctl start weightd failed: $(in_root systemctl status weightd --no-pager 2>&1 | tail -20)"
[[ $(in_root systemctl is-active weightd) == active ]] || fail "weightd is not active after systemctl start"
grep -q 'ActiveState=activating StatusText=preloading: ' "$statuses" ||
  fail "STATUS= never showed 'preloading: ...' while the unit was activating; seen: $(sort -u "$statuses" | paste -sd'|')"
say "while starting, systemd showed: $(sort -u "$statuses" | grep -o 'StatusText=.*' | sort -u | paste -sd'|')"
status_text=$(in_root systemctl show -p StatusText --value weightd)
[[ "$status_text" == "serving 4 models, "*" leases; failed preloads: broken/host" ]] ||
  fail "StatusText after start is '$status_text', expected the failed preload named"
metrics=$(ops_metrics)
[[ $(metric weightd_ready <<<"$metrics") == 1 ]] || fail "weightd_ready is not 1 once systemctl start returned"
[[ $(metric weightd_preload_failures <<<"$metrics") == 1 ]] || fail "weightd_preload_failures is not 1"
ready_s=$(metric weightd_start_to_ready_seconds <<<"$metrics")
exec_us=$(in_root systemctl show -p ExecMainStartTimestampMonotonic --value weightd)
active_us=$(in_root systemctl show -p ActiveEnterTimestampMonotonic --value weightd)
awk -v r="$ready_s" -v d="$((active_us - exec_us))" 'BEGIN { exit !(d >= r * 1e6) }' ||
  fail "the unit became active $(( (active_us - exec_us) / 1000 )) ms after its start, before the daemon's ready time ${ready_s} s"
for m in classifier c2 c3; do
  grep -q '"state": "resident"' <<<"$(in_root "$bindir/weightctl" --json status "$m")" ||
    fail "model $m is not resident once systemctl start returned: $(in_root "$bindir/weightctl" status "$m")"
done
[[ $(ops_http /readyz | head -1) == *" 200 "* ]] || fail "/readyz is not 200 after systemctl start"
say "start: active $(( (active_us - exec_us) / 1000 )) ms after exec, daemon ready after ${ready_s} s; 3 preloads resident, broken/host failed, unit active"

# ---- 5. who may attach --------------------------------------------------------------------------
out=$(in_root runuser -u alice -- "$bindir/weightctl" attach classifier --verify 2>&1) ||
  fail "alice (group weightd) could not attach and verify: $out"
grep -q 'against the files, OK' <<<"$out" || fail "alice's verify did not report OK: $out"
say "alice: $(tail -1 <<<"$out")"
rc=0
out=$(in_root runuser -u bob -- "$bindir/weightctl" attach classifier 2>&1) || rc=$?
[[ $rc -ne 0 ]] || fail "bob (not in group weightd) attached: $out"
grep -q 'client.socket_denied\|auth.not_a_client' <<<"$out" || fail "bob was refused with an unexpected error: $out"
say "bob: refused (exit $rc): $(grep -o 'PermissionDenied.*' <<<"$out" | head -1)"

# ---- 6. reload ----------------------------------------------------------------------------------
pid_before=$(in_root systemctl show -p MainPID --value weightd)
cat >>"$root$config" <<'TOML'

[models.tiny]
path = "/srv/models/tiny"
TOML
in_root systemctl reload weightd
wait_for 10 "the reloaded catalog listing model tiny" in_root "$bindir/weightctl" status tiny
out=$(in_root runuser -u alice -- "$bindir/weightctl" attach tiny --verify 2>&1) || fail "attaching the reloaded model failed: $out"
[[ $(in_root systemctl show -p MainPID --value weightd) == "$pid_before" ]] || fail "reload changed the daemon's PID"
say "reload: model tiny added by SIGHUP and verified by alice; PID $pid_before unchanged"

# ---- 7. SIGKILL loop while a client loops over attach, verify, forward -----------------------------
# The client runs outside the root (it needs LibTorch, which the root does not have): in a
# private mount namespace where only the container's /run/weightd is bound at /run/weightd,
# inside the container's PID namespace (so the daemon sees and watches its pid), as alice's uid
# with the weightd group: what a containerized client is.
client_log=$scratch/client.json
nsenter -t "$leader" --pid -- unshare --mount --propagation private -- bash -c '
  set -e
  mount -t tmpfs -o mode=0755 tmpfs /run
  mkdir /run/weightd
  mount --bind "$1" /run/weightd
  # The models at the daemon'"'"'s path, for the verify step only (the client reads them itself).
  mount -t tmpfs -o mode=0755 tmpfs /srv
  mkdir /srv/models
  mount --bind -o ro "$6" /srv/models
  exec setpriv --reuid "$2" --regid "$3" --groups "$4" --inh-caps=-all -- "$5" \
    --model tiny --dir /srv/models/tiny --preset tiny --request-timeout-ms 60000
' client "$sockdir" "$alice_uid" "$alice_gid" "$weightd_gid" "$loop" "$models" \
  >"$client_log" 2>"$scratch/client.err" &
client_pid=$!
client_holds_lease() { grep -q '^weightd_model_leases{model="tiny",device="cpu"} [1-9]' <<<"$(ops_metrics)"; }
wait_for 60 "the client loop's first lease" client_holds_lease
# Every host copy resident now (the preloads and tiny) must come back with each restart.
expected_adopted=$(metric 'weightd_resident_models{tier="host",device="cpu"}' <<<"$(ops_metrics)")
say "crash loop: $KILLS x SIGKILL; $expected_adopted models resident before the first kill"
kill_t0=$SECONDS
worst_ms=0
for i in $(seq 1 "$KILLS"); do
  # The unit's StartLimitBurst=5 per 60 s is for crash loops nobody intended; this one is
  # intended, so reset the counter (reset-failed also resets the start rate limiter).
  in_root systemctl reset-failed weightd
  old_pid=$(in_root systemctl show -p MainPID --value weightd)
  restarts=$(in_root systemctl show -p NRestarts --value weightd)
  t0=$(date +%s%N)
  in_root systemctl kill -s SIGKILL weightd
  deadline=$((SECONDS + 60))
  while :; do
    state=$(in_root systemctl show -p ActiveState -p NRestarts -p MainPID weightd | sort | paste -sd' ')
    [[ "$state" == "ActiveState=active MainPID="*" NRestarts=$((restarts + 1))" && "$state" != *"MainPID=$old_pid "* ]] && break
    [[ $SECONDS -lt $deadline ]] || fail "kill $i: the unit is not active again within 60 s ($state)"
    sleep 0.05
  done
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  (( ms > worst_ms )) && worst_ms=$ms
  m=$(ops_metrics)
  [[ $(metric weightd_disk_read_bytes_total <<<"$m") == 0 ]] ||
    fail "kill $i: the restarted daemon read $(metric weightd_disk_read_bytes_total <<<"$m") bytes from disk"
  [[ $(metric weightd_adopted_models <<<"$m") == "$expected_adopted" ]] ||
    fail "kill $i: the restarted daemon adopted $(metric weightd_adopted_models <<<"$m") of $expected_adopted models"
  kill -0 "$client_pid" 2>/dev/null || fail "kill $i: the client loop exited: $(cat "$scratch/client.err")"
  (( i % 10 == 0 )) && say "  $i kills: the unit came back each time (worst ${worst_ms} ms to active), 0 bytes read, $expected_adopted adopted"
done
kill_s=$((SECONDS - kill_t0))
# Let the client make progress after the last restart, then stop it and read its report.
sleep 2
# nsenter forked the client into the container's PID namespace and waits for it: signal the
# client itself, and nsenter returns its exit status.
kill -TERM "$(pgrep -P "$client_pid")"
rc=0
wait "$client_pid" || rc=$?
client_pid=
report=$(tail -1 "$client_log")
say "client loop: $report"
python3 -c 'import json,sys; r=json.loads(sys.argv[1]); sys.exit(0 if r["errors"] == 0 and r["iterations"] > 0 else 1)' \
  "$report" || fail "the client loop reported errors (exit $rc): $report; $(head -20 "$scratch/client.err")"
[[ $rc -eq 0 ]] || fail "the client loop exited $rc: $(head -20 "$scratch/client.err")"
say "crash loop: $KILLS kills in ${kill_s} s, unit active again each time (worst ${worst_ms} ms), every restart adopted $expected_adopted models and read 0 bytes; client: 0 errors"

# ---- 8. the journal's priorities ------------------------------------------------------------------
in_root journalctl -u weightd -o json --no-pager >"$scratch/journal.json"
python3 - "$scratch/journal.json" <<'PY' || fail "the journal's priorities are wrong (above)"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
daemon = [l for l in lines if l.get("SYSLOG_IDENTIFIER") == "weightd"]
failed = [l for l in daemon if "preload of broken/host failed" in l.get("MESSAGE", "")]
adopted = [l for l in daemon if "adopted from the previous instance" in l.get("MESSAGE", "")]
if not failed or not adopted:
    print("systemd-check: journal: no failed-preload or adoption line from the daemon"); sys.exit(1)
f = failed[0]
bad = []
if f.get("PRIORITY") != "3": bad.append("failed preload at priority %s, expected 3 (err)" % f.get("PRIORITY"))
if any(l.get("PRIORITY") != "6" for l in adopted): bad.append("adoption lines not at priority 6 (info)")
# journald strips the "<N>" prefix it reads; one left in a message means it was not read.
if any(l.get("MESSAGE", "").startswith("<") for l in daemon): bad.append("a message still starts with its '<N>' prefix")
for b in bad: print("systemd-check: journal: " + b)
if bad: sys.exit(1)
print("systemd-check: journal: failed preload at err (3), %d adoption lines at info (6)" % len(adopted))
PY

# ---- 9. the sandbox on the running system ------------------------------------------------------
out=$(in_root systemd-analyze security weightd.service --no-pager 2>&1) || true
exposure=$(grep -o 'Overall exposure level for weightd.service: [0-9.]*' <<<"$out" | grep -o '[0-9.]*$') ||
  fail "systemd-analyze security printed no exposure: $out"
awk -v e="$exposure" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(e <= m) }' ||
  fail "systemd-analyze security weightd.service: exposure $exposure > $MAX_EXPOSURE"
say "systemd-analyze security weightd.service (running system): $exposure (<= $MAX_EXPOSURE)"
# Anything systemd found to warn about in the unit on this system (the kills' own notices aside).
warnings=$(in_root journalctl -b --no-pager -o cat -u weightd -p warning -t systemd 2>/dev/null |
  grep -v "Main process exited, code=killed, status=9/KILL\|Failed with result 'signal'" || true)
[[ -z "$warnings" ]] || say "systemd's warnings about the unit: $(paste -sd'|' <<<"$warnings")"

# ---- 10. clean stop -------------------------------------------------------------------------------
in_root systemctl stop weightd
result=$(in_root systemctl show -p Result --value weightd)
[[ $result == success ]] || fail "systemctl stop: the unit's result is '$result'"
say "PASS: systemd $(in_root systemctl --version | head -1 | awk '{print $2}') as PID 1 (nspawn), $KILLS kills"
