#!/usr/bin/env bash
# Builds what the node profile needs besides the control plane's binaries (tests/cluster/build.sh
# builds those, kubelet and kube-proxy included) into a version-keyed cache outside the
# repository, and does nothing when it is there:
#
#   coredns  <- github.com/coredns/coredns (its go.mod has no replaces, so `go install` works)
#   pause    <- images/pause (the sandbox image's only file)
#
# Prints the bin directory on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo_root=$(cd "$here/../../.." && pwd)
# shellcheck source=../versions.sh
. "$here/../versions.sh"

log() { echo "[node-build] $*" >&2; }

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
mkdir -p "$NODE_BIN"
if [ ! -x "$NODE_BIN/coredns" ]; then
  start=$(date +%s)
  log "building coredns $COREDNS_VERSION"
  tmp=$(mktemp -d "$NODE_BIN/.build.XXXXXX")
  GOBIN=$tmp go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
  mv "$tmp/coredns" "$NODE_BIN/coredns"
  rm -rf "$tmp"
  log "built coredns in $(( $(date +%s) - start ))s"
fi
# The pause binary follows its source: rebuilt when images/pause/main.go changes.
sum=$(sha256sum "$repo_root/images/pause/main.go" | cut -c1-12)
if [ ! -x "$NODE_BIN/pause-$sum" ]; then
  log "building pause ($sum)"
  rm -f "$NODE_BIN"/pause-*
  (cd "$repo_root/images/pause" && go build -trimpath -ldflags "-s -w" -o "$NODE_BIN/pause-$sum" main.go)
fi
ln -sf "pause-$sum" "$NODE_BIN/pause"
echo "$NODE_BIN"
