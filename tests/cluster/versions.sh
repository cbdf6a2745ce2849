# Versions of the local control plane, and the cache directory they are built into.
# Sourced by the scripts beside it. The cache lives outside the repository so that a fresh
# clone on the same machine (as CI makes) reuses it.
K8S_VERSION=${K8S_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
WSFLEET_CACHE=${WSFLEET_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wsfleet}
CLUSTER_BIN=$WSFLEET_CACHE/cluster-k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION/bin
HELM_VERSION=${HELM_VERSION:-v3.22.0}; HELM_BIN=$WSFLEET_CACHE/helm-$HELM_VERSION/bin
# The node profile (tests/cluster/node): CoreDNS from its Go module, and the pause binary that
# the sandbox image holds (images/pause), built into a cache of their own.
COREDNS_VERSION=${COREDNS_VERSION:-v1.15.0}
NODE_BIN=$WSFLEET_CACHE/node-coredns-$COREDNS_VERSION/bin
