#!/usr/bin/env bash
# thread-safety.sh — checks the daemon's lock annotations (GUARDED_BY, REQUIRES, ...: see
# common/thread_annotations.h) with clang's -Wthread-safety. GCC, which builds weightd, ignores
# them; this compiles every source of cached/ and common/ with clang-14 for syntax only, with
# the include paths and definitions of the main build (BUILD_DIR/compile_commands.json), and
# fails on any thread-safety warning. Run by scripts/test.sh after the build (about a minute on
# CI's two cores).
#
# Environment (optional): BUILD_DIR (default <repo>/build), JOBS (default 2), CLANG (default
# clang++-14).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=${BUILD_DIR:-$repo/build}
JOBS=${JOBS:-2}
CLANG=${CLANG:-clang++-14}
db=$BUILD_DIR/compile_commands.json

if [[ ! -f $db ]]; then
  echo "thread-safety: no $db (configure the build first)" >&2
  exit 1
fi
command -v "$CLANG" >/dev/null || { echo "thread-safety: $CLANG not found (scripts/install-deps.sh installs clang-14)" >&2; exit 1; }

t0=$SECONDS
python3 - "$db" "$repo" "$CLANG" "$JOBS" <<'PY'
import json, shlex, subprocess, sys
from concurrent.futures import ThreadPoolExecutor

db, repo, clang, jobs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
entries = [e for e in json.load(open(db))
           if e["file"].startswith((repo + "/cached/", repo + "/common/")) and e["file"].endswith(".cc")]
seen, commands = set(), []
for e in entries:
    if e["file"] in seen:
        continue
    seen.add(e["file"])
    args = shlex.split(e["command"]) if "command" in e else e["arguments"]
    keep, skip = [], False
    for a in args[1:]:
        if skip:
            skip = False
            continue
        if a in ("-o", "-MF", "-MT", "-MQ"):
            skip = True
            continue
        if a in ("-c", "-MD", "-MMD") or a.startswith("-W") or a == "-fno-sanitize-recover=undefined":
            continue
        keep.append(a)
    # Every warning off but the analysis, which is an error.
    commands.append((e["file"], [clang, *keep, "-fsyntax-only", "-Wno-everything", "-Wthread-safety",
                                 "-Werror=thread-safety"], e["directory"]))

def run(c):
    f, cmd, cwd = c
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    return f, p.returncode, p.stdout + p.stderr

failed = 0
with ThreadPoolExecutor(jobs) as pool:
    for f, rc, out in pool.map(run, commands):
        if rc != 0:
            failed += 1
            sys.stderr.write(out)
            print("thread-safety: FAILED", f[len(repo) + 1:], file=sys.stderr)
print(f"thread-safety: {len(commands)} sources of cached/ and common/ checked with -Wthread-safety, {failed} failed")
sys.exit(1 if failed else 0)
PY
echo "thread-safety: done in $((SECONDS - t0)) s"
