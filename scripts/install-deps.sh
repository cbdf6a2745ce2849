#!/usr/bin/env bash
# Installs what the tests, the local fleet and the node profile need and a fresh machine may lack.
# Safe to run again: it only installs what is missing.
#
#   redis-server, curl, jq           the data plane and its tests
#   containerd, runc, CNI plugins    the node profile's container runtime (tests/cluster/node)
#   iptables, nftables, openssl,     kube-proxy's rules and their clean-up, the node's certificates,
#   python3, binutils, kmod          the image builder (images/image.py, strip), br_netfilter
#   nodejs, npm, chromium            the JavaScript client's tests and its demo page in a headless browser
set -euo pipefail

missing=()
need() { command -v "$1" >/dev/null || missing+=("$2"); }
need redis-server redis-server
need curl curl
need jq jq
need containerd containerd
need runc runc
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
need iptables iptables
need nft nftables
need openssl openssl
need python3 python3
need strip binutils
need modprobe kmod
need node nodejs
need npm npm
need chromium chromium
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
rustup component add clippy rustfmt >/dev/null 2>&1 || true
