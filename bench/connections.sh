#!/usr/bin/env bash
# The road to 1,000,000 connections, side by side with the seed's stack: the same load
# generator steps a wsfleet fleet and the Node.js ws + ioredis baseline up through the same
# connection counts on this machine, in the same run, and records memory per connection, time
# to establish, idle CPU, broadcast fan-out (one message, and a burst) and latency at each step
# (bench/results/connections-<run>.json); then a wsfleet fleet sized for a million goes on alone
# (connections-million.json); then a comparison table and a plot.
#
#   STEPS=10000,50000,100000,250000 MILLION_STEPS=500000,1000000 bench/connections.sh
#   STEPS=10000,100000 MILLION_STEPS= bench/connections.sh     # no million run
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-10000,50000,100000,250000}
NODE_STEPS=${NODE_STEPS:-$STEPS}
SERVERS=${SERVERS:-16}
NODE_SERVERS=${NODE_SERVERS:-16}
# Unset: the default steps; set and empty: no million run.
MILLION_STEPS=${MILLION_STEPS-500000,1000000}
MILLION_SERVERS=${MILLION_SERVERS:-56}

scripts/install-deps.sh
cargo build --release -q -p wsfleet-server -p wsfleet-load
(cd bench/baseline && npm install --no-audit --no-fund --loglevel=error >/dev/null)
python3 -c 'import matplotlib' 2>/dev/null || pip install -q matplotlib || echo "no matplotlib: no plot" >&2

# Kernel settings a machine holding this many sockets needs (loopback only; recorded here).
tune() { [ -w "/proc/sys/$(tr . / <<<"$1")" ] && sysctl -qw "$1=$2" || echo "cannot set $1" >&2; }
tune net.ipv4.ip_local_port_range "1024 65535"
tune net.core.somaxconn 65535
tune net.ipv4.tcp_max_syn_backlog 65535
tune fs.file-max 4194304
tune fs.nr_open 1048576
# TCP memory (pages): a broadcast puts a little data on every one of a million sockets at once.
tune net.ipv4.tcp_mem "1048576 2097152 3145728"
[ -e /proc/sys/net/netfilter/nf_conntrack_max ] && tune net.netfilter.nf_conntrack_max 2097152

mkdir -p bench/results
load=./target/release/wsfleet-load
$load connections --stack wsfleet --servers "$SERVERS" --steps "$STEPS" > bench/results/connections-wsfleet.json
$load connections --stack node --servers "$NODE_SERVERS" --steps "$NODE_STEPS" > bench/results/connections-node.json
if [ -n "$MILLION_STEPS" ]; then
  $load connections --stack wsfleet --servers "$MILLION_SERVERS" --steps "$MILLION_STEPS" \
    > bench/results/connections-million.json
fi
python3 bench/report.py bench/results/connections-{wsfleet,node}.json \
  $( [ -n "$MILLION_STEPS" ] && echo bench/results/connections-million.json )
