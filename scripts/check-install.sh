#!/usr/bin/env bash
# check-install.sh — checks the installed package as a downstream project sees it:
#   1. `cmake --install` into a scratch directory; the CMake package (config, version file,
#      targets), the pkg-config file and the headers are there;
#   2. a project outside the source tree (tests/install/downstream, copied to a scratch
#      directory) finds weightd with find_package(weightd 0.1 CONFIG COMPONENTS torch) and
#      builds a C++ client (weightd::client) and a LibTorch program (weightd::torch); the same
#      client also builds with pkg-config alone;
#   3. the installed daemon serves a model written by the downstream program, and the three
#      programs check what they get: the client every byte against the files, the LibTorch
#      program a torch::nn and a TorchScript module bound to the lease;
#   4. find_package refuses another minor version (0.2) and a configure without LibTorch's
#      component still gives weightd::client.
# Run by scripts/test.sh after the build. Nothing it does touches the build tree.
#
# Environment (optional):
#   BUILD_DIR   a configured and built tree (default: <repo>/build)
#   JOBS        build parallelism (default 2)
#   EXTRA_PREFIX_PATH  more CMake prefixes for the downstream project (where LibTorch is, if
#               not in the system: python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')
#   EXTRA_CMAKE_ARGS   more arguments for its configure (word-split)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$repo/build}
JOBS=${JOBS:-2}

fail() { echo "check-install: FAIL: $*" >&2; exit 1; }
[[ -f "$BUILD_DIR/CMakeCache.txt" ]] || fail "$BUILD_DIR is not a configured build tree"
with_torch=$(sed -n 's/^WEIGHTD_WITH_TORCH:BOOL=//p' "$BUILD_DIR/CMakeCache.txt")

scratch=$(mktemp -d -t weightd-install.XXXXXX)
daemon_pid=
cleanup() {
  if [[ -n "$daemon_pid" ]]; then kill "$daemon_pid" 2>/dev/null || true; wait "$daemon_pid" 2>/dev/null || true; fi
  rm -rf "$scratch"
}
trap cleanup EXIT
# Installed for /opt/weightd under a DESTDIR and used from there, somewhere else than its
# prefix: the package must not depend on where it was meant to go. (A DESTDIR also keeps any
# absolute install path, such as the Python package's, inside the scratch directory.)
prefix=$scratch/dest/opt/weightd
t0=$SECONDS

# 1. Install, and what a package must hold.
DESTDIR=$scratch/dest cmake --install "$BUILD_DIR" --prefix /opt/weightd >"$scratch/install.log" 2>&1 ||
  { cat "$scratch/install.log" >&2; fail "cmake --install failed"; }
cmake_dir=$(dirname "$(find "$prefix" -name weightdConfig.cmake -print -quit)")
[[ "$cmake_dir" == */cmake/weightd ]] || fail "the install has no lib*/cmake/weightd/weightdConfig.cmake"
for f in weightdConfigVersion.cmake weightdTargets.cmake; do
  [[ -f "$cmake_dir/$f" ]] || fail "the install has no $cmake_dir/$f"
