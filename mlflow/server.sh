#!/usr/bin/env bash
# The MLflow tracking server for cluster runs, in the foreground (Ctrl+C stops it):
# a backend store (SQLite by default, a database URI such as postgresql://... for real
# deployments) and artifacts in S3-compatible storage, which the server proxies, so
# clients and jobs need no S3 credentials to log artifacts.
#
#   export AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=...     # the server's S3 credentials
#   export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:8333         # MinIO/SeaweedFS; unset for AWS S3
#   mlflow/server.sh                                            # http://127.0.0.1:5000
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
#
# Settings, from the environment:
#   MLFLOW_BACKEND_STORE_URI      (sqlite:///$HOME/.metapipe/mlflow.db)
#   MLFLOW_ARTIFACTS_DESTINATION  (s3://metapipe/mlflow)
#   MLFLOW_HOST (127.0.0.1; set 0.0.0.0 only behind an authenticating proxy)   MLFLOW_PORT (5000)
#   MLFLOW_WORKERS (1)
# Extra arguments go to `mlflow server`. Credentials come from the environment only (or an IAM role),
# never from arguments, which other users of the machine could read.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${METAPIPE_VENV:-$root/.venv}
[[ -x $venv/bin/mlflow ]] && export PATH="$venv/bin:$PATH"
mkdir -p "$HOME/.metapipe"
backend=${MLFLOW_BACKEND_STORE_URI:-sqlite:///$HOME/.metapipe/mlflow.db}
artifacts=${MLFLOW_ARTIFACTS_DESTINATION:-s3://metapipe/mlflow}
host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
case $artifacts in
  s3://*) [[ -n ${AWS_ACCESS_KEY_ID:-} || -n ${AWS_PROFILE:-} || -n ${AWS_ROLE_ARN:-} ]] ||
    echo "warning: no AWS credentials in the environment; the server relies on an IAM role for $artifacts" >&2 ;;
esac
# The server only tracks; it runs no jobs, sends no telemetry.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true
echo "MLflow server http://$host:$port: backend ${backend%%://*}://..., artifacts $artifacts" >&2
exec mlflow server --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
  --host "$host" --port "$port" --workers "${MLFLOW_WORKERS:-1}" "$@"
