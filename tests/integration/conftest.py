"""Session fixtures for the production stack on 127.0.0.1, started through the project's own scripts.

SeaweedFS (mlflow/s3.sh), an ``mlflow server`` with s3:// artifacts (mlflow/server.sh) and a Ray
head (cluster/local-head.sh), each on free ports with its own folder. Every process started here
is stopped by its PID afterwards, together with whatever it spawned, also when a test fails.
The AWS credentials and the MLflow token are random per session, so a test can look for them.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
BUCKET = "metapipe"


def free_port(offsets: tuple[int, ...] = (0,)) -> int:
    """A port ``p`` such that ``p + offset`` is free on 127.0.0.1 for every offset."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + max(offsets) >= 65536:
            continue
        try:
            for offset in offsets:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no free block of ports at offsets {offsets} on 127.0.0.1")


def descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def stop_tree(pid: int, timeout: float = 20.0, graceful: Callable[[], None] | None = None) -> None:
    """Stop ``pid`` (by ``graceful()`` or SIGTERM), then SIGKILL it and anything it spawned that is left."""
    tree = [pid, *descendants(pid)]
    try:
        if graceful:
            graceful()
        else:
            os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, subprocess.SubprocessError):
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.2)
    for p in tree + [d for p in tree if alive(p) for d in descendants(p)]:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_until(check: Callable[[], bool], what: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet: connection refused, 5xx, ...
            pass
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up in {timeout:.0f} s\n{tail}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.status == 200


@dataclass(frozen=True)
class Credentials:
    """Random per-session secrets; none may leak into runs or logs."""

    access_key: str
    secret_key: str
    mlflow_token: str

    def values(self) -> dict[str, str]:
        return {"AWS_SECRET_ACCESS_KEY": self.secret_key, "MLFLOW_TRACKING_TOKEN": self.mlflow_token}


@dataclass(frozen=True)
class S3:
    endpoint: str

    def client(self, creds: Credentials):  # noqa: ANN201 - a boto3 client
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key,
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


def base_env(scratch: Path) -> dict[str, str]:
    """The environment every started process shares: no credentials, no telemetry, scratch TMPDIR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    tmp = scratch / "tmp"
    tmp.mkdir(exist_ok=True)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", TMPDIR=str(tmp), HOME=env.get("HOME", str(scratch)),
        RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
        RAY_AUTH_MODE="disabled",  # loopback-only test cluster; outside tests token authentication stays on
    )
    return env


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


@dataclass(frozen=True)
class RayHead:
    address: str
    logs: Path


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
