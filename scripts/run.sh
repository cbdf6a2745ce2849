#!/usr/bin/env bash
# The main job: wsfleet end to end on this machine, in the foreground.
#
#  1. a real data plane: redis-server and 3 wsfleet-server processes on loopback that clients
#     can connect to (scripts/run-fleet.sh);
#  2. the local Kubernetes control plane (tests/cluster; the first run builds it, ~10 minutes);
#  3. the CRD and the operator, then a WebSocketCluster "chat" whose external Redis is the one
#     from step 1, so its status counts the real servers' connections;
#  4. `kubectl get wsc` and `kubectl describe wsc`, then it waits. Ctrl-C stops everything.
#
# The control plane runs no containers (kwok fakes the pods): the operator's Deployments and
# DaemonSets are real API objects, the WebSocket servers are the local processes of step 1.
set -euo pipefail
cd "$(dirname "$0")/.."

NAMESPACE=${NAMESPACE:-wsfleet-demo}
REDIS_PORT=${REDIS_PORT:-6390}
WS_PORT=${WS_PORT:-8081}
HTTP_PORT=${HTTP_PORT:-9091}
OPERATOR_HTTP=${OPERATOR_HTTP:-127.0.0.1:8090}
RUN_DIR=.run/main
mkdir -p "$RUN_DIR"

cargo build --release -p wsfleet-server -p wsfleet-operator --bins --example wscat

pids=()
cluster_started=
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping: operator, fleet, control plane"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  [ -n "$cluster_started" ] && tests/cluster/down.sh || true
  exit 0
}
trap stop INT TERM HUP EXIT

REDIS_PREFIX="$NAMESPACE.chat" REDIS_PORT=$REDIS_PORT WS_PORT=$WS_PORT HTTP_PORT=$HTTP_PORT SKIP_BUILD=1 QUIET=1 scripts/run-fleet.sh &
pids+=($!)
for _ in $(seq 100); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$((HTTP_PORT + 2))/readyz")" = 200 ] && break
  sleep 0.1
done

# In a session of its own, so that Ctrl-C reaches this script (which stops the control plane in
# order) and not the control-plane processes directly.
if ! setsid tests/cluster/up.sh >"$RUN_DIR/cluster-up.log" 2>&1 </dev/null; then
  echo "the control plane did not start; see $RUN_DIR/cluster-up.log" >&2
  exit 1
fi
cluster_started=1
eval "$(tests/cluster/env.sh)"

kubectl apply -f crds/websocketcluster.yaml >/dev/null
kubectl wait --for condition=established crd/websocketclusters.wsfleet.dev --timeout=60s >/dev/null
kubectl create namespace "$NAMESPACE" --dry-run=client -o yaml | kubectl apply -f - >/dev/null

./target/release/wsfleet-operator --http-listen "$OPERATOR_HTTP" --lease-namespace "$NAMESPACE" \
  --resync-seconds 5 2>"$RUN_DIR/operator.log" &
pids+=($!)

kubectl -n "$NAMESPACE" apply -f - <<YAML
apiVersion: wsfleet.dev/v1alpha1
kind: WebSocketCluster
metadata:
  name: chat
spec:
  replicas: 3
  redis:
    external:
      url: redis://127.0.0.1:$REDIS_PORT
  nodeTuning:
    enabled: true
    sysctls:
      net.core.somaxconn: "65535"
YAML
kubectl -n "$NAMESPACE" wait --for condition=Ready wsc/chat --timeout=120s >/dev/null
# The servers heartbeat every 5 s and the operator looks every 5 s.
for _ in $(seq 40); do
  [ -n "$(kubectl -n "$NAMESPACE" get wsc chat -o jsonpath='{.status.connections}')" ] && break
  sleep 0.5
done

cat <<TXT

=== kubectl get wsc (KUBECONFIG=$KUBECONFIG) ===
TXT
kubectl -n "$NAMESPACE" get wsc
echo
echo "=== kubectl describe wsc chat ==="
kubectl -n "$NAMESPACE" describe wsc chat
cat <<TXT

Everything is running. In another terminal:
  eval "\$(make -s cluster-env)"
  kubectl -n $NAMESPACE get wsc -w                     # the Connections column follows the clients
  kubectl -n $NAMESPACE scale wsc/chat --replicas=5
  ./target/release/examples/wscat ws://127.0.0.1:$WS_PORT/ws/lobby
  ./target/release/examples/wscat ws://127.0.0.1:$((WS_PORT + 2))/ws/lobby
Operator metrics: http://$OPERATOR_HTTP/metrics  logs: $RUN_DIR/  Ctrl-C stops everything.
TXT
wait -n "${pids[@]}" || true
echo "a process exited; see $RUN_DIR/ and .run/fleet/" >&2
