# The JavaScript client's chat demo, for `make run` and `make fleet` (sourced, not run): with
# Node.js, builds clients/js when it is not built yet and serves clients/js/examples/chat on
# 127.0.0.1:$DEMO_PORT against the WebSocket URLs given, logging to $RUN_DIR/demo.log.
# Sets DEMO_URL (empty when the demo is left out) and DEMO_PID (the server's pid, to stop it).

start_demo() {
  DEMO_URL="" DEMO_PID=""
  command -v node >/dev/null || return 0
  if [ ! -f clients/js/dist/index.js ] && command -v npm >/dev/null; then
    echo "[demo] building the JavaScript client for the chat demo"
    (cd clients/js && npm ci --no-audit --no-fund --loglevel=error >/dev/null && npm run --silent build) \
      || echo "the chat demo is left out: building clients/js failed" >&2
  fi
  [ -f clients/js/dist/index.js ] || return 0
  node clients/js/examples/chat/serve.mjs --port "$DEMO_PORT" "$@" > "$RUN_DIR/demo.log" 2>&1 &
  DEMO_PID=$!
  DEMO_URL="http://127.0.0.1:$DEMO_PORT/examples/chat/"
}
