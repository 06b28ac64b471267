"""Session fixtures for the production stack on 127.0.0.1, started through the project's own scripts.

SeaweedFS (mlflow/s3.sh), an ``mlflow server`` with s3:// artifacts (mlflow/server.sh) and a Ray
head (cluster/local-head.sh), each on free ports with its own folder. Every process started here
is stopped by its PID afterwards, together with whatever it spawned, also when a test fails.
The AWS credentials and the MLflow token are random per session, so a test can look for them.
"""
from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from tests.helpers import (
    BUCKET,
    ROOT,
    S3,
    Credentials,
    RayHead,
    base_env,
    free_port,
    http_ok,
    stop_tree,
    wait_until,
)


@pytest.fixture(scope="session")
def scratch() -> Iterator[Path]:
    """A short folder for the session (Ray's socket paths must stay under 108 characters)."""
    path = Path(tempfile.mkdtemp(prefix="mp-it-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def creds() -> Credentials:
    return Credentials("MPK" + secrets.token_hex(6).upper(), "mps-" + secrets.token_urlsafe(24), "mpt-" + secrets.token_urlsafe(24))


@pytest.fixture(scope="session")
def s3(scratch: Path, creds: Credentials) -> Iterator[S3]:
    """SeaweedFS (mlflow/s3.sh) with the bucket, accepting only the session's credentials."""
    port = free_port((0, 1, 2, 3, 4, 10001, 10002, 10003, 10004, 10000))
    env = base_env(scratch) | {
        "AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "METAPIPE_S3_PORT": str(port), "METAPIPE_S3_DIR": str(scratch / "s3"), "METAPIPE_S3_BUCKET": BUCKET,
    }
    log = scratch / "s3.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(ROOT / "mlflow" / "s3.sh")], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    store = S3(f"http://127.0.0.1:{port}")
    try:
        client = store.client(creds)
        wait_until(lambda: any(b["Name"] == BUCKET for b in client.list_buckets()["Buckets"]), "SeaweedFS", 60, process, log)
        yield store
    finally:
        stop_tree(process.pid)


@pytest.fixture(scope="session")
def mlflow_server(scratch: Path, creds: Credentials, s3: S3) -> Iterator[str]:
    """``mlflow server`` (mlflow/server.sh): SQLite backend, artifacts proxied to s3://metapipe/mlflow."""
    port = free_port()
    env = base_env(scratch) | {
        "AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key,
        "MLFLOW_S3_ENDPOINT_URL": s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{scratch / 'mlflow.db'}",
        "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/mlflow", "MLFLOW_PORT": str(port),
    }
    log = scratch / "mlflow.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(ROOT / "mlflow" / "server.sh")], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_ok(f"{uri}/health"), "mlflow server", 120, process, log)
        yield uri
    finally:
        stop_tree(process.pid)


@pytest.fixture(scope="session")
def ray_head(scratch: Path) -> Iterator[RayHead]:
    """A Ray head (cluster/local-head.sh start) on free ports: its jobs API address and log folder."""
    dashboard = free_port()
    ports = {name: str(free_port()) for name in ("RAY_HEAD_PORT", "RAY_CLIENT_PORT", "RAY_AGENT_PORT")}
    head_dir = Path(tempfile.mkdtemp(prefix="mp-ray-", dir="/tmp"))  # short: Ray's socket paths live under it
    env = base_env(scratch) | ports | {"RAY_DASHBOARD_PORT": str(dashboard), "RAY_HEAD_DIR": str(head_dir), "RAY_NUM_CPUS": "2"}
    script = str(ROOT / "cluster" / "local-head.sh")
    pidfile = head_dir / "head.pid"
    try:
        started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, f"local-head.sh start failed:\n{started.stdout}\n{started.stderr}"
        yield RayHead(f"http://127.0.0.1:{dashboard}", head_dir / "ray" / "session_latest" / "logs")
    finally:
        if pidfile.exists():  # also after a start that failed or timed out
            pid = int(pidfile.read_text())
            stop_tree(pid, timeout=30, graceful=lambda: subprocess.run([script, "stop"], env=env, capture_output=True, timeout=60))
        shutil.rmtree(head_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def client_env(scratch: Path, creds: Credentials, s3: S3, mlflow_server: str) -> dict[str, str]:
    """A user's shell: tracking server, S3 endpoint and credentials in the environment."""
    return base_env(scratch) | {
        "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_TRACKING_TOKEN": creds.mlflow_token,
        "AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": creds.access_key,
        "AWS_SECRET_ACCESS_KEY": creds.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
    }
