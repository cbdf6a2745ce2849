#!/usr/bin/env bash
# Runs a command against the local control plane: starts it if it is not running (up.sh),
# runs the command with KUBECONFIG exported and our kubectl first on PATH, and stops the cluster
# afterwards only if this script started it. Exits with the command's status.
#
#   tests/cluster/with-cluster.sh cargo test -p wsfleet-e2e
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

with_profile cluster_running "$cluster_here/up.sh" "$cluster_here/env.sh" "$cluster_here/down.sh" "$@"
