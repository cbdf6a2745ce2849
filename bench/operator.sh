#!/usr/bin/env bash
# The operator at scale, on the kwok profile of the local control plane (tests/cluster): one
# operator process (release build, leader election off, every namespace) and CLUSTERS
# WebSocketCluster objects created at once, spread over NAMESPACES namespaces. Measures the
# time until all are Ready, the operator's peak RSS and CPU, the API server's requests per
# second during the ramp and during a quiet resync, the writes on a no-op resync, and after a
# delete of all of them the time until every child is gone. Prints a table and writes
# bench/results/operator.json. See bench/README.md.
#
#   bench/operator.sh                 # 1,000 clusters
#   CLUSTERS=100 bench/operator.sh    # a smaller run
#
# Settings (environment): CLUSTERS (1000), NAMESPACES (10), REPLICAS server pods per cluster
# (1), REDIS external|managed (external), RESYNC_SECONDS the operator's --resync-seconds (10),
# READY_TIMEOUT and GONE_TIMEOUT in seconds (600 each), BASELINE_SECONDS (10).
#
# It starts the control plane if it is not running and stops it again afterwards
# (tests/cluster/with-cluster.sh); WSFLEET_CLUSTER_DIR and WSFLEET_CLUSTER_NAME choose which.
# Every process it starts is stopped by its pid; every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTERS=${CLUSTERS:-1000}
NAMESPACES=${NAMESPACES:-10}
REPLICAS=${REPLICAS:-1}
REDIS=${REDIS:-external}
RESYNC_SECONDS=${RESYNC_SECONDS:-10}
READY_TIMEOUT=${READY_TIMEOUT:-600}
GONE_TIMEOUT=${GONE_TIMEOUT:-600}
BASELINE_SECONDS=${BASELINE_SECONDS:-10}
# Settle after all are Ready (deployment status updates still arrive), then the quiet window:
# at least two resync periods with nothing changing.
SETTLE_SECONDS=$((RESYNC_SECONDS + 5))
QUIET_SECONDS=$((2 * RESYNC_SECONDS + 5))

log() { echo "[bench-operator] $*" >&2; }
die() { log "$*"; exit 1; }
[[ $CLUSTERS =~ ^[1-9][0-9]*$ && $NAMESPACES =~ ^[1-9][0-9]*$ && $REPLICAS =~ ^[0-9]+$ ]] ||
  die "CLUSTERS and NAMESPACES must be positive integers, REPLICAS a non-negative one"
[[ $REDIS == external || $REDIS == managed ]] || die "REDIS must be external or managed"

# Run against the local control plane: with-cluster.sh starts it unless it is running, exports
# KUBECONFIG and puts our kubectl first on PATH, and stops the cluster afterwards if it started it.
if [ -z "${WSFLEET_BENCH_IN_CLUSTER:-}" ]; then
  cargo build --release -q -p wsfleet-operator
  # Room for every server pod: a fake node takes 110 pods (kubelet's default), and a pod left
  # Pending would keep its cluster from Ready for a reason that is not the operator's.
  export WSFLEET_CLUSTER_NODES=$(( (CLUSTERS * REPLICAS + 99) / 100 + 1 ))
  log "control plane with $WSFLEET_CLUSTER_NODES fake nodes"
  WSFLEET_BENCH_IN_CLUSTER=1 exec tests/cluster/with-cluster.sh "$PWD/bench/operator.sh" "$@"
fi

# shellcheck source=bench/lib.sh
. bench/lib.sh
mkdir -p bench/results

