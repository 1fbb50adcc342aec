#!/usr/bin/env bash
# check-systemd.sh — checks the systemd integration as `cmake --install` lays it down:
#   1. installs the build into a scratch DESTDIR (the install rules themselves are under test);
#   2. the unit's ExecStart= and Documentation= name files that the install put there;
#   3. `systemd-analyze verify` passes with no message at all (it exits 0 on unknown keys and
#      bad values, and only prints them, so any output is treated as a failure);
#   4. `systemd-analyze security --offline` stays at or below WEIGHTD_MAX_EXPOSURE;
#   5. the sysusers.d and tmpfiles.d files apply cleanly to a scratch root.
# Works in a container without a running systemd (everything is offline). Run by scripts/test.sh
# after the build; docs/security.md records the exposure it prints.
#
# Environment (optional):
#   BUILD_DIR             a configured and built tree (default: <repo>/build)
#   WEIGHTD_MAX_EXPOSURE  the highest acceptable overall exposure (default 2.5; 1.9 today)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$repo/build}
MAX_EXPOSURE=${WEIGHTD_MAX_EXPOSURE:-2.5}

fail() { echo "check-systemd: FAIL: $*" >&2; exit 1; }
for tool in systemd-analyze systemd-sysusers systemd-tmpfiles; do
  command -v "$tool" >/dev/null || fail "$tool not found (Debian package: systemd; scripts/install-deps.sh installs it)"
done
[[ -f "$BUILD_DIR/CMakeCache.txt" ]] || fail "$BUILD_DIR is not a configured build tree"

scratch=$(mktemp -d -t weightd-systemd.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
dest=$scratch/dest

# 1. Install. The prefix is the configured one, so the paths in the unit are the real ones.
DESTDIR=$dest cmake --install "$BUILD_DIR" >"$scratch/install.log" 2>&1 ||
  { cat "$scratch/install.log" >&2; fail "cmake --install failed"; }
unit=$(find "$dest" -path '*/lib/systemd/system/weightd.service' -print -quit)
sysusers=$(find "$dest" -path '*/lib/sysusers.d/weightd.conf' -print -quit)
tmpfiles=$(find "$dest" -path '*/lib/tmpfiles.d/weightd.conf' -print -quit)
[[ -n "$unit" ]] || fail "the install has no lib/systemd/system/weightd.service"
[[ -n "$sysusers" ]] || fail "the install has no lib/sysusers.d/weightd.conf"
[[ -n "$tmpfiles" ]] || fail "the install has no lib/tmpfiles.d/weightd.conf"

# 2. The unit's files exist in the install.
exec_bin=$(sed -n 's/^ExecStart=\([^ ]*\).*/\1/p' "$unit")
[[ -n "$exec_bin" ]] || fail "$unit has no ExecStart="
[[ -x "$dest$exec_bin" ]] || fail "ExecStart=$exec_bin, but the install put no executable there"
doc=$(sed -n 's|^Documentation=file://||p' "$unit")
[[ -z "$doc" || -f "$dest$doc" ]] || fail "Documentation=file://$doc, but the install put no file there"

# 3. verify, on a copy whose ExecStart= points into the DESTDIR (verify checks that the binary
# exists and is executable; the real path exists only after a real install). Nothing else
# changes. The copy keeps the unit's name: verify derives the unit type from it.
mkdir "$scratch/unit"
sed "s|^ExecStart=$exec_bin|ExecStart=$dest$exec_bin|" "$unit" >"$scratch/unit/weightd.service"
# SYSTEMD_LOG_LEVEL=notice drops verify's debug chatter but keeps every warning and error.
if ! out=$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify "$scratch/unit/weightd.service" 2>&1) || [[ -n "$out" ]]; then
  echo "$out" >&2
  fail "systemd-analyze verify reported the messages above for weightd.service"
fi
echo "check-systemd: systemd-analyze verify weightd.service: clean"

# 4. The sandbox's exposure (0 = locked down, 10 = unprotected). --threshold takes tenths.
[[ "$MAX_EXPOSURE" =~ ^[0-9]+(\.[0-9])?$ ]] || fail "WEIGHTD_MAX_EXPOSURE must look like 2.5, got '$MAX_EXPOSURE'"
frac=0
[[ "$MAX_EXPOSURE" == *.* ]] && frac=${MAX_EXPOSURE#*.}
threshold=$(( 10#${MAX_EXPOSURE%%.*} * 10 + frac ))
if ! out=$(systemd-analyze security --offline=yes --threshold="$threshold" "$scratch/unit/weightd.service" 2>&1); then
  echo "$out" >&2
  fail "the exposure of weightd.service is above $MAX_EXPOSURE (WEIGHTD_MAX_EXPOSURE)"
fi
echo "check-systemd: $(grep -o 'Overall exposure level.*' <<<"$out")"

# 5. sysusers.d and tmpfiles.d, applied to a scratch root (not the host).
mkdir -p "$scratch/root/etc"
systemd-sysusers --root="$scratch/root" "$sysusers" >/dev/null 2>&1 || {
  systemd-sysusers --root="$scratch/root" "$sysusers" >&2 || true
  fail "systemd-sysusers rejected $sysusers"
}
grep -q '^weightd:' "$scratch/root/etc/passwd" || fail "sysusers.d did not create the user weightd"
grep -q '^weightd:' "$scratch/root/etc/group" || fail "sysusers.d did not create the group weightd"
if ! out=$(systemd-tmpfiles --root="$scratch/root" --create "$tmpfiles" 2>&1) || [[ -n "$out" ]]; then
  echo "$out" >&2
  fail "systemd-tmpfiles reported the messages above for $tmpfiles"
fi
echo "check-systemd: sysusers.d and tmpfiles.d apply cleanly"
