#!/usr/bin/env bash
# Several herald nodes on one Redis (issue 17), in one run on this machine:
#   1. one clustered node: deliveries per server CPU-second;
#   2. three clustered nodes, the same streams spread over them (one herald-bench run per node,
#      in parallel): deliveries per CPU-second of each node, upstream polls per interval;
#   3. Redis round trips and bytes per event (INFO commandstats / stats over run 2);
#   4. failover: the writer killed with SIGKILL, the gap a survivor's stream sees.
#
#   bench/cluster.sh [--streams N] [--hold S]
# Needs a release build (cargo build --release --bins) and redis-server. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CMDLINE="bench/cluster.sh $*"
STREAMS=3000; HOLD=15; RATE=10; SIZE=200; POLL=50; LEASE=2s
while [ $# -gt 0 ]; do
  case "$1" in
    --streams) STREAMS=$2; shift ;;
    --hold) HOLD=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
  shift
done
BIN=$ROOT/target/release
BENCH=$BIN/herald-bench
[ -x "$BIN/herald" ] && [ -x "$BENCH" ] || { echo "cargo build --release --bins first" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server is needed (apt-get install redis-server)" >&2; exit 1; }
TMP=$(mktemp -d /tmp/herald-cluster-bench.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
# KEEP=1 keeps the logs and rows in $TMP.
trap 'cleanup; [ -n "${KEEP:-}" ] || rm -rf "$TMP"' EXIT
REDIS_PORT=16379; UP_PORT=13000; H_PORT=18080
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
start() { "$@" & PIDS+=($!); LAST=$!; }
rcli() { redis-cli -p $REDIS_PORT "$@"; }

start redis-server --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no --dir "$TMP" >/dev/null
wait_port $REDIS_PORT
start "$BENCH" upstream --listen 127.0.0.1:$UP_PORT --rate $RATE --size $SIZE 2>/dev/null
wait_port $UP_PORT

node_config() { # node index
  local i=$1
  cat > "$TMP/n$i.toml" <<TOML
listen = "127.0.0.1:$((H_PORT + i))"
upstream = "http://127.0.0.1:$UP_PORT"
[server]
max_new_streams_per_sec = 0
max_streams_per_ip = 0
max_streams_per_credential = 0
[admin]
listen = "127.0.0.1:$((19090 + i))"
[cluster]
redis = "redis://127.0.0.1:$REDIS_PORT"
node = "n$i"
secret = "bench-secret-0123456789abcdef"
lease = "$LEASE"
[[route]]
path = "/topic/{n}"
interval = "${POLL}ms"
TOML
}
start_node() { node_config "$1"; start "$BIN/herald" --config "$TMP/n$1.toml" --log-format json >"$TMP/n$1.log" 2>&1; NODE_PID[$1]=$LAST; wait_port $((H_PORT + $1)); }
declare -A NODE_PID
run_load() { # node index, streams, label
  "$BENCH" run --target "http://127.0.0.1:$((H_PORT + $1))" --path "/topic/{n}" --topics 1 --streams "$2" \
    --ramp 2000 --hold "$HOLD" --workers 2 --pid "${NODE_PID[$1]}" --label "$3" --json "$TMP/rows.jsonl" \
    --upstream-stats "http://127.0.0.1:$UP_PORT" --poll-interval-ms $POLL
}

echo "== 1 node, $STREAMS streams" >&2
start_node 0
run_load 0 "$STREAMS" "1 node" >"$TMP/one.txt" 2>&1 || true
kill "${NODE_PID[0]}"; wait "${NODE_PID[0]}" 2>/dev/null || true
rcli FLUSHALL >/dev/null

echo "== 3 nodes, $STREAMS streams spread over them" >&2
for i in 1 2 3; do start_node $i; done
rcli CONFIG RESETSTAT >/dev/null
PER=$((STREAMS / 3))
LOADS=()
for i in 1 2 3; do run_load $i $PER "node n$i of 3" >"$TMP/three-$i.txt" 2>&1 & LOADS+=($!); done
for j in "${LOADS[@]}"; do wait "$j" || true; done
STATS=$(rcli INFO stats); CMDS=$(rcli INFO commandstats)
# Round trips: every command herald times (appends, leases, presence pipelines, priming) from
# each node's metrics, plus the reader's XREADs (Redis's own count: scripts never XREAD).
# Redis's commandstats also count the commands run inside scripts, so they are shown apart.
EVENTS=0; TIMED=0
for i in 1 2 3; do
  m=$(curl -s "http://127.0.0.1:$((19090 + i))/metrics" || echo "node n$i did not answer" >&2)
  n=$(echo "$m" | awk '/^herald_cluster_events_written_total/ {print $2}')
  t=$(echo "$m" | awk '/^herald_cluster_redis_rtt_seconds_count/ {print $2}')
  EVENTS=$((EVENTS + ${n:-0})); TIMED=$((TIMED + ${t:-0}))
done
CALLS=$(echo "$CMDS" | sed -n 's/^cmdstat_\([a-z|]*\):calls=\([0-9]*\),.*/\1 \2/p')
XREADS=$(echo "$CALLS" | awk '$1 == "xread" {print $2}')
TOTAL_CALLS=$((TIMED + ${XREADS:-0}))
IN=$(echo "$STATS" | sed -n 's/^total_net_input_bytes:\([0-9]*\).*/\1/p')
OUT=$(echo "$STATS" | sed -n 's/^total_net_output_bytes:\([0-9]*\).*/\1/p')

echo "== failover: SIGKILL the writer" >&2
WRITER=$(rcli --scan --pattern 'herald:*:lease' | head -1 | xargs -r redis-cli -p $REDIS_PORT GET | cut -d: -f1)
W=${WRITER#n}
S=$(( W % 3 + 1 ))
# The watching stream ends by itself (--max-time) 11 s from now.
curl -sN --max-time 11 -H 'accept: text/event-stream' "http://127.0.0.1:$((H_PORT + S))/topic/0" \
  | while IFS= read -r line; do case $line in id:*) echo "$(date +%s.%N) $line";; esac; done >"$TMP/ids.txt" &
WATCH=$!
sleep 3
KILLED=$(date +%s.%N)
kill -9 "${NODE_PID[$W]}"
wait "$WATCH" || true
FAILOVER=$(awk -v k="$KILLED" '$1 > k && !done {printf "%.2f", $1 - k; done = 1}' "$TMP/ids.txt")
GAP=$(awk -v k="$KILLED" '{ if (prev && $1 > k && !done) {printf "%.2f", $1 - prev; done = 1}; prev = $1 }' "$TMP/ids.txt")
DUPS=$(awk '{print $3}' "$TMP/ids.txt" | sort | uniq -d | wc -l)

SUMMARY=$("$BENCH" summarize --file "$TMP/rows.jsonl")
REPORT=$(cat <<MD

### cluster: 1 node vs 3 nodes on one Redis ($(date -u +%Y-%m-%d\ %H:%M\ UTC))

\`$CMDLINE\` — $STREAMS streams on one topic (h1), changes ${RATE}/s, ${SIZE} B bodies, polls every
${POLL} ms, lease $LEASE, hold ${HOLD} s. Three nodes: $PER streams each, each node's load generator
run at the same time. Redis $(redis-server --version | awk '{print $3}') on the same machine.
Machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -1), kernel $(uname -r).
Commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src bench || echo ' + uncommitted changes').

$SUMMARY

Redis over the three-node run: $TOTAL_CALLS round trips for $EVENTS events appended
($(awk -v c="$TOTAL_CALLS" -v e="$EVENTS" 'BEGIN { if (e > 0) printf "%.1f", c / e; else print "-" }') per event for the whole cluster: the append, each node's XREAD, and leases, presence and priming;
${XREADS:-0} of them XREADs), $(awk -v b="$IN" -v e="$EVENTS" 'BEGIN { if (e > 0) printf "%.0f", b / e; else print "-" }') bytes into Redis and $(awk -v b="$OUT" -v e="$EVENTS" 'BEGIN { if (e > 0) printf "%.0f", b / e; else print "-" }') bytes out of it per event.
Redis commandstats (script-internal commands included): $(echo "$CALLS" | tr '\n' ' ').

Failover (writer n$W killed with SIGKILL, stream on n$S): first event ${FAILOVER:-none} s after the
kill; the longest silence across it ${GAP:-?} s (changes every $((1000 / RATE)) ms); $DUPS duplicate ids.
MD
)
echo "$REPORT"
grep -ih "panic\|ERROR" "$TMP"/n*.log | head -5 >&2 || true
echo "$REPORT" >> "${BENCHMARKS:-BENCHMARKS.md}"
