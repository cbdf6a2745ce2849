#!/usr/bin/env bash
# Stops the node profile and removes everything it made, then checks that the machine is as
# up.sh found it (tests/cluster/node/state.sh before and after) and fails, printing the
# difference, when it is not. Safe to run when nothing is running.
#
#  1. pods: the controllers stopped, then every pod deleted through the API while kubelet runs,
#     so containerd stops them and CNI releases their network (bounded: 60 s);
#  2. the components, by pid, in reverse start order (SIGTERM, SIGKILL after 20 s), then any
#     container or shim that is left;
#  3. mounts under the node's directories, the pods' network namespaces, the bridge and every
#     interface on it, netfilter chains of kube-proxy, kubelet, CNI and the node, and the
#     tables they created;
#  4. cgroups, the host settings recorded at up, the paths the components wrote, the state.
#
# The logs stay in NODE_DIR/logs.
set -euo pipefail
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

[ "$(id -u)" = 0 ] || { log "the node profile needs root"; exit 1; }
if [ -f "$NODE_RUN/dir" ] && [ "$(cat "$NODE_RUN/dir")" != "$NODE_DIR" ]; then
  log "the node on this machine belongs to $(cat "$NODE_RUN/dir"); stopping that one"
  NODE_DIR=$(cat "$NODE_RUN/dir")
  # shellcheck source=common.sh
  WSFLEET_NODE_DIR=$NODE_DIR . "$node_here/common.sh"
fi
mkdir -p "$NODE_RUN"
exec 9> "$NODE_RUN/.lock"
flock -w 600 9 || { log "another up.sh/down.sh holds $NODE_RUN/.lock"; exit 1; }
t0=$(date +%s)

running=$(node_pids)
# 1. Pods first, through the API, while kubelet and containerd can still tear them down cleanly.
if grep -q '^kubelet ' <<< "$running" && api_ready; then
  # The controllers go first, so nothing makes a pod again (a ReplicaSet, a DaemonSet, or the
  # operator putting back the Deployment it owns) while the pods are deleted.
  for name in kube-controller-manager kube-scheduler; do
    pid=$(awk -v n="$name" '$1 == n {print $2}' <<< "$running")
    [ -z "$pid" ] || { log "stopping $name (pid $pid)"; stop_pid "$name" "$pid"; }
  done
  log "deleting every pod"
  k delete pods --all -A --grace-period=0 --force --wait=false > /dev/null 2>&1 || true
  # Done when no container process runs any more (kubelet has stopped every sandbox, which
  # releases its network); the stopped containers themselves are deleted below.
  t=$(date +%s)
  while ctr_k8s tasks ls 2>/dev/null | awk 'NR > 1 && $3 == "RUNNING"' | grep -q . && (( $(date +%s) - t < 60 )); do
    sleep 1
  done
fi

