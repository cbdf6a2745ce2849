# Settings and helpers shared by up.sh, down.sh and env.sh. Sourced, not run.
#
#   WSFLEET_CLUSTER_DIR    run directory: kubeconfig, kwokctl state, logs (default: .run/cluster
#                          in the repository, which git ignores; each clone has its own cluster)
#   WSFLEET_CLUSTER_NAME   cluster name (default: wsfleet)
#   WSFLEET_CLUSTER_NODES  fake Ready nodes (default: 3)
#   WSFLEET_CACHE          binary cache (see versions.sh)
cluster_here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo_root=$(cd "$cluster_here/../.." && pwd)
# shellcheck source=versions.sh
. "$cluster_here/versions.sh"
# shellcheck source=lib.sh
. "$cluster_here/lib.sh"

CLUSTER_DIR=${WSFLEET_CLUSTER_DIR:-$repo_root/.run/cluster}
CLUSTER_NAME=${WSFLEET_CLUSTER_NAME:-wsfleet}
CLUSTER_NODES=${WSFLEET_CLUSTER_NODES:-3}
CLUSTER_KUBECONFIG=$CLUSTER_DIR/kubeconfig
export KWOK_WORKDIR=$CLUSTER_DIR/kwok
# Our kubectl (same version as the API server) and kwokctl come first; kwokctl also looks up
# kubectl in PATH.
export PATH=$CLUSTER_BIN:$PATH
# kwokctl keeps one directory per cluster; its pids/ holds one file per component process.
CLUSTER_STATE=$KWOK_WORKDIR/clusters/$CLUSTER_NAME

log() { echo "[cluster] $*" >&2; }

# Prints "name pid" for every component process of this cluster that is alive. A pid counts only
# if the process's command line names this cluster's state directory, so a pid reused by an
# unrelated process after a reboot is never reported (and never signalled by down.sh).
cluster_pids() {
  local f pid
  [ -d "$CLUSTER_STATE/pids" ] || return 0
  for f in "$CLUSTER_STATE"/pids/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f" 2>/dev/null || true)
    [[ $pid =~ ^[0-9]+$ ]] || continue
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF "$CLUSTER_STATE"; then
      echo "$(basename "$f" .pid) $pid"
    fi
  done
}

# Every process on the machine whose command line names this cluster's state directory: the
# final check that nothing of the cluster is left running.
cluster_leftovers() {
  local p
  for p in /proc/[0-9]*; do
    [ -r "$p/cmdline" ] || continue
    if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -qF "$CLUSTER_STATE/"; then
      # A zombie has already exited; only its parent's bookkeeping remains.
      [ "$(awk '{print $3}' "$p/stat" 2>/dev/null)" = Z ] && continue
      echo "${p#/proc/}"
    fi
  done
}

# True when the API server answers /readyz with this cluster's kubeconfig.
cluster_ready() {
  [ -f "$CLUSTER_KUBECONFIG" ] &&
    [ "$(kubectl --kubeconfig "$CLUSTER_KUBECONFIG" --request-timeout=5s get --raw /readyz 2>/dev/null)" = ok ]
}

# True when every component process is alive and the API server is ready.
cluster_running() {
  local want=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok-controller)
  [ "$(cluster_pids | awk '{print $1}' | sort | tr '\n' ' ')" = "$(printf '%s\n' "${want[@]}" | sort | tr '\n' ' ')" ] &&
    cluster_ready
}

# Stops every component process of this cluster by its pid, clients before servers (kwok,
# scheduler, controller-manager, then the API server, then etcd): SIGTERM, and SIGKILL after 20s.
# Then removes the cluster's state and fails if any process of it remains.
cluster_stop() {
  local running name pid t0 stopped=()
  running=$(cluster_pids)
  local order=(kwok-controller kube-scheduler kube-controller-manager kube-apiserver etcd) names=()
  # Any other component kwokctl may have started goes first.
  for name in $(awk '{print $1}' <<< "$running"); do
    [[ " ${order[*]} " == *" $name "* ]] || names+=("$name")
  done
  for name in "${names[@]}" "${order[@]}"; do
    pid=$(awk -v n="$name" '$1 == n {print $2}' <<< "$running")
    [ -n "$pid" ] || continue
    log "stopping $name (pid $pid)"
    stopped+=("$pid")
    stop_pid "$name" "$pid"
  done
  rm -f "$CLUSTER_STATE"/pids/*.pid
  # With no pid files left, kwokctl only removes the state directory and our kubeconfig entry.
  if [ -d "$CLUSTER_STATE" ] && command -v kwokctl >/dev/null; then
    kwokctl --name "$CLUSTER_NAME" delete cluster --kubeconfig "$CLUSTER_KUBECONFIG" \
      >> "$CLUSTER_DIR/kwokctl.log" 2>&1 9>&- || true
  fi
  rm -rf "$CLUSTER_STATE" "$CLUSTER_KUBECONFIG"
  # An exited process lingers as a zombie until its parent (init: kwokctl detached it) reaps it.
  t0=$(date +%s)
  for pid in "${stopped[@]}"; do
    while [ -e "/proc/$pid" ] && (( $(date +%s) - t0 < 10 )); do sleep 0.2; done
  done
  local left
  left=$(cluster_leftovers | tr '\n' ' ')
  if [ -n "$left" ]; then
    log "still running after stop: pids $left"
    return 1
  fi
}
