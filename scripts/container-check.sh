#!/usr/bin/env bash
# container-check.sh — builds the weightd container image from Debian packages and this tree's
# build (no registry is contacted), runs the daemon in one container and clients in others that
# share only the socket directory with it, as README.md "Containers" describes, and checks:
#   1. the image: a bookworm minbase root with the daemon's runtime libraries (mmdebstrap,
#      cached; the same root as scripts/systemd-check.sh's, so it carries systemd's files too:
#      the runtime libraries alone make a ~180 MB image), `cmake --install` of BUILD_DIR into
#      it, the shipped sysusers.d file applied
#      with systemd-sysusers --root (user weightd with the fixed ids the manifests in deploy/
#      name), imported with `podman import` as localhost/weightd:VERSION;
#   2. the daemon container: its own IPC namespace and its own /dev/shm (--shm-size), the host
#      socket directory at /run/weightd, the models read-only, uid weightd, no network;
#   3. a client container with its own IPC, PID and mount namespaces and its own 64 MiB
#      /dev/shm that sees only the socket directory (read-only): `weightctl attach` maps every
#      shard (they arrive as fds; the segment names are not even visible to it);
#   4. the same with the model directory also mounted read-only: `weightctl attach --verify`
#      compares every byte with the files;
#   5. a client whose uid is outside the client group is refused (client.socket_denied).
#
# podman (Debian's 4.3) runs containers on the development and CI machines only with runc:
# crun, its default runtime, refuses their hybrid cgroup layout ("crun: cgroups in hybrid mode
# not supported, drop all controllers from cgroupv2"), and the rlimits podman asks for by
# default cannot be set without CAP_SYS_RESOURCE, which root lacks there ("crun: setrlimit
# `RLIMIT_NOFILE`: Operation not permitted"). So every run passes --runtime runc and --ulimit
# values no higher than the caller's own hard limits, and --pull=never: nothing is fetched.
#
# Environment (optional):
#   BUILD_DIR   built tree (default <repo>/build)
#   ROOT_CACHE  where the Debian root tarball is cached (default /var/cache/weightd-check)
#   KEEP        1: leave the image and the scratch directory
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$repo/build}
ROOT_CACHE=${ROOT_CACHE:-/var/cache/weightd-check}
KEEP=${KEEP:-0}
# shellcheck source=scripts/ops-lib.sh
source "$repo/scripts/ops-lib.sh"
ops_name=container-check

# The ids deploy/*.yaml use: the daemon's user and group, and a client user.
WEIGHTD_ID=970
CLIENT_UID=1000

[[ $(id -u) -eq 0 ]] || fail "needs root (podman as root)"
for tool in podman runc mmdebstrap systemd-sysusers; do
  command -v "$tool" >/dev/null || fail "$tool not found (scripts/install-deps.sh installs it)"
done
gen=$BUILD_DIR/examples/weightd-gen
for f in "$BUILD_DIR/cached/weightd" "$BUILD_DIR/client/weightctl" "$gen"; do
  [[ -x "$f" ]] || fail "$f is not built (build the tree first)"
done
version=$(sed -n 's/^CMAKE_PROJECT_VERSION:STATIC=//p' "$BUILD_DIR/CMakeCache.txt")
image=localhost/weightd:${version:-dev}

scratch=$(mktemp -d /var/tmp/weightd-container-check.XXXXXX)
daemon=weightd-check-$$
podman_run=(podman --runtime runc run --pull=never --ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit nproc=4096:4096
  --network none)
cleanup() {
  local rc=$?
  podman --runtime runc rm -f -t 5 "$daemon" >/dev/null 2>&1 || true
  if [[ "$KEEP" != 1 ]]; then
    podman rmi -f "$image" >/dev/null 2>&1 || true
    rm -rf "$scratch"
  fi
  exit "$rc"
}
trap cleanup EXIT

# ---- 1. the image -------------------------------------------------------------------------------
root=$scratch/root
ops_debian_root "$root"
DESTDIR=$root cmake --install "$BUILD_DIR" >"$scratch/install.log" 2>&1 ||
  { cat "$scratch/install.log" >&2; fail "cmake --install failed"; }
sysusers=$(cd "$root" && find . -path '*/lib/sysusers.d/weightd.conf' -printf '/%P\n' -quit)
config=$(cd "$root" && find . -path '*/etc/weightd/weightd.toml' -printf '/%P\n' -quit)
bindir=$(dirname "$(cd "$root" && find . -path '*/bin/weightd' -printf '/%P\n' -quit)")
[[ -n "$sysusers" && -n "$config" && "$bindir" != . ]] || fail "the install lacks the sysusers.d file, the config or weightd"
# The shipped file creates the user; an /etc/sysusers.d entry fixes its ids for the manifests.
mkdir -p "$root/etc/sysusers.d"
printf 'g weightd %s\nu weightd %s:%s "weightd model weight cache" /var/lib/weightd\n' \
  "$WEIGHTD_ID" "$WEIGHTD_ID" "$WEIGHTD_ID" >"$root/etc/sysusers.d/weightd.conf"
