#!/usr/bin/env bash
# Prints what the node profile may change on this machine, one fact per line, sorted, so two
# runs can be compared with diff: network interfaces and their addresses, routes, network
# namespaces, the whole netfilter ruleset (iptables here is its nf_tables front end), mounts,
# the host settings in NODE_SYSCTLS, cgroups, paths the node's components write outside their
# own directories, and processes of the node.
#
# up.sh saves it before it changes anything (NODE_DIR/machine-before.txt); down.sh compares and
# fails when the machine is not left as it was found.
set -u  # a reporter: a command that finds nothing is no failure
# shellcheck source=common.sh
. "$(cd "$(dirname "$0")" && pwd)/common.sh"

{
  ip -o link show | awk '{sub(/@.*/, "", $2); print "link " $2}'
  ip -o addr show | awk '{print "addr " $2 " " $4}'
  ip route show table all | sed 's/^/route /'
  ip netns list 2>/dev/null | awk '{print "netns " $1}'
  # Handles number rules; they change with every insertion and say nothing about the state.
  nft list ruleset 2>/dev/null | sed -E 's/ # handle [0-9]+//; s/^[[:space:]]+//' | grep -v '^$' | sed 's/^/nft /'
  awk '{print "mount " $2 " " $3}' /proc/self/mounts
  for s in "${NODE_SYSCTLS[@]}"; do
    f=/proc/sys/${s//.//}
    [ -r "$f" ] && echo "sysctl $s = $(tr -s '\t ' ' ' < "$f")"
  done
  for d in /sys/fs/cgroup/*/; do
    [ -d "$d$NODE_CGROUP" ] && echo "cgroup $d$NODE_CGROUP"
  done
  for p in "${NODE_HOST_PATHS[@]}" "$NODE_RUN" "${KUBELET_ROOT%/*}"; do
    [ -e "$p" ] && echo "path $p ($(find "$p" -mindepth 1 2>/dev/null | wc -l) entries)"
  done
  for pid in $(node_leftovers); do echo "process $pid $(tr '\0' ' ' < "/proc/$pid/cmdline" | cut -c1-120)"; done
} | LC_ALL=C sort
