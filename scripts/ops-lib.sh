# ops-lib.sh — shared by scripts/systemd-check.sh and scripts/container-check.sh (sourced, not
# run): messages, waiting, Prometheus samples, and a Debian root booted with systemd-nspawn.
# The sourcing script sets ops_name (its messages' prefix) and ROOT_CACHE.

say() { echo "$ops_name: $*"; }
fail() { echo "$ops_name: FAIL: $*" >&2; exit 1; }

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every 0.1 s until it succeeds; fails after SECONDS.
wait_for() {
  local limit=$1 what=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [[ $SECONDS -lt $deadline ]] || fail "timed out after ${limit} s waiting for $what"
    sleep 0.1
  done
}

# metric NAME: the value of the sample NAME (with its labels, if any, written exactly as the
# daemon writes them) in the Prometheus text on stdin; empty if absent.
metric() {
  awk -v n="$1" '$1 == n { print $2; exit }'
}

# The Debian packages of the roots both checks use: systemd as PID 1 (systemd, dbus, passwd for
# useradd, procps for the unit's ExecReload=/bin/kill, which standard installs have and a minbase
# root lacks) and the daemon's runtime libraries (ldd of weightd and libweightd: no LibTorch).
# One list, so that CI runs mmdebstrap once (the container image carries systemd's files too).
ops_packages=systemd,dbus,passwd,procps,libzmq5,libspdlog1.10,libfmt9,libcpp-httplib0.11,libxxhash0

# ops_debian_root DIR [PACKAGES]: a Debian 12 (bookworm) minbase root with PACKAGES (comma
# separated; default ops_packages) in DIR, from a tarball cached under ROOT_CACHE by the package
# list (mmdebstrap runs once per list and machine: 20 s to 3 min with the downloads; later runs
# unpack it in seconds).
ops_debian_root() {
  local dir=$1 packages=${2:-$ops_packages}
  local key tarball
  key=$(printf 'bookworm minbase %s' "$packages" | sha256sum | cut -c1-16)
  tarball=$ROOT_CACHE/root-$key.tar
  if [[ ! -f "$tarball" ]]; then
    say "building the Debian root (mmdebstrap bookworm, $packages) into $tarball"
    mkdir -p "$ROOT_CACHE"
    mmdebstrap --quiet --variant=minbase --include="$packages" bookworm "$tarball.tmp.tar" ||
      fail "mmdebstrap failed (is Debian's mirror reachable?)"
    mv "$tarball.tmp.tar" "$tarball"
  fi
  mkdir -p "$dir"
  tar -C "$dir" -xf "$tarball" || fail "unpacking $tarball failed"
}

# ops_boot DIR CONSOLE_LOG [NSPAWN_OPTION...]: boots DIR with systemd as PID 1 in a container
# (nspawn, private network, not registered with machined) and waits until the system is running.
# Sets nspawn_pid and leader (the container's PID 1 as the host sees it, for nsenter).
ops_boot() {
  local dir=$1 log=$2
  shift 2
  systemd-nspawn --quiet --register=no --keep-unit --private-network --console=read-only "$@" \
    -D "$dir" -b >"$log" 2>&1 </dev/null &
  nspawn_pid=$!
  leader=
  local deadline=$((SECONDS + 60)) p
  while [[ -z "$leader" ]]; do
    for p in $(pgrep -P "$nspawn_pid" 2>/dev/null); do
      [[ $(cat "/proc/$p/comm" 2>/dev/null) == systemd ]] && leader=$p
    done
    kill -0 "$nspawn_pid" 2>/dev/null || fail "systemd-nspawn exited: $(tail -20 "$log")"
    [[ $SECONDS -lt $deadline ]] || fail "no systemd in the container after 60 s: $(tail -20 "$log")"
    [[ -n "$leader" ]] || sleep 0.1
  done
  # Until the container's D-Bus is up, systemctl cannot even ask ("Failed to connect to bus").
  local state=
  deadline=$((SECONDS + 120))
  until [[ "$state" == running || "$state" == degraded ]]; do
    [[ $SECONDS -lt $deadline ]] || fail "the container's systemd is '$state' after 120 s: $(tail -20 "$log")"
    sleep 0.2
    state=$(timeout 60 nsenter -t "$leader" -a systemctl is-system-running --wait 2>&1) || true
  done
  if [[ "$state" == degraded ]]; then
    say "the container's system is degraded (units unrelated to weightd failed): $(nsenter -t "$leader" -a systemctl --failed --no-legend --plain | awk '{print $1}' | paste -sd' ')"
  fi
  say "booted $(nsenter -t "$leader" -a systemctl --version | head -1) as PID 1 (nspawn pid $nspawn_pid, leader $leader): $state"
}

# in_root COMMAND...: runs COMMAND in every namespace of the booted container, as root there.
in_root() { nsenter -t "$leader" -a "$@"; }

# ops_metrics: the daemon's Prometheus text, through weightctl (root is an admin).
ops_metrics() { in_root "$bindir/weightctl" stats --metrics; }

# ops_http PATH: the raw HTTP answer of the daemon's loopback listener for GET PATH, from inside
# the container's network namespace (bash's /dev/tcp: the root has no curl).
ops_http() {
  nsenter -t "$leader" --net -- bash -c 'exec 3<>/dev/tcp/127.0.0.1/9464 && printf "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n" "$1" >&3 && cat <&3' _ "$1"
}