done
pc=$(find "$prefix" -path '*/pkgconfig/weightd.pc' -print -quit)
[[ -n "$pc" ]] || fail "the install has no pkgconfig/weightd.pc"
[[ -f "$prefix/include/weightd/client.h" ]] || fail "the install has no include/weightd/client.h"
# The targets the README documents, and no build-tree-only names.
grep -q 'weightd::client' "$cmake_dir/weightdTargets.cmake" || fail "the package does not define weightd::client"
if grep -q 'weightd::weightd_client' "$cmake_dir"/*.cmake; then fail "the package still exports weightd::weightd_client"; fi

# 2. The downstream project, outside the tree.
cp -r "$repo/tests/install/downstream" "$scratch/src"
torch_flag=-DWITH_TORCH=OFF
if [[ "$with_torch" == ON ]]; then
  torch_flag=-DWITH_TORCH=ON
  [[ -f "$cmake_dir/weightdTorchTargets.cmake" ]] || fail "the install has no weightdTorchTargets.cmake"
fi
# shellcheck disable=SC2086  # EXTRA_CMAKE_ARGS is a list of arguments
cmake -S "$scratch/src" -B "$scratch/build" -DCMAKE_PREFIX_PATH="$prefix${EXTRA_PREFIX_PATH:+;$EXTRA_PREFIX_PATH}" \
  -DCMAKE_BUILD_TYPE=Release "$torch_flag" ${EXTRA_CMAKE_ARGS:-} >"$scratch/configure.log" 2>&1 || { cat "$scratch/configure.log" >&2; fail "the downstream project does not configure"; }
grep -q "downstream: weightd 0.1" "$scratch/configure.log" || fail "the downstream project found another weightd"
cmake --build "$scratch/build" -j "$JOBS" >"$scratch/build.log" 2>&1 ||
  { cat "$scratch/build.log" >&2; fail "the downstream project does not build"; }
libdir=$(PKG_CONFIG_PATH=$(dirname "$pc") pkg-config --variable=libdir weightd)
# shellcheck disable=SC2046  # pkg-config's output is a list of flags
c++ -std=c++17 -o "$scratch/client_pc" "$scratch/src/client.cc" \
  $(PKG_CONFIG_PATH=$(dirname "$pc") pkg-config --cflags --libs weightd) -Wl,-rpath,"$libdir" ||
  fail "the client does not build with pkg-config (weightd.pc)"
echo "check-install: installed, and the downstream project built in $((SECONDS - t0)) s"

# 3. The installed daemon and the downstream programs.
mkdir "$scratch/model"
if [[ "$with_torch" == ON ]]; then
  "$scratch/build/downstream_torch" write "$scratch/model" || fail "downstream_torch write failed"
else
  "$prefix/bin/weightd-gen" --preset tiny --out "$scratch/model" >/dev/null || fail "weightd-gen failed"
fi
: >"$scratch/empty.toml"
endpoint=ipc://$scratch/weightd.sock
"$prefix/bin/weightd" --config "$scratch/empty.toml" --socket "$endpoint" --shm-prefix "wdinstall-$$" --no-gpu \
  --model "m=$scratch/model" >"$scratch/weightd.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 100); do
  "$prefix/bin/weightctl" --socket "$endpoint" list >/dev/null 2>&1 && break
  kill -0 "$daemon_pid" 2>/dev/null || { cat "$scratch/weightd.log" >&2; fail "the installed weightd exited"; }
  sleep 0.2
done
"$prefix/bin/weightctl" --socket "$endpoint" list >/dev/null || { cat "$scratch/weightd.log" >&2; fail "the installed weightd does not answer"; }
"$scratch/build/downstream_client" "$endpoint" m || fail "downstream_client (CMake) failed"
"$scratch/client_pc" "$endpoint" m || fail "downstream_client (pkg-config) failed"
if [[ "$with_torch" == ON ]]; then
  "$scratch/build/downstream_torch" check "$endpoint" m "$scratch/model" || fail "downstream_torch check failed"
fi
kill "$daemon_pid"
wait "$daemon_pid" || true
daemon_pid=

# 4. Versions: the same minor or nothing; and the client alone without LibTorch.
if cmake -S "$scratch/src" -B "$scratch/build-0.2" -DCMAKE_PREFIX_PATH="$prefix" -DWITH_TORCH=OFF -DWEIGHTD_WANT=0.2 \
  >"$scratch/want-0.2.log" 2>&1; then
  fail "find_package(weightd 0.2) accepted the installed 0.1"
fi
grep -q "version: 0.1.0" "$scratch/want-0.2.log" || { cat "$scratch/want-0.2.log" >&2; fail "find_package(weightd 0.2) failed for another reason"; }
cmake -S "$scratch/src" -B "$scratch/build-client" -DCMAKE_PREFIX_PATH="$prefix" -DWITH_TORCH=OFF -DWEIGHTD_WANT=0.1.0 \
  >"$scratch/client-only.log" 2>&1 || { cat "$scratch/client-only.log" >&2; fail "find_package(weightd 0.1.0) without components failed"; }
echo "check-install: all passed in $((SECONDS - t0)) s"
