# Settings and helpers of the node profile, shared by up.sh, down.sh, env.sh and state.sh.
# Sourced, not run.
#
# The node profile is one real Kubernetes node on this machine: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy, containerd (+ runc, CNI) and
# CoreDNS, each a plain process. Its addresses exist only on this machine:
#
#   node IP (bridge wsfleet0)  10.242.0.1     API server :6443, kubelet :10250, DNS :53
#   pods                       10.242.0.0/24  on the bridge, in network namespaces the node makes
#   Services                   10.243.0.0/24  virtual (kube-proxy), routed to the bridge
#
# Pods get a route to the Service range and their own subnet and nothing else (no default route,
# no masquerade), the host forwards nothing between the bridge and any other interface, and DNS
# answers cluster.local only. One node cluster runs per machine (the bridge and ranges are
# fixed); etcd and the components' private ports are on 127.0.0.1.
#
#   WSFLEET_NODE_DIR   certificates, etcd data, images, kubelet root, logs (default: .run/node in
#                      the repository, git-ignored)
#   WSFLEET_CACHE      binary cache (see ../versions.sh)
node_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$node_here/../../.." && pwd)
# shellcheck source=../versions.sh
. "$node_here/../versions.sh"
# shellcheck source=../lib.sh
. "$node_here/../lib.sh"

NODE_DIR=${WSFLEET_NODE_DIR:-$repo_root/.run/node}
# Sockets, containerd's state and the pid files: short paths (unix sockets allow 107 bytes), and
# machine-wide, so that any clone finds and stops a node another clone left running.
NODE_RUN=/run/wsfleet-node
# The kubelet's root (pod volumes, its own sockets): a short path too, whatever the clone's.
KUBELET_ROOT=/var/lib/wsfleet-node/kubelet
NODE_NAME=wsfleet-node
NODE_BRIDGE=wsfleet0
NODE_IP=10.242.0.1
POD_CIDR=10.242.0.0/24
CLUSTER_CIDR=10.242.0.0/16
SERVICE_CIDR=10.243.0.0/24
API_SERVICE_IP=10.243.0.1
API_PORT=6443
NODE_KUBECONFIG=$NODE_DIR/kubeconfig
PKI=$NODE_DIR/pki
CONTAINERD_SOCK=$NODE_RUN/containerd.sock
NODE_LOGS=$NODE_DIR/logs
# wait_for (lib.sh) shows the tail of a component's log when waiting for it times out.
LOG_DIR=$NODE_LOGS
# Host paths the node's components may create outside their own directories: state.sh reports
# them, down.sh removes those the record says were not there before.
NODE_HOST_PATHS=(/var/lib/cni /var/log/containers /var/log/pods /run/netns /etc/cni /opt/cni
  /var/lib/kubelet /var/lib/containerd /run/containerd /etc/kubernetes)
# cgroup v1 parent of every pod (kubelet's cgroupRoot), made in each mounted hierarchy.
NODE_CGROUP=wsfleet-node
# The component processes, in start order; down.sh stops them in reverse.
NODE_COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy coredns)
# Host settings the node changes (kubelet's kernel defaults, forwarding, bridge netfilter) or the
# tuning DaemonSet may change (its allow-list): recorded at up, restored at down.
NODE_SYSCTLS=(
  net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
  net.ipv4.conf.all.route_localnet
  vm.overcommit_memory vm.panic_on_oom kernel.panic kernel.panic_on_oops
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes
  fs.file-max fs.nr_open net.core.netdev_max_backlog net.core.rmem_max net.core.somaxconn
  net.core.wmem_max net.ipv4.ip_local_port_range net.ipv4.tcp_fin_timeout
  net.ipv4.tcp_keepalive_time net.ipv4.tcp_max_syn_backlog net.ipv4.tcp_max_tw_buckets
  net.ipv4.tcp_mem net.ipv4.tcp_rmem net.ipv4.tcp_tw_reuse net.ipv4.tcp_wmem
  net.netfilter.nf_conntrack_max
)

export PATH=$CLUSTER_BIN:$NODE_BIN:$PATH

log() { echo "[node] $*" >&2; }

k() { kubectl --kubeconfig "$NODE_KUBECONFIG" --request-timeout=20s "$@"; }

# True when process $1 is one of the node's programs and its command line names this node (its
# configuration or state paths): a pid file left from before a reboot, or a user's
# `kubectl --kubeconfig .run/node/kubeconfig`, never makes us signal it.
ours() {
  [ -r "/proc/$1/cmdline" ] || return 1
  case $(basename "$(readlink "/proc/$1/exe" 2>/dev/null)") in
    etcd|kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|kube-proxy|coredns|containerd|containerd-shim*) ;;
    *) return 1 ;;
  esac
  tr '\0' ' ' < "/proc/$1/cmdline" | grep -qF -e "$NODE_DIR/" -e "$NODE_RUN/"
}

# Prints "name pid" for every component of the node whose process is alive.
node_pids() {
  local name pid
  for name in "${NODE_COMPONENTS[@]}"; do
    pid=$(cat "$NODE_RUN/pids/$name.pid" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && ours "$pid" && echo "$name $pid"
  done
  return 0
}

# Every live process whose command line names the node's directories: components, containerd's
# shims, and anything they left.
node_leftovers() {
  local p
  for p in /proc/[0-9]*; do
    [ -r "$p/cmdline" ] || continue
    [ "$(awk '{print $3}' "$p/stat" 2>/dev/null)" = Z ] && continue
    ours "${p#/proc/}" && echo "${p#/proc/}"
  done
  return 0
}

# Starts component $1 as its own session (Ctrl-C in a terminal never reaches it), logging to
# logs/$1.log and recording its pid.
start_component() {
  local name=$1
  shift
  mkdir -p "$NODE_LOGS" "$NODE_RUN/pids"
  setsid "$@" >> "$NODE_LOGS/$name.log" 2>&1 < /dev/null 9>&- &
  echo $! > "$NODE_RUN/pids/$name.pid"
  log "started $name (pid $!)"
}

api_ready() {
  [ -f "$NODE_KUBECONFIG" ] && [ "$(k --request-timeout=5s get --raw /readyz 2>/dev/null)" = ok ]
}

# True when every component is alive and the API server is ready.
node_running() {
  [ "$(node_pids | wc -l)" -eq "${#NODE_COMPONENTS[@]}" ] && api_ready
}

ctr_k8s() { ctr --address "$CONTAINERD_SOCK" --namespace k8s.io "$@"; }
