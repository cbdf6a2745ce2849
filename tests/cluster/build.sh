#!/usr/bin/env bash
# Builds the local control plane's binaries from Go modules into a version-keyed cache
# outside the repository, and does nothing when the cache is already complete.
#
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
#   kubelet, kube-proxy (the node profile)                           <- k8s.io/kubernetes
#   etcd                                                             <- go.etcd.io/etcd/server/v3
#   kwok, kwokctl                                                    <- sigs.k8s.io/kwok
#
# k8s.io/kubernetes points its staging modules at ./staging in its go.mod, so it cannot be
# `go install`ed; a throwaway wrapper module requires it and replaces each staging module
# with its tagged v0.<minor>.<patch> release. etcd's server module has local replaces too,
# so it gets a wrapper of its own.
#
# Prints the bin directory on its last line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"

log() { echo "[build] $*" >&2; }

need=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy etcd kwok kwokctl)
missing=()
for b in "${need[@]}"; do [ -x "$CLUSTER_BIN/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then
  echo "$CLUSTER_BIN"
  exit 0
fi
log "missing in $CLUSTER_BIN: ${missing[*]}"

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
mkdir -p "$CLUSTER_BIN"
work=$(mktemp -d "${TMPDIR:-/tmp}/wsfleet-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

build_kubernetes() {
  local v=$K8S_VERSION minor patch gomod goline
  minor=$(echo "$v" | cut -d. -f2); patch=$(echo "$v" | cut -d. -f3)
  gomod=$(go mod download -json "k8s.io/kubernetes@$v" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$gomod" ] || { log "cannot download k8s.io/kubernetes@$v"; exit 1; }
  goline=$(grep -m1 '^go ' "$gomod")
  mkdir -p "$work/k8s" && cd "$work/k8s"
  {
    echo "module wsfleet.local/k8s-build"
    echo
    echo "$goline"
    echo
    echo "require k8s.io/kubernetes $v"
    echo
    echo "replace ("
    grep -E '^\s*k8s.io/[^ ]+ => ./staging/src/' "$gomod" |
      awk -v ver="v0.$minor.$patch" '{print "\t" $1 " => " $1 " " ver}'
    echo ")"
  } > go.mod
  local pkgs=(k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager
              k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
              k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy)
  # Pin the version on every package: a bare `go get pkg` would upgrade k8s.io/kubernetes to
  # the newest release, whose staging packages the replaces above do not have.
  go get -tool "${pkgs[@]/%/@$v}"
  go mod tidy
  local ld="-s -w"
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld+=" -X $p.gitVersion=$v -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
    ld+=" -X $p.buildDate=1970-01-01T00:00:00Z"
  done
  log "building kubernetes $v (this is the long part)"
  go build -trimpath -ldflags "$ld" -o "$CLUSTER_BIN/" "${pkgs[@]}"
}

build_etcd() {
  mkdir -p "$work/etcd" && cd "$work/etcd"
  go mod init wsfleet.local/etcd-build >/dev/null 2>&1
  go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go mod tidy
  log "building etcd $ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$CLUSTER_BIN/etcd" go.etcd.io/etcd/server/v3
}

build_kwok() {
  log "building kwok $KWOK_VERSION"
  GOBIN="$CLUSTER_BIN" go install -trimpath -ldflags "-s -w" \
    "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION"
}

for b in "${missing[@]}"; do
  case $b in kwok|kwokctl) want_kwok=1 ;; etcd) want_etcd=1 ;; *) want_k8s=1 ;; esac
done
[ -n "${want_kwok:-}" ] && (build_kwok)
[ -n "${want_etcd:-}" ] && (build_etcd)
[ -n "${want_k8s:-}" ] && (build_kubernetes)

log "built in $(( $(date +%s) - start ))s into $CLUSTER_BIN"
echo "$CLUSTER_BIN"
