#!/usr/bin/env bash
# Installs what the tests and the local fleet need and a fresh machine may lack.
# Safe to run again: it only installs what is missing.
set -euo pipefail

missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v curl >/dev/null || missing+=(curl)
command -v jq >/dev/null || missing+=(jq)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi
rustup component add clippy rustfmt >/dev/null 2>&1 || true
