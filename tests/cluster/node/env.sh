#!/usr/bin/env bash
# Prints the shell commands that point kubectl at the node profile (KUBECONFIG, our kubectl and
# helm first on PATH, and CONTAINERD_ADDRESS for `ctr -n k8s.io ...`), for:
#   eval "$(tests/cluster/node/env.sh)"
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

api_ready || log "the node is not running; start it with: make node-up"
printf 'export KUBECONFIG=%q\n' "$NODE_KUBECONFIG"
printf 'export PATH=%q:%q:"$PATH"\n' "$CLUSTER_BIN" "$HELM_BIN"
printf 'export CONTAINERD_ADDRESS=%q\n' "$CONTAINERD_SOCK"
