#!/usr/bin/env bash
# Runs a working local fleet: one redis-server and N wsfleet-server processes on loopback,
# in the foreground. Ctrl-C drains the servers and stops everything this script started.
#
#   SERVERS=3 REDIS_PORT=6390 WS_PORT=8081 HTTP_PORT=9091 scripts/run-fleet.sh
#
# REDIS_PREFIX sets the servers' --redis-prefix (a WebSocketCluster's fleet uses
# "<namespace>.<name>", which is how `make run` lets the operator count these servers).
# QUIET=1 skips the how-to text; SKIP_BUILD=1 uses the binaries already built.
# With Node.js, the chat demo of the JavaScript client (clients/js/examples/chat) is served on
# loopback port DEMO_PORT (8090), connected to these servers; DEMO=0 leaves it out.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVERS=${SERVERS:-3}
REDIS_PORT=${REDIS_PORT:-6390}
WS_PORT=${WS_PORT:-8081}
HTTP_PORT=${HTTP_PORT:-9091}
RUN_DIR=${RUN_DIR:-.run/fleet}
REDIS_PREFIX=${REDIS_PREFIX:-wsfleet}
DEMO_PORT=${DEMO_PORT:-8090}
DEMO=${DEMO:-1}

command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server" >&2; exit 1; }
[ -n "${SKIP_BUILD:-}" ] || cargo build --release -p wsfleet-server --bin wsfleet-server --example wscat
mkdir -p "$RUN_DIR"

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping: servers drain (SIGTERM), then redis"
  for pid in "${pids[@]:1}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]:1}"; do wait "$pid" 2>/dev/null || true; done
  kill -TERM "${pids[0]}" 2>/dev/null || true
  wait "${pids[0]}" 2>/dev/null || true
}
trap stop INT TERM HUP EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --logfile "$RUN_DIR/redis.log" &
pids+=($!)
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

for i in $(seq 0 $((SERVERS - 1))); do
  ./target/release/wsfleet-server \
    --listen "127.0.0.1:$((WS_PORT + i))" --http-listen "127.0.0.1:$((HTTP_PORT + i))" \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" --redis-prefix "$REDIS_PREFIX" --pod-name "local-$i" --drain-timeout 5 \
    2> "$RUN_DIR/server-$i.log" &
  pids+=($!)
done
for i in $(seq 0 $((SERVERS - 1))); do
  for _ in $(seq 100); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$((HTTP_PORT + i))/readyz")" = 200 ] && break
    sleep 0.1
  done
done

demo=""
if [ "$DEMO" = 1 ]; then
  urls=()
  for i in $(seq 0 $((SERVERS - 1))); do urls+=("ws://127.0.0.1:$((WS_PORT + i))"); done
  start_demo "${urls[@]}"
  demo=$DEMO_URL
  [ -z "$DEMO_PID" ] || pids+=("$DEMO_PID")
fi

if [ -n "${QUIET:-}" ]; then
  echo "fleet: redis 127.0.0.1:$REDIS_PORT, servers ws://127.0.0.1:$WS_PORT..$((WS_PORT + SERVERS - 1)) (logs in $RUN_DIR/)"
  [ -z "$demo" ] || echo "chat demo: $demo"
  wait -n "${pids[@]}" || true
  exit 0
fi
cat <<TXT

wsfleet is running: redis on 127.0.0.1:$REDIS_PORT and $SERVERS servers (logs in $RUN_DIR/).
TXT
for i in $(seq 0 $((SERVERS - 1))); do
  echo "  server $i: ws://127.0.0.1:$((WS_PORT + i))  health and metrics: http://127.0.0.1:$((HTTP_PORT + i))/metrics"
done
cat <<TXT

Try it from two terminals (messages typed on one server appear on every server):
  ./target/release/examples/wscat ws://127.0.0.1:$WS_PORT/ws/lobby
  ./target/release/examples/wscat ws://127.0.0.1:$((WS_PORT + SERVERS - 1))/ws/lobby
Protocol mode:
  ./target/release/examples/wscat ws://127.0.0.1:$WS_PORT/ws
  {"op":"subscribe","channel":"lobby"}
  {"op":"publish","channel":"lobby","data":{"hello":"fleet"}}
TXT
if [ -n "$demo" ]; then
  cat <<TXT

The JavaScript client's chat demo: open $demo in two browser tabs
(each starts on a random server) and drain one server under them with kill -TERM <pid>:
TXT
  for i in $(seq 0 $((SERVERS - 1))); do echo "  server $i: pid ${pids[$((i + 1))]}"; done
fi
cat <<TXT

Ctrl-C to stop.
TXT
wait -n "${pids[@]}" || true
echo "a process of the fleet exited; see $RUN_DIR/" >&2
