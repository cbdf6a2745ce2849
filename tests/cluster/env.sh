#!/usr/bin/env bash
# Prints the shell commands that point kubectl at the local control plane (KUBECONFIG, and our
# kubectl first on PATH), for:  eval "$(tests/cluster/env.sh)"
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

cluster_ready || log "the cluster is not running; start it with: make cluster-up"
printf 'export KUBECONFIG=%q\n' "$CLUSTER_KUBECONFIG"
printf 'export PATH=%q:"$PATH"\n' "$CLUSTER_BIN"
