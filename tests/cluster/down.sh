#!/usr/bin/env bash
# Stops the local control plane that up.sh started: every component process by its pid, then
# removes its state and kubeconfig, and fails if any process of it is still running.
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

if [ ! -d "$CLUSTER_DIR" ]; then
  left=$(cluster_leftovers | tr '\n' ' ')
  [ -z "$left" ] || { log "no state in $CLUSTER_DIR, yet pids $left name it"; exit 1; }
  log "no cluster in $CLUSTER_DIR"
  exit 0
fi
exec 9> "$CLUSTER_DIR/.lock"
flock -w 300 9 || { log "another up.sh/down.sh holds $CLUSTER_DIR/.lock"; exit 1; }
cluster_stop
log "stopped; no process of the cluster remains"