systemd-sysusers --root="$root" >/dev/null || fail "systemd-sysusers --root failed"
grep -q "^weightd:x:$WEIGHTD_ID:$WEIGHTD_ID:" "$root/etc/passwd" || fail "sysusers.d made no weightd user $WEIGHTD_ID"
ldconfig -r "$root"
tar -C "$root" -cf "$scratch/image.tar" .
podman import --quiet \
  --change "USER $WEIGHTD_ID:$WEIGHTD_ID" \
  --change "ENTRYPOINT [\"$bindir/weightd\", \"--config\", \"$config\"]" \
  --change "LABEL org.opencontainers.image.title=weightd" \
  "$scratch/image.tar" "$image" >/dev/null || fail "podman import failed"
say "image $image: $(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'), Debian packages and cmake --install only"

# ---- 2. the daemon container ----------------------------------------------------------------------
sock=$scratch/run-weightd
models=$scratch/models
mkdir -p "$sock" "$models"
# What the DaemonSet's init container does: the daemon's user owns the socket directory.
chown "$WEIGHTD_ID:$WEIGHTD_ID" "$sock"
chmod 0750 "$sock"
"$gen" --preset classifier --out "$models/classifier" --seed 1 >/dev/null
chmod -R a+rX "$models"
cat >"$scratch/weightd.toml" <<'TOML'
[daemon]
socket = "ipc:///run/weightd/weightd.sock"

[cache]
host_budget = "512MiB"

[models.classifier]
path = "/srv/models/classifier"
preload = ["host"]
TOML
"${podman_run[@]}" -d --name "$daemon" --shm-size 1g \
  -v "$sock:/run/weightd" -v "$models:/srv/models:ro" -v "$scratch/weightd.toml:$config:ro" \
  "$image" >/dev/null || fail "the daemon container did not start"
for _ in $(seq 1 300); do
  test -S "$sock/weightd.sock" && break
  [[ $(podman inspect -f '{{.State.Running}}' "$daemon" 2>/dev/null) == true ]] ||
    fail "the daemon container exited: $(podman logs "$daemon" 2>&1 | tail -10)"
  sleep 0.1
done
test -S "$sock/weightd.sock" || fail "no socket after 30 s: $(podman logs "$daemon" 2>&1 | tail -10)"
daemon_ipc=$(podman exec "$daemon" readlink /proc/1/ns/ipc)
say "daemon container: ipc $daemon_ipc, /dev/shm $(podman exec "$daemon" df -h --output=size /dev/shm | tail -1 | tr -d ' '), log: $(podman logs "$daemon" 2>&1 | grep -o 'listening on.*' | head -1)"

# ---- 3. a client that sees only the socket directory ------------------------------------------
client=("${podman_run[@]}" --rm --user "$CLIENT_UID:$WEIGHTD_ID" --shm-size 64m --entrypoint "$bindir/weightctl")
out=$("${client[@]}" -v "$sock:/run/weightd:ro" "$image" --json attach classifier 2>&1) ||
  fail "the client container could not attach: $out $(podman logs "$daemon" 2>&1 | tail -5)"
grep -q '"tensors": [1-9]' <<<"$out" || fail "the attach mapped no tensors: $out"
say "client (socket directory only): $(tr -d '\n ' <<<"$out" | cut -c1-160)"
view=$("${podman_run[@]}" --rm --user "$CLIENT_UID:$WEIGHTD_ID" --shm-size 64m --entrypoint /bin/sh \
  -v "$sock:/run/weightd:ro" "$image" -c 'readlink /proc/self/ns/ipc; ls /dev/shm | wc -l; ls /run/weightd')
client_ipc=$(head -1 <<<"$view")
[[ "$client_ipc" != "$daemon_ipc" ]] || fail "the client shares the daemon's IPC namespace"
[[ $(sed -n 2p <<<"$view") == 0 ]] || fail "the client's /dev/shm is not its own empty one: $view"
say "client namespaces: ipc $client_ipc (daemon: $daemon_ipc), its /dev/shm empty, it sees /run/weightd: $(tail -n +3 <<<"$view" | paste -sd' ')"

# ---- 4. every byte, against the files --------------------------------------------------------
out=$("${client[@]}" -v "$sock:/run/weightd:ro" -v "$models:/srv/models:ro" "$image" attach classifier --verify 2>&1) ||
  fail "the client container's verify failed: $out"
grep -q 'against the files, OK' <<<"$out" || fail "verify did not report OK: $out"
say "client (socket directory, models read-only): $(tail -1 <<<"$out")"

# ---- 5. a uid outside the client group ------------------------------------------------------------
rc=0
out=$("${podman_run[@]}" --rm --user 2000:2000 --entrypoint "$bindir/weightctl" -v "$sock:/run/weightd:ro" \
  "$image" attach classifier 2>&1) || rc=$?
[[ $rc -ne 0 ]] && grep -q 'client.socket_denied\|auth.not_a_client' <<<"$out" ||
  fail "a client outside the client group was not refused as expected (exit $rc): $out"
say "client uid 2000 (not in group weightd): refused: $(grep -o 'PermissionDenied.*' <<<"$out" | head -1 | cut -c1-100)"
podman --runtime runc stop -t 10 "$daemon" >/dev/null
say "PASS: image built from Debian packages and cmake --install; clients in their own IPC namespace attached through the socket directory alone"