k() { kubectl --request-timeout=60s "$@"; }
server=$(k config view --minify -o jsonpath='{.clusters[0].cluster.server}')
[[ $server =~ ^https://(127\.0\.0\.1|localhost): ]] || die "refusing to run against $server: not a loopback cluster"

LABEL=wsfleet.dev/bench=operator
NS_PREFIX=wsfleet-bench-
HZ=$(getconf CLK_TCK)
ms() { echo $(($(date +%s%N) / 1000000)); }
secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", (b - a) / 1000}'; }
cpu_seconds() { awk -v hz="$HZ" '{sub(/^.*\) /, ""); printf "%.2f", ($12 + $13) / hz}' "/proc/$1/stat"; }
mib() { awk -v k="$2" '$1 == k":" {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
scrape() { k get --raw /metrics | grep '^apiserver_request_total' > "$BENCH_DIR/$1.prom"; }
requests() { python3 bench/apiserver_requests.py "$BENCH_DIR/$1.prom" "$BENCH_DIR/$2.prom" "$3"; }
# A counter of the operator's /metrics as an integer (empty when it cannot be read).
op_metric() { curl -s --max-time 5 "http://$OP_HTTP/metrics" | awk -v m="$1" '$1 == m {printf "%d\n", $2; exit}' || true; }

# Counts the bench's objects of the given kinds: one LIST per kind, namespaces filtered here.
# -1 when the LIST fails, so a failed LIST never reads as "all gone".
count_in_bench() {
  local out
  out=$(k get "$@" -A -o jsonpath='{range .items[*]}{.metadata.namespace}{"\n"}{end}') || { echo -1; return; }
  grep -c "^$NS_PREFIX" <<< "$out" || true
}

remove_namespaces() {
  k delete ns -l "$LABEL" --wait=false >/dev/null 2>&1 || true
}
on_exit() {
  local rc=$?
  bench_stop_all
  remove_namespaces
  exit "$rc"
}
trap on_exit EXIT

# A previous run's namespaces (on a cluster that stayed up) go first.
if [ "$(k get ns -l "$LABEL" -o name | wc -l)" -gt 0 ]; then
  log "removing the namespaces of a previous run"
  k delete ns -l "$LABEL" --timeout="${GONE_TIMEOUT}s" >/dev/null
fi

k apply -f crds/websocketcluster.yaml >/dev/null
k wait --for=condition=Established crd/websocketclusters.wsfleet.dev --timeout=60s >/dev/null
namespaces=()
for i in $(seq 0 $((NAMESPACES - 1))); do namespaces+=("$NS_PREFIX$i"); done
for ns in "${namespaces[@]}"; do
  printf 'apiVersion: v1\nkind: Namespace\nmetadata:\n  name: %s\n  labels: {%s: %s}\n---\n' "$ns" "${LABEL%=*}" "${LABEL#*=}"
done | k apply -f - >/dev/null
# Pods are refused until the namespace's default service account exists.
for ns in "${namespaces[@]}"; do
  for _ in $(seq 120); do k -n "$ns" get serviceaccount default >/dev/null 2>&1 && break; sleep 0.5; done
done

if [ "$REDIS" = external ]; then
  bench_start_redis
  redis_spec="{external: {url: \"$REDIS_URL\"}}"
else
  redis_spec="{managed: {}}"
fi

# One manifest per namespace; cluster j goes to namespace j mod NAMESPACES.
for i in "${!namespaces[@]}"; do : > "$BENCH_DIR/wsc-$i.yaml"; done
for j in $(seq 0 $((CLUSTERS - 1))); do
  i=$((j % NAMESPACES))
  printf -- '---\napiVersion: wsfleet.dev/v1alpha1\nkind: WebSocketCluster\nmetadata:\n  name: bench-%05d\n  namespace: %s\n  labels: {%s: %s}\nspec:\n  replicas: %d\n  redis: %s\n' \
    "$j" "${namespaces[$i]}" "${LABEL%=*}" "${LABEL#*=}" "$REPLICAS" "$redis_spec" >> "$BENCH_DIR/wsc-$i.yaml"
done

# The operator: release build, leader election off, every namespace.
./target/release/wsfleet-operator --no-leader-election --http-listen 127.0.0.1:0 \
  --resync-seconds "$RESYNC_SECONDS" 2> "$BENCH_DIR/operator.log" &
OP_PID=$!
BENCH_PIDS+=("$OP_PID")
OP_HTTP=""
for _ in $(seq 300); do
  OP_HTTP=$(sed -n 's/.*listening.*http=\([^ ]*\).*/\1/p' "$BENCH_DIR/operator.log" | head -1)
  [ -n "$OP_HTTP" ] && break
  sleep 0.1
done
[ -n "$OP_HTTP" ] || die "the operator did not start; see $BENCH_DIR/operator.log"
for _ in $(seq 300); do
  [ "$(curl -s -o /dev/null -w '%{http_code}' "http://$OP_HTTP/readyz")" = 200 ] && break
  sleep 0.1
done
log "operator pid $OP_PID, http $OP_HTTP, log $BENCH_DIR/operator.log"

# Background: the cluster (and the idle operator) before any WebSocketCluster exists.
scrape base0
sleep "$BASELINE_SECONDS"
scrape base1
background=$(requests base0 base1 "$BASELINE_SECONDS")

# Ramp: every manifest created at once (one kubectl per namespace, side by side); two watches
# (bench/watch_ready.py) follow the clusters' Ready condition and their server Deployments until
# every cluster reports Ready. Watches, not LISTs: a LIST of every object every two seconds took
# most of a core from the machine the operator and the control plane share.
log "creating $CLUSTERS WebSocketClusters in ${#namespaces[@]} namespaces (redis: $REDIS, $REPLICAS replica(s) each)"
cpu0=$(cpu_seconds "$OP_PID")
scrape ramp0
t0=$(ms)
python3 bench/watch_ready.py "$CLUSTERS" "$REPLICAS" "$NS_PREFIX" "$LABEL" "$READY_TIMEOUT" "$t0" > "$BENCH_DIR/ramp.json" &
WATCH_PID=$!
BENCH_PIDS+=("$WATCH_PID")
creators=()
for i in "${!namespaces[@]}"; do
  k create -f "$BENCH_DIR/wsc-$i.yaml" > /dev/null &
  creators+=($!)
done
for pid in "${creators[@]}"; do wait "$pid" || die "kubectl create failed"; done
created_s=$(secs "$t0" "$(ms)")
wait "$WATCH_PID" || die "following the ramp failed"
status_s=$(jq '.with_status' "$BENCH_DIR/ramp.json")
deployments_s=$(jq '.deployments' "$BENCH_DIR/ramp.json")
ready_s=$(jq '.ready' "$BENCH_DIR/ramp.json")
[ "$ready_s" != null ] || log "timed out after ${READY_TIMEOUT}s: $(jq -c '.rows[-1]' "$BENCH_DIR/ramp.json") (seconds, with a status, Deployments ready, Ready)"
ramp_ms=$(( $(ms) - t0 ))
scrape ramp1
cpu_ramp=$(awk -v a="$cpu0" -v b="$(cpu_seconds "$OP_PID")" 'BEGIN {printf "%.2f", b - a}')
rss_ramp=$(mib "$OP_PID" VmHWM)
ramp=$(requests ramp0 ramp1 "$(awk -v m="$ramp_ms" 'BEGIN {print m / 1000}')")
log "all Ready: ${ready_s}s (all with a status: ${status_s}s, all server Deployments ready: ${deployments_s}s; created in ${created_s}s)"

# Settle (the last status updates of the rollouts), then a quiet window of two resync periods
# and more: every cluster is reconciled at least twice, and nothing changes.
scrape settle0
sleep "$SETTLE_SECONDS"
scrape quiet0
reconciles0=$(op_metric wsfleet_operator_reconciles_total)
cpu_q0=$(cpu_seconds "$OP_PID")
log "quiet window: ${QUIET_SECONDS}s (--resync-seconds $RESYNC_SECONDS)"
sleep "$QUIET_SECONDS"
scrape quiet1
reconciles1=$(op_metric wsfleet_operator_reconciles_total)
cpu_quiet=$(awk -v a="$cpu_q0" -v b="$(cpu_seconds "$OP_PID")" 'BEGIN {printf "%.2f", b - a}')
settle=$(requests settle0 quiet0 "$SETTLE_SECONDS")
quiet=$(requests quiet0 quiet1 "$QUIET_SECONDS")
rss_quiet=$(mib "$OP_PID" VmRSS)

# Delete all of them; time until the clusters, their children (what the operator applied) and
# the pods and ReplicaSets under them are gone.
log "deleting them"
cpu_d0=$(cpu_seconds "$OP_PID")
scrape delete0
t1=$(ms)
k delete wsc -A -l "$LABEL" --wait=false > /dev/null
wsc_gone_s=null children_gone_s=null pods_gone_s=null
while :; do
  now=$(ms)
  if [ "$wsc_gone_s" = null ] && [ "$(count_in_bench wsc)" -eq 0 ]; then wsc_gone_s=$(secs "$t1" "$now"); fi
  if [ "$children_gone_s" = null ] &&
     [ "$(count_in_bench deployments,services,poddisruptionbudgets,daemonsets -l app.kubernetes.io/managed-by=wsfleet-operator)" -eq 0 ]; then
    children_gone_s=$(secs "$t1" "$now")
  fi
  if [ "$children_gone_s" != null ] && [ "$(count_in_bench replicasets,pods)" -eq 0 ]; then
    pods_gone_s=$(secs "$t1" "$now"); break
  fi
  if (( now - t1 >= GONE_TIMEOUT * 1000 )); then log "timed out after ${GONE_TIMEOUT}s waiting for the children to go"; break; fi
  sleep 1
done
delete_ms=$(( $(ms) - t1 ))
scrape delete1
cpu_delete=$(awk -v a="$cpu_d0" -v b="$(cpu_seconds "$OP_PID")" 'BEGIN {printf "%.2f", b - a}')
deleting=$(requests delete0 delete1 "$(awk -v m="$delete_ms" 'BEGIN {print m / 1000}')")

rss_peak=$(mib "$OP_PID" VmHWM)
cpu_total=$(cpu_seconds "$OP_PID")
errors=$(grep -c ' WARN \| ERROR ' "$BENCH_DIR/operator.log" || true)
bench_stop_all

jq -n \
  --argjson cores "$(nproc)" --argjson clusters "$CLUSTERS" --argjson namespaces "$NAMESPACES" \
  --argjson replicas "$REPLICAS" --arg redis "$REDIS" --argjson resync "$RESYNC_SECONDS" \
  --argjson created "$created_s" --argjson status "$status_s" --argjson deployments "$deployments_s" \
  --argjson ready "$ready_s" \
  --argjson timeline "$(jq -c '.rows' "$BENCH_DIR/ramp.json")" \
  --argjson rss_ramp "$rss_ramp" --argjson rss_quiet "$rss_quiet" --argjson rss_peak "$rss_peak" \
  --argjson cpu_ramp "$cpu_ramp" --argjson cpu_quiet "$cpu_quiet" --argjson cpu_delete "$cpu_delete" \
  --argjson cpu_total "$cpu_total" --argjson reconciles_quiet "$(( ${reconciles1:-0} - ${reconciles0:-0} ))" \
  --argjson background "$background" --argjson ramp "$ramp" --argjson settle "$settle" \
  --argjson quiet "$quiet" --argjson deleting "$deleting" --argjson warnings "$errors" \
  --argjson wsc_gone "$wsc_gone_s" --argjson children_gone "$children_gone_s" --argjson pods_gone "$pods_gone_s" \
  '{machine: {cores: $cores}, clusters: $clusters, namespaces: $namespaces, replicas: $replicas, redis: $redis,
    resync_seconds: $resync,
    ramp: {created_seconds: $created, all_with_status_seconds: $status,
           all_server_deployments_ready_seconds: $deployments, all_ready_seconds: $ready,
           timeline: {columns: ["seconds", "with_status", "server_deployments_ready", "ready"], rows: $timeline},
           api: $ramp},
    operator: {peak_rss_mib: $rss_peak, rss_after_ramp_peak_mib: $rss_ramp, rss_quiet_mib: $rss_quiet,
               cpu_seconds: {ramp: $cpu_ramp, quiet: $cpu_quiet, delete: $cpu_delete, total: $cpu_total},
               warnings_logged: $warnings},
    background_api: $background, settle_api: $settle,
    quiet_resync: {reconciles: $reconciles_quiet, api: $quiet},
    delete: {clusters_gone_seconds: $wsc_gone, children_gone_seconds: $children_gone,
             pods_gone_seconds: $pods_gone, api: $deleting},
    goals: {all_ready_under_60s: ($ready != null and $ready < 60), rss_under_64mib: ($rss_peak < 64),
            zero_writes_on_noop_resync: ($quiet.operator_kinds_writes == 0)}}' > bench/results/operator.json

r=bench/results/operator.json
verbs() { jq -r "$1 | .per_s_by_verb | to_entries | map(\"\\(.key) \\(.value)\") | join(\", \") | if . == \"\" then \"none\" else . end" "$r"; }
printf '\n%s WebSocketClusters (%s namespaces, %s replica(s) each, %s Redis), operator --resync-seconds %s, %s cores\n' \
  "$CLUSTERS" "$NAMESPACES" "$REPLICAS" "$REDIS" "$RESYNC_SECONDS" "$(nproc)"
{
  echo "what|figure|goal"
  echo "all Ready|$ready_s s (created in $created_s s; all with a status $status_s s; server Deployments ready $deployments_s s)|< 60 s"
  echo "operator peak RSS|$(jq -r '.operator.peak_rss_mib' "$r") MiB (quiet: $(jq -r '.operator.rss_quiet_mib' "$r") MiB)|< 64 MiB"
  echo "operator CPU|ramp $cpu_ramp s, quiet $cpu_quiet s, delete $cpu_delete s, total $cpu_total s|"
  echo "API req/s, background|$(jq -r '.background_api.requests_per_s' "$r") ($(verbs .background_api))|"
  echo "API req/s, ramp|$(jq -r '.ramp.api.requests_per_s' "$r") ($(verbs .ramp.api))|"
  echo "API req/s, quiet resync|$(jq -r '.quiet_resync.api.requests_per_s' "$r") ($(verbs .quiet_resync.api))|"
  echo "server-side applies, ramp|$(jq -r '[.ramp.api.by_request | to_entries[] | select(.key | startswith("APPLY "))] | "\(map(.value) | add // 0) (" + (map("\(.key | ltrimstr("APPLY ")) \(.value)") | join(", ")) + ")"' "$r")|"
  echo "operator-kind writes after Ready|$(jq -r '.settle_api.operator_kinds_writes' "$r") in the ${SETTLE_SECONDS} s settle|"
  echo "writes, no-op resync|$(jq -r '.quiet_resync.api.operator_kinds_writes' "$r") to the operator's kinds over ${QUIET_SECONDS} s, $(jq -r '.quiet_resync.reconciles' "$r") reconciles (all writes: $(jq -r '.quiet_resync.api.writes' "$r"))|0"
  echo "delete: clusters gone|$wsc_gone_s s|"
  echo "delete: children gone|$children_gone_s s (pods and ReplicaSets: $pods_gone_s s)|"
} | column -t -s '|'
echo "(written to $r)"
