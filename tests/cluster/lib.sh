# Shell helpers both profiles use (tests/cluster/common.sh and tests/cluster/node/common.sh
# source this file). Sourced, not run. Each profile defines its own `log`.

# True while process $1 exists and has not yet exited (a zombie has exited).
alive() {
  kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

# Sends SIGTERM to process $2 (named $1 in the log) and waits for it to exit; SIGKILL after 20 s.
stop_pid() {
  local name=$1 pid=$2 t0
  kill -TERM "$pid" 2>/dev/null || true
  t0=$(date +%s)
  while alive "$pid"; do
    if (( $(date +%s) - t0 >= 20 )); then
      log "$name (pid $pid) ignored SIGTERM for 20s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      sleep 0.5
      break
    fi
    sleep 0.2
  done
}

# Waits up to $1 seconds for the command in the remaining arguments to succeed. On time-out it
# says what it waited for ($2) and, when LOG_DIR/$2.log exists (a component's log), its tail.
wait_for() {
  local limit=$1 what=$2 t0
  shift 2
  t0=$(date +%s)
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) - t0 >= limit )); then
      log "timed out after ${limit}s waiting for $what"
      [ -n "${LOG_DIR:-}" ] && [ -f "$LOG_DIR/$what.log" ] && tail -15 "$LOG_DIR/$what.log" >&2
      return 1
    fi
    sleep 0.5
  done
}

# Runs a command against a profile of the local cluster: starts it with $2 unless $1 (a check)
# says it runs, runs the command with the environment that $3 prints, and stops it with $4
# afterwards only if this call started it (a failed stop fails the run). Exits with the
# command's status.
#   with_profile RUNNING_CHECK UP_SCRIPT ENV_SCRIPT DOWN_SCRIPT COMMAND [ARGS...]
with_profile() {
  local running=$1 up=$2 env=$3 down=$4
  shift 4
  [ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
  if ! "$running"; then
    # Stop it again however this ends, Ctrl-C included.
    # shellcheck disable=SC2064
    trap "rc=\$?; '$down' || rc=1; exit \$rc" EXIT
  else
    log "using the one that was already running; leaving it up"
  fi
  "$up" > /dev/null
  eval "$("$env" 2>/dev/null)"
  local status=0
  "$@" || status=$?
  exit "$status"
}
