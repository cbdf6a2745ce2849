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

with_profile node_running "$node_here/up.sh" "$node_here/env.sh" "$node_here/down.sh" "$@"
