#!/usr/bin/env bash
# The road to 1,000,000 connections, side by side with the seed's stack: the same load
# generator steps a wsfleet fleet and the Node.js ws + ioredis baseline up through the same
# connection counts on this machine, in the same run, and records memory per connection, time
# to establish, idle CPU, broadcast fan-out and latency at each step
# (bench/results/connections-<stack>.json), then a comparison table and a plot.
#
#   STEPS=10000,50000,100000,200000,250000 NODE_STEPS=10000,50000,100000 bench/connections.sh
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-10000,50000,100000,200000,250000}
NODE_STEPS=${NODE_STEPS:-10000,50000,100000}
SERVERS=${SERVERS:-16}
NODE_SERVERS=${NODE_SERVERS:-8}

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

mkdir -p bench/results
./target/release/wsfleet-load connections --stack wsfleet --servers "$SERVERS" --steps "$STEPS" \
  > bench/results/connections-wsfleet.json
./target/release/wsfleet-load connections --stack node --servers "$NODE_SERVERS" --steps "$NODE_STEPS" \
  > bench/results/connections-node.json
python3 bench/report.py bench/results/connections-wsfleet.json bench/results/connections-node.json
