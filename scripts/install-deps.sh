#!/usr/bin/env bash
# install-deps.sh — installs the Debian 12 packages that building and testing weightd needs.
#
# Idempotent: when every package is already installed it touches nothing (no apt-get update),
# so it is cheap to run at the start of every CI job. Runs as root, or through sudo.
# Prints one line saying what it did; apt's own output is kept quiet unless it fails.
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config git
  libboost-dev libzmq3-dev cppzmq-dev libcereal-dev
  libtorch-dev
  # the Python package (python/): built against Debian's /usr/bin/python3, tested with python3-torch
  python3-dev pybind11-dev libdlpack-dev python3-torch python3-numpy
  libgtest-dev libgmock-dev libbenchmark-dev
  libtomlplusplus-dev libcli11-dev libspdlog-dev nlohmann-json3-dev libxxhash-dev
  libsystemd-dev libcpp-httplib-dev liburing-dev
  clang-14 libclang-rt-14-dev
  systemd
  # The operator checks (scripts/systemd-check.sh, scripts/container-check.sh): a Debian root
  # booted with systemd-nspawn, and podman with runc (see container-check.sh for why runc).
  systemd-container mmdebstrap podman runc
)

missing=()
for p in "${PACKAGES[@]}"; do
  # "install ok installed" is the only state in which the package is fully usable; anything
  # else (absent, half-configured, removed with config left) needs apt.
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  if [[ "$status" != "install ok installed" ]]; then
    missing+=("$p")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all ${#PACKAGES[@]} packages already installed; nothing to do"
  exit 0
fi

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
  SUDO=(sudo)
fi

log=$(mktemp -t install-deps.XXXXXX)
trap 'rm -f "$log"' EXIT
apt_get() {
  if ! "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -qq -o=Dpkg::Use-Pty=0 "$@" >>"$log" 2>&1; then
    echo "install-deps: apt-get $1 failed; its output:" >&2
    cat "$log" >&2
    exit 1
  fi
}
apt_get update
apt_get install -y --no-install-recommends "${missing[@]}"
echo "install-deps: installed ${#missing[@]} package(s): ${missing[*]}"
