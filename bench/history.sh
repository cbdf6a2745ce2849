#!/usr/bin/env bash
# What per-channel order and history cost: the same publish load through a fleet of three
# servers on one redis-server, with history off (--history-size 0: offsets and epochs only) and
# on (--history-size 1000). Prints a table and writes bench/results/history.json.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh

MESSAGES=${MESSAGES:-40000}
PUBLISHERS=${PUBLISHERS:-8}
SUBSCRIBERS=${SUBSCRIBERS:-3}
RATE=${RATE:-2000}
cargo build --release -q -p wsfleet-server -p wsfleet-load

bench_start_redis
results=()
for size in 0 1000; do
  redis-cli -p "$REDIS_PORT" flushall >/dev/null
  urls=()
  for i in 0 1 2; do
    # A queue that holds a whole run (in frames and in bytes): the subscribers parse every message as JSON and fall
    # behind unpaced publishers; with the default (1,024) a server closes such a subscriber as
    # too slow (1013), as it should, but this run measures throughput, not that. Likewise no
    # publish rate limit: unpaced publishers would otherwise meet --publish-rate past its burst.
    bench_start_server "h$size-$i" --redis-url "$REDIS_URL" --history-size "$size" --client-queue 65536 \
      --client-queue-bytes 134217728 --publish-rate 0
    urls+=("ws://$SERVER_WS/ws")
  done
  joined=$(IFS=,; echo "${urls[*]}")
  load() { ./target/release/wsfleet-load publish --urls "$joined" --publishers "$PUBLISHERS" --subscribers "$SUBSCRIBERS" "$@"; }
  load --channel warm --messages 2000 >/dev/null
  # Throughput: publishers send as fast as the fleet takes it.
  tput=$(load --channel "tput-$size" --messages "$MESSAGES")
  # Latency: a steady rate well below saturation.
  lat=$(load --channel "lat-$size" --messages "$((RATE * 5))" --rate "$RATE")
  results+=("$(jq -c -n --argjson size "$size" --argjson t "$tput" --argjson l "$lat" '{history_size: $size, throughput: $t, latency: $l}')")
  bench_stop_all
  bench_start_redis
done

printf '%s\n' "${results[@]}" | jq -s '{machine: {cores: '"$(nproc)"'}, runs: .}' > bench/results/history.json
printf '%-8s %14s %14s | %10s %9s %9s %9s %8s\n' history msgs/s deliveries/s rate/s p50_ms p99_ms p999_ms missing
for r in "${results[@]}"; do
  jq -r '[.history_size, .throughput.messages_per_s, .throughput.deliveries_per_s, .latency.target_rate_per_s,
          .latency.latency_ms.p50, .latency.latency_ms.p99, .latency.latency_ms.p999,
          (.throughput.missing + .latency.missing)] | @tsv' <<<"$r" |
    awk -F'\t' '{printf "%-8s %14d %14d | %10d %9.2f %9.2f %9.2f %8d\n", $1, $2, $3, $4, $5, $6, $7, $8}'
done
echo "throughput: $MESSAGES messages from $PUBLISHERS publishers to $SUBSCRIBERS subscribers on 3 servers, unpaced;"
echo "latency: publish-to-deliver at a steady $RATE messages/s. (written to bench/results/history.json)"
