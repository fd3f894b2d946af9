#!/usr/bin/env bash
# One benchmark scenario, herald next to nginx+Nchan, a hand-written Node server and the no-logic
# tokio floor, in the same run on the same machine; each server is run REPS times (interleaved),
# and the median and spread go to BENCHMARKS.md with the machine, the commit and this command.
#
#   bench/run.sh <scenario> [--quick] [--reps N] [--servers "herald nchan node floor"]
#
# `herald-before` is a second herald binary run as one more server with the same config and
# upstream, e.g. an older commit's build, for before/after in one run:
#   HERALD_BEFORE=/path/to/old/herald bench/run.sh idle-5k --servers "herald herald-before"
#
# Scenarios: idle-1k idle-5k idle-18k idle-h2 fanout fanout-10k topics gzip churn sources still
#   TLS (herald's [tls] and nginx's `ssl` on the same self-signed P-256 certificate, made here):
#   idle-tls-5k (with herald-plain) idle-tls-18k (HTTP/1.1 over TLS), idle-tls12-5k (clients
#   offering TLS 1.2 only), idle-tls-h2 (HTTP/2 over TLS, one stream per
#   connection: a browser tab), idle-tls-h2-100 (100 streams per connection), fanout-tls (with
#   herald-plain, herald without TLS, in the same run), fanout-tls-h2 (browser tabs, one h2
#   connection each, while 10 changes/s flow), storm-tls (every client drops and
#   reconnects within 5 s while a change a second goes out; -noresume: the clients keep no TLS
#   session, every handshake is full), storm-tls-burst (idle streams, all back within 1 s: what a
#   reconnect costs the server's CPU, nothing else), storm-tls-half (half the clients storm while
#   10 changes/s flow: `steady p99` is the delivery latency of the half that stayed open).
# Needs a release build (cargo build --release --bins) and bench/setup.sh's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CMDLINE="bench/run.sh $*"
SCENARIO=${1:?usage: bench/run.sh <scenario> [--quick] [--reps N] [--servers LIST]}
shift
QUICK=0; REPS=3; SERVERS="herald nchan node floor"; APPEND=1
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1; REPS=1 ;;
    --reps) REPS=$2; shift ;;
    --servers) SERVERS=$2; shift ;;
    --no-append) APPEND=0 ;;
    *) echo "unknown option $1" >&2; exit 64 ;;
  esac
  shift
done
BIN=$ROOT/target/release
BENCH=$BIN/herald-bench
[ -x "$BIN/herald" ] && [ -x "$BENCH" ] || { echo "cargo build --release --bins first" >&2; exit 1; }
case " $SERVERS " in
  *" herald-before "*) [ -x "${HERALD_BEFORE:-}" ] || { echo "herald-before needs HERALD_BEFORE=<herald binary>" >&2; exit 1; } ;;
esac
TMP=$(mktemp -d /tmp/herald-bench.XXXXXX)
ROWS=$TMP/rows.jsonl
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap 'cleanup; rm -rf "$TMP"' EXIT

# Ports can be moved (H_PORT=28080 UP_PORT=23000 ...) when another run shares the machine: wait_port
# only sees that something listens, so two runs on the same ports would measure each other. Keep
# them below 32768: above, they collide with the clients' ephemeral ports.
H_PORT=${H_PORT:-18080}; UP_PORT=${UP_PORT:-13000}; NCHAN_PORT=${NCHAN_PORT:-18081}
NODE_PORT=${NODE_PORT:-18082}; FLOOR_PORT=${FLOOR_PORT:-18090}; NCHAN_TLS_PORT=${NCHAN_TLS_PORT:-18443}

