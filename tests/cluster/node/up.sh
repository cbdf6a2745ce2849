#!/usr/bin/env bash
# Starts the node profile (see common.sh), or reuses the one already running: a real
# single-node Kubernetes cluster whose pods are containers. Then builds the images, imports them
# into the node's containerd, and installs the chart (the operator runs as a pod). Idempotent;
# prints the kubeconfig path on its last line.
#
#   tests/cluster/node/up.sh                 everything (make node-up)
#   NODE_SKIP_CHART=1 tests/cluster/node/up.sh   the node and the images only
#
# Stop it with tests/cluster/node/down.sh, which leaves the machine as this script found it.
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

t_start=$(date +%s)
operator_image_changed=
step_t=$t_start
# Prints how long the step since the last call took.
step() { local now; now=$(date +%s); log "$1 ($(( now - step_t ))s)"; step_t=$now; }

[ "$(id -u)" = 0 ] || { log "the node profile needs root (network, mounts, cgroups)"; exit 1; }
for tool in containerd containerd-shim-runc-v2 runc ctr iptables nft openssl python3; do
  command -v "$tool" >/dev/null || { log "missing $tool: run scripts/install-deps.sh"; exit 1; }
done
[ -x /usr/lib/cni/bridge ] || { log "missing CNI plugins in /usr/lib/cni: run scripts/install-deps.sh"; exit 1; }
[ "$(stat -fc %T /sys/fs/cgroup)" != cgroup2fs ] ||
  { log "this host has cgroup v2 only; the node profile is set up for cgroup v1 (cgroupfs driver)"; exit 1; }

log "building (first run: 15-20 minutes for Kubernetes and CoreDNS from Go modules, then cached)"
"$node_here/../build.sh" > /dev/null
"$node_here/build.sh" > /dev/null
step "binaries ready in $CLUSTER_BIN and $NODE_BIN"

mkdir -p "$NODE_DIR" "$NODE_RUN"
exec 9> "$NODE_RUN/.lock"
flock -w 600 9 || { log "another up.sh/down.sh holds $NODE_RUN/.lock"; exit 1; }

# A node some other clone started: stop it first (one node per machine).
if [ -f "$NODE_RUN/dir" ] && [ "$(cat "$NODE_RUN/dir")" != "$NODE_DIR" ]; then
  other=$(cat "$NODE_RUN/dir")
  log "a node of another clone ($other) holds this machine's node; stopping it"
  flock -u 9
  WSFLEET_NODE_DIR=$other "$node_here/down.sh"
  flock -w 600 9
fi

start_node() {
  if [ -n "$(node_pids)" ] || ip link show "$NODE_BRIDGE" >/dev/null 2>&1; then
    log "a previous node is incomplete or stopped; removing it"
    flock -u 9
    "$node_here/down.sh"
    flock -w 600 9
  fi
  # Service traffic between pods on the bridge passes kube-proxy's rules only with br_netfilter.
  # Loaded before the record, so its settings are recorded (and restored) like the others.
  modprobe br_netfilter 2>/dev/null || true
  [ -d /proc/sys/net/bridge ] || { log "br_netfilter is not available: Service traffic between pods needs it"; exit 1; }
  # What the machine looks like before the node touches it; down.sh compares against it.
  "$node_here/state.sh" > "$NODE_DIR/machine-before.txt"
  echo "$NODE_DIR" > "$NODE_RUN/dir"
  : > "$NODE_DIR/sysctls-before.txt"
  for s in "${NODE_SYSCTLS[@]}"; do
    f=/proc/sys/${s//.//}
    [ -r "$f" ] && printf '%s\t%s\n' "$s" "$(cat "$f")" >> "$NODE_DIR/sysctls-before.txt"
  done
  rm -rf "$NODE_LOGS"
  mkdir -p "$NODE_LOGS"

  host_network
  pki
  write_configs
  step "network, certificates and configuration written"

  start_control_plane
  start_node_components
}

# The bridge the pods attach to, carrying the node IP; the Service range routed to it (so a
# Service address never leaves the machine, even before kube-proxy has a rule for it); packet
# forwarding on, but only from the bridge back to the bridge.
host_network() {
  sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 net.bridge.bridge-nf-call-ip6tables=1
  ip link add "$NODE_BRIDGE" type bridge
  ip addr add "$NODE_IP/24" dev "$NODE_BRIDGE"
  ip link set "$NODE_BRIDGE" up
  ip route add "$SERVICE_CIDR" dev "$NODE_BRIDGE"
  # A table of the node's own, which kube-proxy never touches; a drop here holds whatever
  # another table's chains accept. Forwarding only within the bridge (pod to pod, also after
  # kube-proxy's DNAT), for IPv4 and IPv6; the node's address answers only this machine and
  # the pods.
  nft -f - <<NFT
table inet wsfleet-node {
  chain forward {
    type filter hook forward priority -10; policy accept;
    iifname != "$NODE_BRIDGE" drop
    oifname != "$NODE_BRIDGE" drop
  }
  chain input {
    type filter hook input priority -10; policy accept;
    ip daddr $NODE_IP iifname != { "lo", "$NODE_BRIDGE" } drop
  }
}
NFT
  # kubelet needs a cgroup root that exists in every hierarchy; cpuset's must hold CPUs and
  # memory nodes before anything can join it.
  local d
  for d in /sys/fs/cgroup/*/; do
    [ -f "$d/cgroup.procs" ] || continue
    [[ $d == */unified/ ]] && continue
    mkdir -p "$d$NODE_CGROUP"
    if [ -f "$d/cpuset.cpus" ]; then
      cat "$d/cpuset.cpus" > "$d$NODE_CGROUP/cpuset.cpus"
      cat "$d/cpuset.mems" > "$d$NODE_CGROUP/cpuset.mems"
    fi
  done
}

