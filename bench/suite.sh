#!/usr/bin/env bash
# Every benchmark scenario, herald next to nginx+Nchan, Node and the floor, each run REPS times:
# the result set BENCHMARKS.md reports. About an hour and a half on 2 cores; run it on a quiet machine.
#
#   bench/suite.sh [--reps N] [--out FILE]
#
# Each scenario's section is appended to FILE (default BENCHMARKS.md) by bench/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=3; OUT=BENCHMARKS.md
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS=$2; shift ;;
    --out) OUT=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
  shift
done
export BENCHMARKS=$OUT
for s in idle-1k idle-5k idle-18k fanout fanout-10k topics gzip; do
  bench/run.sh "$s" --reps "$REPS"
done
# 100,000 streams over HTTP/2 (herald only: see run.sh).
bench/run.sh idle-h2 --reps "$REPS"
# TLS (issue 18): idle HTTP/1.1 and HTTP/2 over TLS, fan-out over TLS next to plaintext, and
# reconnect storms with and without session resumption.
for s in idle-tls-5k idle-tls12-5k idle-tls-18k idle-tls-h2 idle-tls-h2-100 fanout-tls fanout-tls-h2 storm-tls storm-tls-burst storm-tls-half; do
  bench/run.sh "$s" --reps "$REPS"
done
# Churn: a minute of every server side by side, then ten minutes of herald with a history small
# enough to fill in seconds, so any growth over the run would be a leak.
bench/run.sh churn --quick
HERALD_TOML=$'[sse]\nhistory = 16' bench/run.sh churn --reps 1 --servers herald