# Scenario parameters: streams, topics, change rate per topic (/s), body size, herald's poll
# interval, hold seconds, protocol, gzip, churn lifetime, workers.
TLS=0; TLS12=0; STORM=0; STORM_WINDOW=5; STORM_SHARE=1; PROTO=h1; GZIP=""; CHURN=0; WORKERS=4; RAMP=2000; PER_CONN=100; SIZE=200; POLL=2000; PER_USER=0
case "$SCENARIO" in
  idle-1k)    STREAMS=1000;  TOPICS=1;    RATE=0;   HOLD=20 ;;
  idle-5k)    STREAMS=5000;  TOPICS=1;    RATE=0;   HOLD=20 ;;
  idle-18k)   STREAMS=18000; TOPICS=1;    RATE=0;   HOLD=20 ;;
  idle-h2)    STREAMS=100000; TOPICS=1;   RATE=0;   HOLD=20; PROTO=h2; PER_CONN=100; RAMP=5000
              # Only herald speaks HTTP/2 here (h2c prior knowledge): the floor and Node are
              # HTTP/1.1 servers, and nginx would need a separate `http2` listener.
              SERVERS=herald ;;
  fanout)     STREAMS=5000;  TOPICS=1;    RATE=10;  HOLD=20; POLL=50 ;;
  fanout-10k) STREAMS=10000; TOPICS=1;    RATE=10;  HOLD=20; POLL=50 ;;
  topics)     STREAMS=15000; TOPICS=3000; RATE=0.5; HOLD=20; POLL=2000
              # 1,000 of the topics are per-user: 100 paths x 10 users, each user's streams
              # sending its own Authorization (herald keys those topics by credential).
              PER_USER=1000
              SERVERS=$(echo "$SERVERS" | sed 's/floor//') ;; # the floor has one topic
  gzip)       STREAMS=1000;  TOPICS=1;    RATE=10;  HOLD=15; POLL=50; SIZE=2000
              SERVERS="herald herald-gzip $(echo "$SERVERS" | sed 's/herald//')" ;;
  churn)      STREAMS=2000;  TOPICS=20;   RATE=1;   HOLD=600; POLL=1000; CHURN=5
              [ $QUICK = 1 ] && HOLD=60
              SERVERS=$(echo "$SERVERS" | sed 's/floor//') ;;
  # Upstream change -> client latency by source: polling every 50 ms, an upstream SSE stream,
  # and a backend that publishes each new state (README "Sources").
  sources)    STREAMS=5000;  TOPICS=1;    RATE=10;  HOLD=20; POLL=50
              SERVERS="herald-poll herald-sse herald-publish" ;;
  # Upstream requests for a resource that never changes: fixed interval vs adaptive polling
  # (max_interval 60x the interval), read from "upstream req/s" (x 3600 = requests per hour).
  still)      STREAMS=100;   TOPICS=1;    RATE=0;   HOLD=120; POLL=100; MAX_INTERVAL=6000
              [ $QUICK = 1 ] && HOLD=60
              SERVERS="herald herald-adaptive" ;;
  idle-tls-5k)  STREAMS=5000;  TOPICS=1; RATE=0; HOLD=20; TLS=1; RAMP=1000
                SERVERS=$(echo "$SERVERS" | sed -e 's/herald/herald herald-plain/') ;;
  # The same with clients that offer TLS 1.2 only (the fast path seals TLS 1.2 records too).
  idle-tls12-5k) STREAMS=5000; TOPICS=1; RATE=0; HOLD=20; TLS=1; RAMP=1000; TLS12=1 ;;
  idle-tls-18k) STREAMS=18000; TOPICS=1; RATE=0; HOLD=20; TLS=1; RAMP=1000 ;;
  idle-tls-h2)  STREAMS=2000;  TOPICS=1; RATE=0; HOLD=20; TLS=1; RAMP=500; PROTO=h2; PER_CONN=1 ;;
  # Browser tabs: one h2 connection each, while changes flow (what releasing h2's buffers after
  # each write costs in CPU).
  fanout-tls-h2) STREAMS=2000;  TOPICS=1; RATE=10; HOLD=20; POLL=50; TLS=1; RAMP=500; PROTO=h2; PER_CONN=1 ;;
  idle-tls-h2-100) STREAMS=20000; TOPICS=1; RATE=0; HOLD=20; TLS=1; RAMP=5000; PROTO=h2; PER_CONN=100 ;;
  fanout-tls)   STREAMS=5000;  TOPICS=1; RATE=10; HOLD=20; POLL=50; TLS=1; RAMP=1000
                SERVERS=$(echo "$SERVERS" | sed -e 's/herald/herald herald-plain/') ;;
  storm-tls)    STREAMS=5000;  TOPICS=1; RATE=1; HOLD=20; POLL=1000; TLS=1; RAMP=1000; STORM=5
                SERVERS=$(echo "$SERVERS" | sed -e 's/herald/herald herald-noresume/' -e 's/nchan/nchan nchan-noresume/') ;;
  storm-tls-half) STREAMS=5000; TOPICS=1; RATE=10; HOLD=25; POLL=50; TLS=1; RAMP=1000; STORM=5; STORM_SHARE=0.5
                SERVERS=$(echo "$SERVERS" | sed -e 's/herald/herald herald-noresume/' -e 's/nchan/nchan nchan-noresume/') ;;
  storm-tls-burst) STREAMS=5000; TOPICS=1; RATE=0; HOLD=20; TLS=1; RAMP=1000; STORM=5; STORM_WINDOW=1
                SERVERS=$(echo "$SERVERS" | sed -e 's/herald/herald herald-noresume/' -e 's/nchan/nchan nchan-noresume/') ;;
  *) echo "unknown scenario $SCENARIO" >&2; exit 64 ;;
