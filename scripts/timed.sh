#!/usr/bin/env bash
# Runs a command as one named stage of a long job, and says when it starts and how long it took
# (also when it fails), so a long `make test` never leaves a silent terminal:
#
#   scripts/timed.sh "node tests" make test-node
set -uo pipefail
name=$1
shift
start=$(date +%s)
echo "==> $name: $*"
"$@"
rc=$?
took=$(( $(date +%s) - start ))
if [ "$rc" = 0 ]; then
  echo "==> $name: done in $(( took / 60 ))m$(( took % 60 ))s"
else
  echo "==> $name: FAILED (exit $rc) after $(( took / 60 ))m$(( took % 60 ))s"
fi
exit "$rc"
