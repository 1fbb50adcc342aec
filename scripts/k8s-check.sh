#!/usr/bin/env bash
# k8s-check.sh — validates the Kubernetes manifests in deploy/ offline (deploy/validate/validate.mjs):
# the Kubernetes 1.27 schemas (npm kubernetes-models), no unknown field anywhere (kubernetes-types
# through the TypeScript compiler), and what weightd needs (hostPath socket directory, read-only
# models, /readyz, no hostIPC). The validators' versions are pinned by deploy/validate's
# package-lock.json and installed with `npm ci` from the npm registry (the machine's Node.js and
# npm). Then it checks that the check can fail: a copy of the DaemonSet with a misspelt field
# and hostIPC must be refused.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fail() { echo "k8s-check: FAIL: $*" >&2; exit 1; }
command -v node >/dev/null && command -v npm >/dev/null || fail "node and npm are needed (the machine's Node.js)"
validate=$repo/deploy/validate
if ! (cd "$validate" && npm ci --no-audit --no-fund --loglevel=error >/dev/null); then
  fail "npm ci in $validate failed (is the npm registry reachable?)"
fi
manifests=("$repo"/deploy/*.yaml)
node "$validate/validate.mjs" "${manifests[@]}" || fail "the manifests in deploy/ are not valid (above)"

scratch=$(mktemp -d -t weightd-k8s.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
sed -e '0,/readOnly: true/s//readOnyl: true/' -e 's/hostIPC: false/hostIPC: true/' "$repo/deploy/weightd.yaml" >"$scratch/broken.yaml"
if out=$(node "$validate/validate.mjs" "$scratch/broken.yaml" "$repo/deploy/client.yaml"); then
  fail "a DaemonSet with a misspelt field and hostIPC passed: $out"
fi
grep -q "readOnyl" <<<"$out" && grep -q hostIPC <<<"$out" || fail "the broken DaemonSet failed for other reasons: $out"
echo "k8s-check: a DaemonSet with a misspelt field and hostIPC is refused, as it must be"