esac
if [ $QUICK = 1 ] && [ "$SCENARIO" != churn ] && [ "$SCENARIO" != still ]; then HOLD=10; fi
# The floor and the Node server speak plaintext only.
[ "$TLS" = 1 ] && SERVERS=$(echo "$SERVERS" | sed -e 's/floor//' -e 's/node//')
if [ "$TLS" = 1 ]; then
  # One certificate for every server: ECDSA P-256, self-signed (the clients check signatures, not
  # the issuer).
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
fi
RAMP_S=$(( STREAMS / RAMP + 1 ))
RUN_S=$(( RAMP_S + HOLD + 15 ))
# An idle scenario still needs a body that never changes during the run.
UP_RATE=$RATE; [ "$RATE" = 0 ] && UP_RATE=0.0001

wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
start() { "$@" & PIDS+=($!); LAST=$!; }
stop_all() { cleanup; PIDS=(); sleep 1; }

herald_config() {
  cat > "$TMP/herald.toml" <<TOML
listen = "127.0.0.1:$H_PORT"
upstream = "http://127.0.0.1:$UP_PORT"
# Capacity runs ramp faster than herald's default admission (2,000 new streams/s, 1,000 per
# address): lift the limits here so the numbers measure capacity, not admission control.
[server]
max_new_streams_per_sec = 0
max_streams_per_ip = 0
max_streams_per_credential = 0
# The clients come from 16 addresses: 18,000 streams are 1,125 connections per address.
max_connections_per_ip = 0
${TOP_EXTRA:-}
[[route]]
path = "/topic/{n}"
interval = "${R_INTERVAL:-${POLL}ms}"
${ROUTE_EXTRA:-}
TOML
  # Extra herald settings for a run, e.g. HERALD_TOML=$'[sse]\nhistory = 16' for a churn run whose
  # memory must be flat from the first minute (the default history fills for ~17 minutes).
  [ -n "${HERALD_TOML:-}" ] && printf '%s\n' "$HERALD_TOML" >>"$TMP/herald.toml"
  if [ "$1" = tls ]; then printf '[tls]\ncert = "%s"\nkey = "%s"\n' "$TMP/cert.pem" "$TMP/key.pem" >>"$TMP/herald.toml"; fi
  true
}

# Start one server (and its source of changes); sets SPID (pids to sample), PATH_T, ENVELOPE.
start_server() {
  local name=$1
  case $name in
    herald|herald-gzip|herald-before|herald-plain|herald-noresume|herald-poll|herald-sse|herald-publish|herald-adaptive)
      local bin=$BIN/herald; [ "$name" = herald-before ] && bin=$HERALD_BEFORE
      local tls=plain; [ "$TLS" = 1 ] && [ "$name" != herald-plain ] && tls=tls
      local up_extra=() token=bench-publish-token-0123456789
      TOP_EXTRA=""; ROUTE_EXTRA=""; R_INTERVAL=""
      case $name in
        herald-sse) ROUTE_EXTRA='source = { kind = "sse", path = "/topic/{n}/events" }' ;;
        herald-publish)
          TOP_EXTRA=$'[publish]\ntoken = "'$token$'"\npath = "/_herald/publish"'
          ROUTE_EXTRA='share = "all"'; R_INTERVAL=60s
          up_extra=(--publish-url "http://127.0.0.1:$H_PORT/_herald/publish" --publish-token "$token" --topics "$TOPICS") ;;
        herald-adaptive) ROUTE_EXTRA="max_interval = \"${MAX_INTERVAL}ms\"" ;;
      esac
      start "$BENCH" upstream --listen 127.0.0.1:$UP_PORT --rate "$UP_RATE" --size $SIZE "${up_extra[@]}" 2>/dev/null
      wait_port $UP_PORT
      herald_config $tls
      start env ${HERALD_ENV:-} "$bin" --config "$TMP/herald.toml" --log-format json >"$TMP/herald.log" 2>&1
      SPID=$LAST; wait_port $H_PORT
      TARGET=http://127.0.0.1:$H_PORT; [ $tls = tls ] && TARGET=https://127.0.0.1:$H_PORT
      PATH_T="/topic/{n}"; ENVELOPE=true ;;
    nchan|nchan-noresume)
      mkdir -p "$TMP/nginx"
      sed -e "s#@PREFIX@#$TMP/nginx#g" -e "s#@PORT@#$NCHAN_PORT#g" -e "s#@TLS_PORT@#$NCHAN_TLS_PORT#g" \
        -e "s#@CERT@#$TMP/cert.pem#g" -e "s#@KEY@#$TMP/key.pem#g" bench/nchan.conf >"$TMP/nginx/nchan.conf"
      # Without a certificate (plaintext scenarios) the `ssl` listener is left out.
      [ "$TLS" = 1 ] || sed -i '/# tls$/d' "$TMP/nginx/nchan.conf"
      start nginx -p "$TMP/nginx" -c "$TMP/nginx/nchan.conf" 2>>"$TMP/nginx.err"
      wait_port $NCHAN_PORT; sleep 0.3
      SPID="$LAST,$(pgrep -d, -P "$LAST")"
      TARGET=http://127.0.0.1:$NCHAN_PORT; [ "$TLS" = 1 ] && TARGET=https://127.0.0.1:$NCHAN_TLS_PORT
      PATH_T="/sub/{n}"; ENVELOPE=false
      PUB=http://127.0.0.1:$NCHAN_PORT/pub/{n} ;;
    node)
      start node bench/node-sse.js $NODE_PORT 2>/dev/null
      SPID=$LAST; wait_port $NODE_PORT
      TARGET=http://127.0.0.1:$NODE_PORT; PATH_T="/sub/{n}"; ENVELOPE=false
      PUB=http://127.0.0.1:$NODE_PORT/pub/{n} ;;
    floor)
      start "$BENCH" floor --listen 127.0.0.1:$FLOOR_PORT --rate "$UP_RATE" --size $SIZE 2>/dev/null
      SPID=$LAST; wait_port $FLOOR_PORT
      TARGET=http://127.0.0.1:$FLOOR_PORT; PATH_T="/"; ENVELOPE=false ;;
  esac
}

