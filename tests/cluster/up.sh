#!/usr/bin/env bash
# Starts the local Kubernetes control plane on 127.0.0.1, or reuses the one already running:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok (the fake kubelet) as
# plain processes, started by kwokctl's binary runtime from the binaries build.sh caches, with
# N fake Ready nodes. Waits until /readyz is ok and the nodes are Ready, then prints the
# kubeconfig path on its last line.
#
#   WSFLEET_CLUSTER_NODES=3 tests/cluster/up.sh
#   export KUBECONFIG=$(tests/cluster/up.sh | tail -1)
#
# Settings: see common.sh. Stop it with tests/cluster/down.sh.
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

start=$(date +%s)
bin=$("$cluster_here/build.sh" | tail -1)
[ "$bin" = "$CLUSTER_BIN" ] || { log "build.sh printed $bin, expected $CLUSTER_BIN"; exit 1; }

mkdir -p "$CLUSTER_DIR"
# One up.sh or down.sh at a time per run directory.
exec 9> "$CLUSTER_DIR/.lock"
flock -w 300 9 || { log "another up.sh/down.sh holds $CLUSTER_DIR/.lock"; exit 1; }

kwokctl_log=$CLUSTER_DIR/kwokctl.log

k() { kubectl --kubeconfig "$CLUSTER_KUBECONFIG" --request-timeout=10s "$@"; }

if cluster_running; then
  log "reusing the running cluster ($CLUSTER_STATE)"
else
  if [ -d "$CLUSTER_STATE" ]; then
    log "a previous cluster is incomplete or stopped; removing it"
    cluster_stop
  fi
  config=$CLUSTER_DIR/kwokctl.yaml
  # Everything binds and advertises 127.0.0.1. The binaries come from the local cache, so
  # kwokctl downloads nothing. Leader election is off: there is one of each component.
  cat > "$config" <<YAML
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokctlConfiguration
options:
  runtime: binary
  kubeVersion: $K8S_VERSION
  bindAddress: 127.0.0.1
  kubeBinaryPrefix: $CLUSTER_BIN
  kubectlBinary: $CLUSTER_BIN/kubectl
  etcdBinary: $CLUSTER_BIN/etcd
  kwokControllerBinary: $CLUSTER_BIN/kwok
  cacheDir: $CLUSTER_DIR/cache
  quietPull: true
componentsPatches:
- name: kube-apiserver
  extraArgs:
  - key: advertise-address
    value: 127.0.0.1
  # The API server would publish its address as the endpoint of the "kubernetes" Service, and
  # Endpoints refuse loopback addresses; nothing here needs that endpoint.
  - key: endpoint-reconciler-type
    value: none
  # The default Service range (10.0.0.0/24) holds 254 ClusterIPs: too few for the operator
  # benchmark's thousand fleets. Fake nodes route nothing, so the range is only bookkeeping.
  - key: service-cluster-ip-range
    value: 10.96.0.0/16
# The controllers' client rate limit (20 requests/s by default) would make a thousand
# Deployments take minutes to get their pods; the operator benchmark measures wsfleet, not that.
- name: kube-controller-manager
  extraArgs:
  - key: leader-elect
    value: "false"
  - key: kube-api-qps
    value: "500"
  - key: kube-api-burst
    value: "1000"
- name: kube-scheduler
  extraArgs:
  - key: leader-elect
    value: "false"
YAML
  log "starting the control plane in $CLUSTER_STATE"
  # 9>&-: the component processes must not inherit the lock's file descriptor.
  kwokctl -c "$config" --name "$CLUSTER_NAME" create cluster \
    --kubeconfig "$CLUSTER_KUBECONFIG" --wait 120s --timeout 300s >> "$kwokctl_log" 2>&1 9>&- ||
    { tail -20 "$kwokctl_log" >&2; log "kwokctl create cluster failed; logs in $CLUSTER_STATE/logs"; exit 1; }
fi

wait_for 120 "kube-apiserver /readyz" cluster_ready

nodes=$(k get nodes -o name | wc -l)
if [ "$nodes" -ne "$CLUSTER_NODES" ]; then
  log "scaling fake nodes $nodes -> $CLUSTER_NODES"
  # Fake nodes get loopback InternalIPs (127.0.0.1, .2, ...) and an IPv4 pod range only, so no
  # address the control plane might dial points off this machine.
  kwokctl -c "$CLUSTER_DIR/kwokctl.yaml" --name "$CLUSTER_NAME" scale node --replicas "$CLUSTER_NODES" \
    --param '.nodeIPs = ["127.0.0.1"]' --param '.podCIDRs = ["10.244.0.0/24"]' >> "$kwokctl_log" 2>&1 9>&- ||
    { tail -20 "$kwokctl_log" >&2; log "kwokctl scale node failed"; exit 1; }
fi
if [ "$CLUSTER_NODES" -gt 0 ]; then
  k wait --for=condition=Ready nodes --all --timeout=60s >/dev/null
fi
# kube-controller-manager is working once its service-account controller has filled in the
# default namespace.
wait_for 60 "kube-controller-manager (default service account)" k -n default get serviceaccount default

log "ready in $(( $(date +%s) - start ))s: $(k get nodes --no-headers | wc -l) nodes, kubeconfig $CLUSTER_KUBECONFIG"
echo "$CLUSTER_KUBECONFIG"
