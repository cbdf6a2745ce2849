#!/usr/bin/env bash
# The fault run (`make chaos`): `wsfleet-load chaos` starts a fresh redis-server and three
# servers per fault, runs real clients through it, and reports what was lost (silently or
# announced), the servers' peak memory and the time until their bus was up again. Writes
# bench/results/chaos.json and prints a table. FAULTS=kill,pause,... runs a subset.
set -euo pipefail
cd "$(dirname "$0")/.."

FAULTS=${FAULTS:-kill,pause,sleep,cut,restore,stalled,flood}
echo "[chaos] building (release)"
cargo build --release -q -p wsfleet-server -p wsfleet-load
echo "[chaos] faults: $FAULTS (about a minute each)"
./target/release/wsfleet-load chaos --faults "$FAULTS" > bench/results/chaos.json

printf '%-8s %9s %9s %7s %7s %7s %9s %7s %7s %9s %8s %8s\n' \
  fault published delivered refused "refused+" unknown silent announced dup disorder bus_up_s peak_MiB
jq -r '.faults[] | select(.published != null) |
  [.fault, .published, .delivered, .refused, .refused_yet_delivered, .outcome_unknown,
   .lost_silently, .lost_announced, .duplicates, .out_of_order, .bus_up_again_seconds, .servers_peak_rss_mib] | @tsv' \
  bench/results/chaos.json |
  while IFS=$'\t' read -r f p a r ry u s an d o b m; do
    printf '%-8s %9s %9s %7s %7s %7s %9s %7s %7s %9s %8s %8s\n' "$f" "$p" "$a" "$r" "$ry" "$u" "$s" "$an" "$d" "$o" "$b" "$m"
  done
echo "(refused+: refused as not published, yet delivered; unknown: answered outcome_unknown, retried with the same id; silent/announced: numbers a subscriber missed)"
jq -r '.faults[] | select(.fault == "stalled") |
  "stalled: \(.stalled_clients) clients that never read, \(.messages_published) messages of \(.payload_bytes) B: \(.closed_as_too_slow) closed as too slow (1013); servers \(.servers_rss_mib_before_flood) MiB before, \(.servers_peak_rss_mib) MiB at peak"' \
  bench/results/chaos.json
jq -r '.faults[] | select(.fault == "flood") |
  "flood: \(.channels) channels in \(.seconds) s; Redis \(.redis_used_mib_before) -> \(.redis_used_mib_after) MiB (\(.redis_keys_after) keys); servers peak \(.servers_peak_rss_mib) MiB; refused \(.refused)"' \
  bench/results/chaos.json
jq -r '.faults[] | select(.error != null) | "\(.fault): ERROR \(.error)"' bench/results/chaos.json
