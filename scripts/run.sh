#!/usr/bin/env bash
# The main job: wsfleet end to end on this machine, on a real Kubernetes node, in the foreground.
#
#  1. the node profile (tests/cluster/node): etcd, kube-apiserver, controller-manager, scheduler,
#     kubelet + containerd, kube-proxy and CoreDNS as processes of this machine; the first run
#     builds them from Go modules (15-20 minutes), later starts take under a minute;
#  2. the images (server, operator, Redis, pause) built here and imported into containerd, and
#     the Helm chart installed: the operator runs as a pod;
#  3. the sample WebSocketCluster (operator/examples/chat.yaml) in namespace wsfleet-demo: three
#     server pods, a managed Redis pod and the node-tuning DaemonSet, all real containers;
#  4. how to connect from this machine (wscat, and the JavaScript client's chat demo page served
#     on 127.0.0.1:DEMO_PORT (8090) against the fleet's Service; DEMO=0 leaves it out),
#     `kubectl get wsc` and `kubectl describe wsc`; then it waits. Ctrl-C takes the node down and
#     leaves the machine as it was found.
set -euo pipefail
cd "$(dirname "$0")/.."

NAMESPACE=${NAMESPACE:-wsfleet-demo}
RUN_DIR=.run/main
DEMO=${DEMO:-1}
DEMO_PORT=${DEMO_PORT:-8090}
demo_pid=
mkdir -p "$RUN_DIR"
say() { echo "[run] $*"; }
# shellcheck source=scripts/demo.sh
. scripts/demo.sh

say "building the release binaries and the wscat example"
cargo build --release -q -p wsfleet-server -p wsfleet-operator --bins --example wscat

stopping=
stop() {
  trap - INT TERM EXIT
  [ -n "$stopping" ] && exit 0
  stopping=1
  [ -z "$demo_pid" ] || kill "$demo_pid" 2>/dev/null || true
  echo
  say "taking the node down (every process, container, interface and rule it made)"
  tests/cluster/node/down.sh || exit 1
  exit 0
}
trap stop INT TERM HUP EXIT

say "starting the node (progress below; full logs in .run/node/logs/)"
SKIP_CARGO=1 tests/cluster/node/up.sh > "$RUN_DIR/kubeconfig-path"
eval "$(tests/cluster/node/env.sh)"

kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - > /dev/null
say "applying operator/examples/chat.yaml in namespace $NAMESPACE"
start=$(date +%s)
kubectl -n "$NAMESPACE" apply -f operator/examples/chat.yaml
kubectl -n "$NAMESPACE" wait --for condition=Ready wsc/chat --timeout=300s > /dev/null
say "Ready in $(( $(date +%s) - start ))s"
ip=$(kubectl -n "$NAMESPACE" get service chat -o jsonpath='{.spec.clusterIP}')
port=$(kubectl -n "$NAMESPACE" get service chat -o jsonpath='{.spec.ports[0].port}')

demo=""
if [ "$DEMO" = 1 ]; then
  start_demo "ws://$ip:$port"
  demo=$DEMO_URL demo_pid=$DEMO_PID
fi

echo
echo "=== kubectl -n $NAMESPACE get pods -o wide ==="
kubectl -n "$NAMESPACE" get pods -o wide
echo
echo "=== kubectl -n $NAMESPACE get wsc ==="
kubectl -n "$NAMESPACE" get wsc
echo
echo "=== kubectl -n $NAMESPACE describe wsc chat ==="
kubectl -n "$NAMESPACE" describe wsc chat
cat <<TXT

Everything is running. The Service's address ($ip) is reachable from this machine (kube-proxy
routes it to the server pods on the node's bridge). In other terminals:

  ./target/release/examples/wscat ws://$ip:$port/ws/lobby     # type a line: the other one sees it
  ./target/release/examples/wscat ws://$ip:$port/ws/lobby
${demo:+
  $demo    # the chat demo (the JavaScript client): open it in two browser tabs
}
  eval "\$(make -s node-env)"                                   # KUBECONFIG and PATH for kubectl
  kubectl -n $NAMESPACE get wsc -w                               # Connections follows the clients
  kubectl -n $NAMESPACE scale wsc/chat --replicas=5
  kubectl -n wsfleet-system logs deploy/wsfleet                  # the operator's log

Ctrl-C stops everything.
TXT
# In the background and waited for, so a signal runs the trap at once.
while true; do sleep 3600 & wait $!; done
