#!/usr/bin/env bash
# Imports the image tarballs that images/build.sh wrote (default .run/images) into the node's
# containerd (namespace k8s.io, where kubelet looks), when the node runs. Pods already running
# keep the image they started with; new pods get the new one. Prints "operator-image-changed" on
# its last line when the operator's image differs from the one imported before.
#
#   tests/cluster/node/import-images.sh [DIR]
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

dir=${1:-$repo_root/.run/images}
if ! [ -S "$CONTAINERD_SOCK" ] || ! ctr_k8s version > /dev/null 2>&1; then
  log "the node's containerd is not running: images stay in $dir until make node-up imports them"
  exit 0
fi
before=$(ctr_k8s images ls | grep wsfleet-operator || true)
for f in "$dir"/*.tar; do
  ctr_k8s images import "$f" > /dev/null
done
log "imported: $(ctr_k8s images ls -q | grep -v '^sha256:' | tr '\n' ' ')"
[ "$before" = "$(ctr_k8s images ls | grep wsfleet-operator)" ] || echo operator-image-changed