run_one() {
  local name=$1 rep=$2
  start_server "$name"
  if [ "${name%-noresume}" = nchan ] || [ "$name" = node ]; then
    [ "$RATE" != 0 ] && start "$BENCH" publish --url "$PUB" --topics $TOPICS --rate "$RATE" --size $SIZE --seconds $RUN_S
  fi
  local extra=()
  [ "$name" = herald-gzip ] && extra+=(--gzip)
  [ "$CHURN" != 0 ] && extra+=(--churn "$CHURN")
  [ "$PER_USER" != 0 ] && extra+=(--per-user "$PER_USER" --users 10)
  [ "$STORM" != 0 ] && extra+=(--storm "$STORM" --storm-window "$STORM_WINDOW" --storm-share "$STORM_SHARE")
  case $name in *-noresume) extra+=(--resume false) ;; esac
  [ "$TLS12" = 1 ] && extra+=(--tls12)
  case $name in
    herald*) extra+=(--upstream-stats http://127.0.0.1:$UP_PORT --poll-interval-ms $POLL --keyed-by-credential) ;;
  esac
  local label=$name; [ "$name" = herald-gzip ] && label=herald
  echo "== $SCENARIO: $name (run $rep/$REPS), load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  "$BENCH" run --target "$TARGET" --path "$PATH_T" --topics $TOPICS --streams $STREAMS \
    --ramp $RAMP --hold $HOLD --proto $PROTO --per-conn $PER_CONN --workers $WORKERS \
    --envelope $ENVELOPE --pid "$SPID" --label "$label" --json "$ROWS" "${extra[@]}" >&2 || true
  stop_all
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for rep in $(seq "$REPS"); do
  for s in $SERVERS; do run_one "$s" "$rep"; done
done
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

SUMMARY=$("$BENCH" summarize --file "$ROWS")
PU_TEXT=""
case " $SERVERS " in
  *" herald-before "*) BEFORE_TEXT="
herald-before: \`$HERALD_BEFORE\`, commit $(git -C "$(dirname "$HERALD_BEFORE")" rev-parse --short HEAD 2>/dev/null || echo unknown)." ;;
esac
[ "$PER_USER" != 0 ] && PU_TEXT=" ($PER_USER of them per-user: 10 users x $((PER_USER / 10)) paths, each user's own Authorization)"
REPORT=$(cat <<MD

### $SCENARIO ($(date -u +%Y-%m-%d\ %H:%M\ UTC))

\`$CMDLINE\` — $STREAMS streams ($PROTO${GZIP:+, gzip}$([ "$TLS" = 1 ] && echo ", TLS")$([ "$PROTO" = h2 ] && echo ", $PER_CONN per connection")$([ "$STORM" != 0 ] && echo ", storm ${STORM}s after the ramp, ${STORM_WINDOW}s window, share $STORM_SHARE")), $TOPICS topic(s)$PU_TEXT, changes ${RATE}/s per topic,
${SIZE} B bodies, herald polls every ${POLL} ms, hold ${HOLD} s, churn ${CHURN} s, $REPS run(s) each.
Machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p' | head -1), kernel $(uname -r),
$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo). Commit ${BENCH_COMMIT:-$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src bench || echo ' + uncommitted changes')}.
Load average before/after: $LOAD_BEFORE / $LOAD_AFTER.${BEFORE_TEXT:-}

$SUMMARY
MD
)
echo "$REPORT"
[ $APPEND = 1 ] && echo "$REPORT" >> "${BENCHMARKS:-BENCHMARKS.md}"
cp "$ROWS" "/tmp/bench-$SCENARIO-rows.jsonl"
