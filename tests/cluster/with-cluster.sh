#!/usr/bin/env bash
# Runs a command against the local control plane: starts it if it is not running (up.sh),
# runs the command with KUBECONFIG exported and our kubectl first on PATH, and stops the cluster
# afterwards only if this script started it. Exits with the command's status.
#
#   tests/cluster/with-cluster.sh cargo test -p wsfleet-e2e
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }

started=0
if ! cluster_running; then
  started=1
  # Stop it again however this script ends, Ctrl-C included; a failed stop fails the run.
  cleanup() { local rc=$?; "$cluster_here/down.sh" || rc=1; exit "$rc"; }
  trap cleanup EXIT
fi
"$cluster_here/up.sh" > /dev/null
export KUBECONFIG=$CLUSTER_KUBECONFIG
[ "$started" = 1 ] || log "using the cluster that was already running; leaving it up"
status=0
"$@" || status=$?
exit "$status"
