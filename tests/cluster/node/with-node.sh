#!/usr/bin/env bash
# Runs a command against the node profile: starts it (up.sh: node, images, chart) unless it is
# running, runs the command with KUBECONFIG exported and our kubectl first on PATH, and takes the
# node down afterwards (down.sh, which fails when the machine is not left as it was found) only
# if this script started it. Exits with the command's status, or 1 when the stop failed.
#
#   tests/cluster/node/with-node.sh cargo test -p wsfleet-e2e --test node
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }

started=0
if ! node_running; then
  started=1
  cleanup() { local rc=$?; "$node_here/down.sh" || rc=1; exit "$rc"; }
  trap cleanup EXIT
fi
"$node_here/up.sh" > /dev/null
export KUBECONFIG=$NODE_KUBECONFIG CONTAINERD_ADDRESS=$CONTAINERD_SOCK
[ "$started" = 1 ] || log "using the node that was already running; leaving it up"
status=0
"$@" || status=$?
exit "$status"
