#!/usr/bin/env bash
# Builds the images the node profile runs, without Docker and without pulling anything, as
# docker-archive tarballs (images/image.py) under the exact names the chart and the CRD default
# to, so the manifests a user applies elsewhere run here unchanged:
#
#   ghcr.io/wsfleet/wsfleet-server:<version>    target/release/wsfleet-server (+ its glibc libraries)
#   ghcr.io/wsfleet/wsfleet-operator:<version>  target/release/wsfleet-operator (+ libraries)
#   redis:7.2-alpine                            Debian's redis-server and redis-cli (see README:
#                                               the local stand-in for the CRD's default tag)
#   localhost/wsfleet/pause:1                   images/pause, the node's sandbox image
#
# The Dockerfiles at the repository root build the registry images (musl, distroless) with the
# same entrypoints, users and ports; these are the local equivalents.
#
#   images/build.sh [OUT_DIR]         (default .run/images); prints OUT_DIR on its last line
#   SKIP_CARGO=1                      use the release binaries already in target/release
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo_root=$(cd "$here/.." && pwd)
out=${1:-$repo_root/.run/images}
log() { echo "[images] $*" >&2; }

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$repo_root/Cargo.toml" | head -1)
[ -n "$version" ] || { log "no workspace version in Cargo.toml"; exit 1; }
# The chart and CRD defaults these names must match (a test checks them too).
grep -q "default: ghcr.io/wsfleet/wsfleet-server:$version" "$repo_root/crds/websocketcluster.yaml" ||
  { log "crds/ does not default to ghcr.io/wsfleet/wsfleet-server:$version"; exit 1; }
redis_tag=$(sed -n 's/^ *default: \(redis:.*\)$/\1/p' "$repo_root/crds/websocketcluster.yaml" | head -1)
[ -n "$redis_tag" ] || { log "no default Redis image in crds/"; exit 1; }

if [ -z "${SKIP_CARGO:-}" ]; then
  log "cargo build --release (wsfleet-server, wsfleet-operator)"
  (cd "$repo_root" && cargo build --release -q -p wsfleet-server -p wsfleet-operator --bins)
fi
node_bin=$("$repo_root/tests/cluster/node/build.sh" | tail -1)
command -v redis-server >/dev/null || { log "redis-server is missing (scripts/install-deps.sh installs it)"; exit 1; }

mkdir -p "$out/stripped"
# Debug line tables stay in target/; the images get stripped copies.
for b in wsfleet-server wsfleet-operator; do
  strip -o "$out/stripped/$b" "$repo_root/target/release/$b"
done

img() { python3 "$here/image.py" "$@" >&2; }
img --tag "ghcr.io/wsfleet/wsfleet-server:$version" --out "$out/wsfleet-server.tar" \
  --file "$out/stripped/wsfleet-server:/usr/local/bin/wsfleet-server" \
  --entrypoint /usr/local/bin/wsfleet-server --user 65532:65532 --expose 8080 --expose 9090
img --tag "ghcr.io/wsfleet/wsfleet-operator:$version" --out "$out/wsfleet-operator.tar" \
  --file "$out/stripped/wsfleet-operator:/usr/local/bin/wsfleet-operator" \
  --entrypoint /usr/local/bin/wsfleet-operator --user 65532:65532 --expose 8080
img --tag "$redis_tag" --out "$out/redis.tar" \
  --file "$(command -v redis-server):/usr/local/bin/redis-server" \
  --file "$(command -v redis-cli):/usr/local/bin/redis-cli" \
  --passwd-line "redis:x:999:999:redis:/data:/sbin/nologin" --dir /data:755 --workdir /data \
  --cmd redis-server --user 999:999 --expose 6379
img --tag localhost/wsfleet/pause:1 --out "$out/pause.tar" \
  --file "$node_bin/pause:/pause" --entrypoint /pause --user 65535:65535
echo "$out"