# 2. The components, clients before servers.
for (( i = ${#NODE_COMPONENTS[@]} - 1; i >= 0; i-- )); do
  name=${NODE_COMPONENTS[i]}
  pid=$(awk -v n="$name" '$1 == n {print $2}' <<< "$running")
  # Checked again: the pid was read up to a minute ago.
  [ -n "$pid" ] && alive "$pid" && ours "$pid" || continue
  if [ "$name" = containerd ]; then
    # Whatever kubelet did not remove: kill the tasks, delete the containers.
    for id in $(ctr_k8s tasks ls -q 2>/dev/null); do ctr_k8s tasks kill -s KILL "$id" > /dev/null 2>&1 || true; done
    sleep 0.5
    for id in $(ctr_k8s containers ls -q 2>/dev/null); do
      ctr_k8s tasks delete -f "$id" > /dev/null 2>&1 || true
      ctr_k8s containers delete "$id" > /dev/null 2>&1 || true
    done
  fi
  log "stopping $name (pid $pid)"
  stop_pid "$name" "$pid"
done
if command -v kube-proxy >/dev/null; then
  kube-proxy --cleanup > "$NODE_RUN/kube-proxy-cleanup.log" 2>&1 || true
fi
# Shims and containers whose command line names the node (a shim outlives containerd).
for pid in $(node_leftovers); do
  log "stopping leftover process $pid: $(tr '\0' ' ' < "/proc/$pid/cmdline" | cut -c1-80)"
  stop_pid leftover "$pid"
done
# A container process of a killed shim: its cgroup says whose it is.
for d in /sys/fs/cgroup/*/"$NODE_CGROUP"; do
  [ -d "$d" ] || continue
  for pid in $(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null); do
    kill -KILL "$pid" 2>/dev/null || true
  done
done

# 3. Mounts (deepest first), network namespaces, interfaces, netfilter.
before=$NODE_DIR/machine-before.txt
# Only what the record says was not there before is removed by pattern; without a record (a
# second node-down), nothing of that kind is touched.
is_new() { [ -f "$before" ] && ! grep -qxF "$1" "$before"; }
for m in $(awk -v a="$NODE_DIR/" -v b="$NODE_RUN/" -v c="${KUBELET_ROOT%/*}/" \
             'index($2, a) == 1 || index($2, b) == 1 || index($2, c) == 1 {print $2}' /proc/self/mounts | sort -r); do
  umount -l "$m" 2>/dev/null || true
done
for m in $(awk '$2 ~ "^(/var)?/run/netns/cni-" {print $2}' /proc/self/mounts); do
  is_new "netns ${m##*/}" && umount -l "$m" 2>/dev/null || true
done
for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
  if is_new "netns $ns" && [[ $ns == cni-* ]]; then ip netns delete "$ns" 2>/dev/null || true; fi
done
if ip link show "$NODE_BRIDGE" > /dev/null 2>&1; then
  for ifc in $(ip -o link show master "$NODE_BRIDGE" | awk '{sub(/@.*/, "", $2); print $2}'); do
    ip link delete "$ifc" 2>/dev/null || true
  done
  ip link delete "$NODE_BRIDGE"
fi
# Rules in built-in chains that jump to the node's chains, then the chains themselves.
clean_netfilter() {
  local cmd=$1 table chain rule
  for table in filter nat mangle raw; do
    $cmd -t "$table" -S > /dev/null 2>&1 || continue
    while read -r rule; do
      # shellcheck disable=SC2086
      eval "$cmd -t $table ${rule/-A/-D}" 2>/dev/null || true
    done < <($cmd -t "$table" -S | grep -E '^-A (INPUT|OUTPUT|FORWARD|PREROUTING|POSTROUTING) .*-j (KUBE-|CNI-|WSFLEET-)')
    for chain in $($cmd -t "$table" -S | awk '$1 == "-N" && $2 ~ /^(KUBE-|CNI-|WSFLEET-)/ {print $2}'); do
      $cmd -t "$table" -F "$chain" 2>/dev/null || true
    done
    for chain in $($cmd -t "$table" -S | awk '$1 == "-N" && $2 ~ /^(KUBE-|CNI-|WSFLEET-)/ {print $2}'); do
      $cmd -t "$table" -X "$chain" 2>/dev/null || true
    done
  done
}
clean_netfilter iptables
clean_netfilter ip6tables
nft delete table inet wsfleet-node 2>/dev/null || true
# Tables that did not exist before and are now empty (iptables creates a table on first use),
# and kube-proxy's own nftables tables.
for t in $(nft list tables 2>/dev/null | awk '{print $2 "/" $3}'); do
  family=${t%/*} name=${t#*/}
  if [[ $name == kube-proxy ]] ||
     { is_new "nft table $family $name {" && [ -z "$(nft list table "$family" "$name" | grep -vE '^\s*(table|chain|type|policy|\}|$)')" ]; }; then
    nft delete table "$family" "$name" 2>/dev/null || true
  fi
done

# 4. cgroups (children first), host settings, paths, state.
for d in /sys/fs/cgroup/*/"$NODE_CGROUP"; do
  [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
done
if [ -f "$NODE_DIR/sysctls-before.txt" ]; then
  while IFS=$'\t' read -r key value; do
    f=/proc/sys/${key//.//}
    [ "$(cat "$f" 2>/dev/null)" = "$value" ] || echo "$value" > "$f" 2>/dev/null || log "could not restore $key"
  done < "$NODE_DIR/sysctls-before.txt"
fi
# kubelet links every container's log into /var/log/containers.
if [ -d /var/log/containers ]; then
  find /var/log/containers -maxdepth 1 -type l -lname "$NODE_DIR/*" -delete 2>/dev/null || true
fi
rm -rf "${KUBELET_ROOT%/*}"
for p in "${NODE_HOST_PATHS[@]}"; do
  if [ -e "$p" ] && [ -f "$before" ] && ! grep -q "^path $p " "$before"; then
    rm -rf "$p"
  fi
done
find "$NODE_DIR" -mindepth 1 -maxdepth 1 ! -name logs ! -name machine-before.txt -exec rm -rf {} + 2>/dev/null || true
rm -rf "$NODE_RUN"

left=$(node_leftovers | tr '\n' ' ')
[ -z "$left" ] || { log "still running after stop: pids $left"; exit 1; }
if [ -f "$before" ]; then
  if ! diff <(grep -v '^path /run/wsfleet-node ' "$before") <("$node_here/state.sh") > "$NODE_LOGS/machine-diff.txt"; then
    log "the machine is not as the node found it (< before, > now):"
    cat "$NODE_LOGS/machine-diff.txt" >&2
    exit 1
  fi
  log "stopped in $(( $(date +%s) - t0 ))s; the machine is as the node found it ($(wc -l < "$before") facts compared)"
  rm -f "$before"
else
  log "stopped in $(( $(date +%s) - t0 ))s (no record of the machine before; nothing compared)"
fi
