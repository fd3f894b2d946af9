#!/usr/bin/env bash
# Validate deploy/ on this machine, without a cluster or systemd running:
#   - herald.service: `systemd-analyze verify` (ExecStart pointed at a real herald binary);
#   - kubernetes/herald.yaml: deploy/check_k8s.py (PyYAML: structure, probes on the admin port,
#     ports and selectors that agree, drain timing, and the embedded proxy.toml through `herald check`).
# A missing tool is reported as "skip:" and does not fail the run. tests/deploy.rs runs this.
# Usage: deploy/validate.sh [herald binary, default target/debug/herald]
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/debug/herald}")
[ -x "$bin" ] || { echo "no herald binary at $bin (cargo build first)" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if command -v systemd-analyze >/dev/null 2>&1; then
  sed "s#/usr/local/bin/herald#$bin#g" deploy/herald.service > "$tmp/herald.service"
  # verify prints problems but may still exit 0 on some of them: any output is a failure.
  out=$(systemd-analyze verify "$tmp/herald.service" 2>&1) || { echo "$out"; exit 1; }
  if [ -n "$out" ]; then echo "$out"; exit 1; fi
  echo "ok: deploy/herald.service (systemd-analyze verify)"
else
  echo "skip: systemd-analyze not found; deploy/herald.service not verified"
fi

py=""
for p in python3 /usr/bin/python3; do
  if command -v "$p" >/dev/null 2>&1 && "$p" -c 'import yaml' 2>/dev/null; then py=$p; break; fi
done
if [ -n "$py" ]; then
  for manifest in deploy/kubernetes/herald.yaml deploy/kubernetes/herald-cluster.yaml; do
    "$py" deploy/check_k8s.py "$manifest" "$bin"
  done
else
  echo "skip: no python3 with PyYAML (apt-get install python3-yaml); kubernetes/herald.yaml not checked"
fi
