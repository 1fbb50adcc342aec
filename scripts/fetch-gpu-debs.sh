#!/usr/bin/env bash
# fetch-gpu-debs.sh — downloads (does not install) the Debian 12 packages that the GPU machine
# lacks, into .deps/debs of the checkout (ignored by git), so that scripts/gpu-check.sh can
# extract them there: that machine has no network. See ../shared/GPU.md.
#
# Run on the development machine. Re-running refreshes the folder. Needs only apt's package
# lists (no root). Usage: scripts/fetch-gpu-debs.sh [DEST]   (default: <repo>/.deps/debs)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${1:-$repo/.deps/debs}

# -dev packages for every library the top CMakeLists.txt finds, with their runtime libraries.
# LibTorch (CUDA, from pip) and the CUDA toolkit come with the GPU machine. Boost's headers are
# carried too: not every image of that machine has them.
PACKAGES=(
  # ZeroMQ and what libzmq5 links
  libzmq3-dev libzmq5 cppzmq-dev libsodium23 libpgm-5.3-0 libnorm1 libbsd0 libmd0
  # serialization, config, CLI, JSON, hashing
  libcereal-dev libtomlplusplus-dev libtomlplusplus3 libcli11-dev nlohmann-json3-dev
  libxxhash-dev libxxhash0
  # logging
  libspdlog-dev libspdlog1.10 libfmt-dev libfmt9
  # sd_notify, metrics endpoint, io_uring
  libsystemd-dev libsystemd0 libcpp-httplib-dev libcpp-httplib0.11 liburing-dev liburing2
  # Boost.Interprocess (headers only) and Boost's CMake package
  libboost1.74-dev
  # the Python package's DLPack header (pybind11 comes with the machine's pip)
  libdlpack-dev
  # tests and benchmarks
  libgtest-dev libgmock-dev googletest libbenchmark-dev libbenchmark1debian
)

mkdir -p "$dest"
rm -f "$dest"/*.deb
cd "$dest"
echo "fetch-gpu-debs: downloading ${#PACKAGES[@]} packages into $dest"
if ! apt-get download "${PACKAGES[@]}" >"$dest/apt-download.log" 2>&1; then
  echo "fetch-gpu-debs: apt-get download failed; see $dest/apt-download.log" >&2
  tail -20 "$dest/apt-download.log" >&2
  exit 1
fi
count=$(ls -1 "$dest"/*.deb | wc -l)
if [[ "$count" -ne "${#PACKAGES[@]}" ]]; then
  echo "fetch-gpu-debs: expected ${#PACKAGES[@]} .deb files, got $count" >&2
  exit 1
fi
echo "fetch-gpu-debs: $count packages, $(du -sh "$dest" | cut -f1)"
