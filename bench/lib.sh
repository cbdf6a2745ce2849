# Helpers for the benchmark scripts: start redis-server and wsfleet-server processes on loopback
# ports chosen at run time, remember their pids, stop them all on exit. Sourced, not run.

BENCH_PIDS=()
BENCH_DIR=${BENCH_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/wsfleet-bench.XXXXXX")}

bench_stop_all() {
  for pid in "${BENCH_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${BENCH_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  BENCH_PIDS=()
}
trap bench_stop_all EXIT

# A TCP port nobody listens on right now.
bench_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# bench_start_redis -> sets REDIS_PORT and REDIS_URL
bench_start_redis() {
  REDIS_PORT=$(bench_free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --logfile "$BENCH_DIR/redis-$REDIS_PORT.log" &
  BENCH_PIDS+=($!)
  for _ in $(seq 100); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.05; done
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT"
}

# bench_start_server NAME [flags...] -> sets SERVER_WS, SERVER_HTTP and SERVER_PID once the server
# is ready. Call it directly (not in a subshell), so its pid is recorded for bench_stop_all.
bench_start_server() {
  local name=$1; shift
  local log="$BENCH_DIR/$name.log"
  ./target/release/wsfleet-server --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --pod-name "$name" "$@" 2>"$log" &
  SERVER_PID=$!
  BENCH_PIDS+=("$SERVER_PID")
  local line=""
  for _ in $(seq 200); do
    line=$(grep -m1 'listening' "$log" 2>/dev/null || true)
    [ -n "$line" ] && break
    sleep 0.05
  done
  [ -n "$line" ] || { echo "server $name did not start; see $log" >&2; return 1; }
  SERVER_WS=$(sed -n 's/.*websocket=\([^ ]*\).*/\1/p' <<<"$line")
  SERVER_HTTP=$(sed -n 's/.*http=\([^ ]*\).*/\1/p' <<<"$line")
  for _ in $(seq 200); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$SERVER_HTTP/readyz")" = 200 ] && break
    sleep 0.05
  done
}