# A CA, serving certificates for the API server and the kubelet, and one client certificate per
# identity (RBAC's bootstrap policy knows each), plus the service-account signing key.
pki() {
  mkdir -p "$PKI"
  cd "$PKI"
  openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
  openssl req -x509 -new -key ca.key -subj "/CN=wsfleet-node-ca" -days 3650 -out ca.crt 2>/dev/null
  openssl ecparam -name prime256v1 -genkey -noout -out sa.key 2>/dev/null
  openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
  cert apiserver "/CN=kube-apiserver" serverAuth \
    "IP:$NODE_IP,IP:$API_SERVICE_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert kubelet-serving "/CN=$NODE_NAME" serverAuth "IP:$NODE_IP,DNS:$NODE_NAME"
  cert admin "/O=system:masters/CN=wsfleet-admin" clientAuth
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
  cert kube-controller-manager "/CN=system:kube-controller-manager" clientAuth
  cert kube-scheduler "/CN=system:kube-scheduler" clientAuth
  cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
  cert kube-proxy "/CN=system:kube-proxy" clientAuth
  cert coredns "/CN=system:wsfleet-coredns" clientAuth
  chmod 600 ./*.key
  cd - >/dev/null
  local who
  for who in admin kube-controller-manager kube-scheduler kubelet kube-proxy coredns; do
    kubeconfig_for "$who" > "$NODE_DIR/$who.kubeconfig"
  done
  mv "$NODE_DIR/admin.kubeconfig" "$NODE_KUBECONFIG"
}

# cert NAME SUBJECT USAGE [SANS]: NAME.key and NAME.crt signed by the CA.
cert() {
  local name=$1 subject=$2 usage=$3 sans=${4:-}
  openssl ecparam -name prime256v1 -genkey -noout -out "$name.key" 2>/dev/null
  {
    echo "basicConstraints=CA:FALSE"
    echo "keyUsage=critical,digitalSignature,keyEncipherment"
    echo "extendedKeyUsage=$usage"
    [ -n "$sans" ] && echo "subjectAltName=$sans"
  } > "$name.ext"
  openssl req -new -key "$name.key" -subj "$subject" 2>/dev/null |
    openssl x509 -req -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -extfile "$name.ext" \
      -out "$name.crt" 2>/dev/null
  rm -f "$name.ext"
}

kubeconfig_for() {
  cat <<YAML
apiVersion: v1
kind: Config
clusters:
- name: wsfleet-node
  cluster:
    server: https://$NODE_IP:$API_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $1
  user:
    client-certificate: $PKI/$1.crt
    client-key: $PKI/$1.key
contexts:
- name: wsfleet-node
  context: {cluster: wsfleet-node, user: $1}
current-context: wsfleet-node
YAML
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_configs() {
  mkdir -p "$NODE_DIR/cni" "$NODE_DIR/containerd" "$KUBELET_ROOT"
  # containerd: own root, state and socket; CRI with our sandbox image, runc with cgroupfs, and
  # oom_score_adj left alone (this machine lacks CAP_SYS_RESOURCE: runc cannot lower it).
  cat > "$NODE_DIR/containerd.toml" <<TOML
version = 2
root = "$NODE_DIR/containerd/root"
state = "$NODE_RUN/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$CONTAINERD_SOCK"
[ttrpc]
  address = "$NODE_RUN/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/wsfleet/pause:1"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni"
    max_conf_num = 1
TOML
  # Pods: the bridge, addresses from the node's range, a route to the Service range and nothing
  # else; no masquerade.
  cat > "$NODE_DIR/cni/10-wsfleet.conflist" <<JSON
{
  "cniVersion": "1.0.0",
  "name": "wsfleet",
  "plugins": [
    {
      "type": "bridge", "bridge": "$NODE_BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$NODE_DIR/cni-ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "10.242.0.10", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "$SERVICE_CIDR", "gw": "$NODE_IP"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
JSON
  # Pods' resolv.conf: the cluster DNS and nothing from the host, so no name leaves the node.
  : > "$NODE_DIR/resolv.conf"
  cat > "$NODE_DIR/kubelet.yaml" <<YAML
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /$NODE_CGROUP
containerRuntimeEndpoint: unix://$CONTAINERD_SOCK
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $(free_port)
tlsCertFile: $PKI/kubelet-serving.crt
tlsPrivateKeyFile: $PKI/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
clusterDNS: [$NODE_IP]
clusterDomain: cluster.local
resolvConf: $NODE_DIR/resolv.conf
podLogsDir: $NODE_DIR/pod-logs
failSwapOn: false
# The disk is shared with the build caches: evict only when it is really full, and never
# garbage-collect the images imported here (nothing can be pulled back).
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
allowedUnsafeSysctls: []
YAML
  cat > "$NODE_DIR/kube-proxy.yaml" <<YAML
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $NODE_DIR/kube-proxy.kubeconfig}
mode: iptables
hostnameOverride: $NODE_NAME
clusterCIDR: $CLUSTER_CIDR
nodePortAddresses: ["$NODE_IP/32"]
healthzBindAddress: 127.0.0.1:$(free_port)
metricsBindAddress: 127.0.0.1:$(free_port)
# Leave the host's conntrack settings as they are.
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
YAML
  # CoreDNS answers cluster.local from the API and nothing else: no forward plugin, so any
  # other name is refused rather than sent anywhere.
  cat > "$NODE_DIR/Corefile" <<COREFILE
cluster.local:53 {
    bind $NODE_IP
    errors
    kubernetes cluster.local {
        kubeconfig $NODE_DIR/coredns.kubeconfig wsfleet-node
        pods insecure
    }
    cache 5
    ready $NODE_IP:8181
}
COREFILE
  echo "ETCD_PORT=$(free_port) ETCD_PEER_PORT=$(free_port)" > "$NODE_DIR/ports.env"
}

start_control_plane() {
  local ETCD_PORT ETCD_PEER_PORT
  # shellcheck disable=SC1091
  . "$NODE_DIR/ports.env"
  start_component etcd etcd --name "$NODE_NAME" --data-dir "$NODE_DIR/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "$NODE_NAME=http://127.0.0.1:$ETCD_PEER_PORT" --listen-metrics-urls "" \
    --quota-backend-bytes 2147483648 --log-level warn
  wait_for 60 etcd curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  start_component kube-apiserver kube-apiserver \
    --advertise-address "$NODE_IP" --bind-address "$NODE_IP" --secure-port "$API_PORT" \
    --etcd-servers "http://127.0.0.1:$ETCD_PORT" --service-cluster-ip-range "$SERVICE_CIDR" \
    --client-ca-file "$PKI/ca.crt" --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-certificate-authority "$PKI/ca.crt" --kubelet-preferred-address-types InternalIP \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
    --allow-privileged=true --profiling=false
  wait_for 90 kube-apiserver api_ready
  step "etcd and kube-apiserver ready on https://$NODE_IP:$API_PORT"
  local common=(--authentication-kubeconfig "$NODE_DIR/COMPONENT.kubeconfig" --authorization-kubeconfig "$NODE_DIR/COMPONENT.kubeconfig"
                --kubeconfig "$NODE_DIR/COMPONENT.kubeconfig" --bind-address 127.0.0.1 --leader-elect=false)
  start_component kube-controller-manager kube-controller-manager \
    "${common[@]//COMPONENT/kube-controller-manager}" --secure-port "$(free_port)" \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=true --allocate-node-cidrs=true --cluster-cidr "$CLUSTER_CIDR" \
    --node-cidr-mask-size 24 --service-cluster-ip-range "$SERVICE_CIDR" --profiling=false
  start_component kube-scheduler kube-scheduler "${common[@]//COMPONENT/kube-scheduler}" \
    --secure-port "$(free_port)" --profiling=false
  # CoreDNS reads Services, EndpointSlices, Namespaces and Pods, nothing more.
  k apply -f - > /dev/null <<YAML
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: wsfleet-node:coredns}
rules:
- {apiGroups: [""], resources: [services, namespaces, pods], verbs: [list, watch]}
- {apiGroups: [discovery.k8s.io], resources: [endpointslices], verbs: [list, watch]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: wsfleet-node:coredns}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: wsfleet-node:coredns}
subjects:
- {apiGroup: rbac.authorization.k8s.io, kind: User, name: system:wsfleet-coredns}
YAML
}

start_node_components() {
  # Nothing is pulled: every registry request goes to a proxy address that refuses it at once,
  # so an image that was not imported fails with ErrImagePull and no packet leaves the machine.
  HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY= \
    start_component containerd containerd --config "$NODE_DIR/containerd.toml"
  wait_for 60 containerd ctr_k8s version
  import_images
  start_component kubelet kubelet --config "$NODE_DIR/kubelet.yaml" --kubeconfig "$NODE_DIR/kubelet.kubeconfig" \
    --root-dir "$KUBELET_ROOT" --hostname-override "$NODE_NAME" --node-ip "$NODE_IP" --v 1
  start_component kube-proxy kube-proxy --config "$NODE_DIR/kube-proxy.yaml"
  start_component coredns coredns -conf "$NODE_DIR/Corefile"
  wait_for 120 kubelet k wait --for=condition=Ready "node/$NODE_NAME" --timeout=5s
  wait_for 60 coredns curl -sf "http://$NODE_IP:8181/ready"
  # Every controller is at work once the default service account exists.
  wait_for 60 kube-controller-manager k -n default get serviceaccount default
  step "node $NODE_NAME Ready (kubelet, containerd, kube-proxy, CoreDNS)"
}

# Builds the images and imports them; sets operator_image_changed when the operator's is new.
import_images() {
  local dir
  dir=$("$repo_root/images/build.sh" | tail -1)
  [ "$("$node_here/import-images.sh" "$dir" | tail -1)" != operator-image-changed ] || operator_image_changed=1
  step "images built and imported"
}

if node_running; then
  log "reusing the running node ($NODE_DIR)"
  import_images
else
  start_node
fi

if [ -z "${NODE_SKIP_CHART:-}" ]; then
  helm=$("$node_here/../build-helm.sh" | tail -1)
  installed=$(k -n wsfleet-system get deployment wsfleet -o name 2>/dev/null || true)
  k create namespace wsfleet-system --dry-run=client -o yaml |
    k label --local -f - -o yaml pod-security.kubernetes.io/enforce=restricted | k apply -f - > /dev/null
  "$helm" --kubeconfig "$NODE_KUBECONFIG" upgrade --install wsfleet "$repo_root/charts/wsfleet" \
    -n wsfleet-system --wait --timeout 180s > "$NODE_LOGS/helm.log" 2>&1 ||
    { tail -20 "$NODE_LOGS/helm.log" >&2; k -n wsfleet-system get pods -o wide >&2; exit 1; }
  # A new operator image under the same tag: roll the pods so they run it.
  if [ -n "$operator_image_changed" ] && [ -n "$installed" ]; then
    k -n wsfleet-system rollout restart deployment/wsfleet > /dev/null
    k -n wsfleet-system rollout status deployment/wsfleet --timeout=180s > /dev/null
  fi
  step "chart installed: the operator runs in namespace wsfleet-system (restricted)"
fi

log "ready in $(( $(date +%s) - t_start ))s; kubeconfig $NODE_KUBECONFIG"
echo "$NODE_KUBECONFIG"
