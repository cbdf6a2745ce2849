#!/usr/bin/env bash
# Builds the helm CLI from its Go module (helm.sh/helm/v3, cmd/helm) into a version-keyed cache
# outside the repository, and does nothing when it is already there. The chart tests run it for
# `helm lint` and `helm template`.
#
# The link flags are the ones helm's own Makefile sets for a release: the version, and the
# Kubernetes version its client-go module is built for (used by `helm template` as the default
# capabilities and by `helm lint` for deprecation checks).
#
# Prints the path of the helm binary on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"

log() { echo "[build-helm] $*" >&2; }

helm=$HELM_BIN/helm
if [ -x "$helm" ]; then
  echo "$helm"
  exit 0
fi
log "missing: $helm"

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
start=$(date +%s)
mkdir -p "$HELM_BIN"
gomod=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
[ -f "$gomod" ] || { log "cannot download helm.sh/helm/v3@$HELM_VERSION"; exit 1; }
# client-go vX.Y.Z is Kubernetes 1.Y (helm's Makefile: major X+1, minor Y).
client_go=$(awk '$1 == "k8s.io/client-go" {print $2}' "$gomod")
[ -n "$client_go" ] || { log "no k8s.io/client-go in $gomod"; exit 1; }
k8s_minor=$(echo "$client_go" | cut -d. -f2)
ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
ld+=" -X helm.sh/helm/v3/internal/version.metadata= -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  ld+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$k8s_minor"
done
log "building helm $HELM_VERSION (client-go $client_go)"
# Into a temporary directory first, so an interrupted build never leaves a half-written binary.
tmp=$(mktemp -d "$HELM_BIN/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
GOBIN=$tmp go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
mv "$tmp/helm" "$helm"
log "built in $(( $(date +%s) - start ))s: $("$helm" version --short)"
echo "$helm"
