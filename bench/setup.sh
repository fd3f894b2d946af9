#!/usr/bin/env bash
# Install what bench/run.sh compares herald against, on a fresh Debian/Ubuntu machine (not run by
# CI): nginx with the Nchan module, Node.js 20 (for bench/node-sse.js), and openssl (the TLS
# scenarios make their certificate with it).
set -euo pipefail
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
$sudo apt-get update
$sudo apt-get install -y --no-install-recommends nginx libnginx-mod-nchan nodejs openssl
# run.sh starts its own nginx in a temp prefix; the packaged service is not needed.
$sudo systemctl disable --now nginx 2>/dev/null || true
node --version | grep -q '^v2[0-9]' || echo "warning: bench/node-sse.js was written for Node 20+"
