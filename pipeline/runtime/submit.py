"""Submit a training run to a Ray cluster through the Ray Jobs API.

The project folder travels as the job's ``working_dir``; the entry point is
``python -m pipeline train CONFIG --set ...``. Tracking and storage settings
(MLflow URI, S3 endpoint, AWS credentials) reach the job only through its
runtime environment, copied from the submitter's environment, so no credential
is ever part of the command line that Ray logs and MLflow records.
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, TextIO

from pipeline.config import RunConfig, load_config, read_with_bases
from pipeline.errors import SubmitError
from pipeline.runtime.ray_env import REPO_ROOT

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

EXCLUDES = (
    ".venv", ".git", "episodes", "mlruns", "mlartifacts", "mlflow.db", "exported", "runs",
    "__pycache__", ".pytest_cache", ".hypothesis",
)
"""Never uploaded with the project: environments, data, local tracking stores, caches."""

FORWARDED_ENV = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "METAPIPE_S3_ENDPOINT",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
    "METAPIPE_DATA", "RAY_JOB_STOP_WAIT_TIME_S",
)
"""Variables copied from the submitter's environment into the job's."""

STOP_WAIT_S = "60"
"""``RAY_JOB_STOP_WAIT_TIME_S`` when the submitter sets none: how long ``ray job stop`` waits after its SIGTERM
(on which the driver writes a final checkpoint) before SIGKILL. Ray's default, 3 s, is too short for the upload."""

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD")
"""Variables whose values must never appear in an entry point (it is logged)."""

RUN_ID = re.compile(r"^run_id: (\w+)\s*$", re.MULTILINE)
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class JobSpec:
    """Everything ``JobSubmissionClient.submit_job`` needs, built without touching the cluster."""

    entrypoint: str
    runtime_env: dict[str, Any]
    config: RunConfig
    """The run's config as the job will load it (the file with the overrides), validated."""
    metadata: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()


def job_spec(
    config_path: str | Path,
    overrides: list[str],
    environ: Mapping[str, str],
    root: Path = REPO_ROOT,
    resume: str | None = None,
) -> JobSpec:
    """The job for ``train CONFIG --set ... [--resume RUN_ID]``, validated locally before any cluster work.

    The config must lie inside the project (the job sees the project folder only),
    and the run must be tracked somewhere that outlives the job: a tracking URI
    in the config or in $MLFLOW_TRACKING_URI. A local store path only warns: it
    works on a single-node cluster.
    """
    path = Path(config_path).resolve()
    root = root.resolve()
    if not path.is_relative_to(root):
        raise SubmitError(f"config {config_path}: must lie inside the project {root} (e.g. configs/), the job sees only that folder")
    config = load_config(path, overrides)
    for base in read_with_bases(path)[1]:
        if not base.resolve().is_relative_to(root):
            raise SubmitError(f"config {config_path}: its base {base} must lie inside the project {root}, the job sees only that folder")
    if not (config.tracking.uri or environ.get("MLFLOW_TRACKING_URI")):
        raise SubmitError(
            "a cluster job needs a tracking server: set MLFLOW_TRACKING_URI=http://HOST:PORT (mlflow/server.sh) "
            "or tracking.uri in the config; the embedded sqlite store would vanish with the job's folder"
        )
    relative = path.relative_to(root).as_posix()
    command = ["python", "-m", "pipeline", "train", relative]
    for item in overrides:
        command += ["--set", item]
    if resume:
        command += ["--resume", resume]
    entrypoint = shlex.join(command)
    for name in SECRET_ENV:
        value = environ.get(name)
        if value and value in entrypoint:
            raise SubmitError(f"the command line contains the value of ${name}: pass credentials through the environment only")
    env_vars = {name: environ[name] for name in FORWARDED_ENV if environ.get(name)}
    env_vars.setdefault("RAY_JOB_STOP_WAIT_TIME_S", STOP_WAIT_S)  # read by the job's supervisor actor
    runtime_env = {"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": env_vars}
    warnings = ()
    if not config.store.path.startswith("s3://"):
        warnings = (
            f"store.path={config.store.path!r} is local to the node running the job: workers on other nodes cannot read it; "
            "precompute to s3:// (python -m pipeline precompute CONFIG --out s3://BUCKET/PREFIX) for a multi-node cluster",
        )
    return JobSpec(entrypoint, runtime_env, config, {"metapipe.config": relative, "metapipe.name": config.name}, warnings)


def run_id_in(text: str) -> str | None:
    """The MLflow run id the driver prints (``run_id: <id>``), or None."""
    found = RUN_ID.search(text)
    return found.group(1) if found else None


def exit_code(status: str) -> int:
    """The submitter's exit status for a finished job: 0 when it succeeded, 1 otherwise."""
    return 0 if status == "SUCCEEDED" else 1


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def follow(client: Any, job_id: str, out: TextIO) -> tuple[str, str | None]:
    """Stream the job's logs to ``out`` until it ends; return its final status and the run id seen."""
    run_id: str | None = None

    async def tail() -> None:
        nonlocal run_id
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            run_id = run_id or run_id_in(chunk)

    asyncio.run(tail())
    status = wait(client, job_id, timeout=60.0)
    return status, run_id or run_id_in(client.get_job_logs(job_id))


def wait(client: Any, job_id: str, timeout: float, poll: float = 0.5) -> str:
    """Poll until the job reaches a final status (or ``timeout`` seconds pass); return the status."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in FINAL or time.monotonic() > deadline:
            return status
        time.sleep(poll)


def wait_for_run(client: Any, job_id: str, timeout: float, poll: float = 1.0) -> tuple[str, str | None]:
    """Poll the job's logs until the driver printed its run id or the job ended; return (status, run id)."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        run_id = run_id_in(client.get_job_logs(job_id))
        if run_id or status in FINAL or time.monotonic() > deadline:
            return status, run_id
        time.sleep(poll)


def submit(
    config_path: str | Path,
    overrides: list[str],
    address: str,
    follow_logs: bool = False,
    run_timeout: float = 600.0,
    out: TextIO = sys.stdout,
    environ: Mapping[str, str] | None = None,
    resume: str | None = None,
) -> int:
    """Submit the run, print ``job_id:`` and ``run_id:``; with ``follow_logs`` stream logs and return the job's exit status.

    Without ``follow_logs`` it returns once the run has started (its id is known),
    leaving the job running on the cluster. ``resume``: the job continues that MLflow run
    (``train --resume``); an unknown run or another config is refused here, before submission
    (RunError, ConfigError), as ``train`` would refuse it in the job.
    """
    environ = os.environ if environ is None else environ
    spec = job_spec(config_path, overrides, environ, resume=resume)
    if resume:
        from pipeline.runtime.driver import open_resumed

        open_resumed(spec.config, resume)
    for warning in spec.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    client = _client(address)
    job_id = client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env, metadata=spec.metadata)
    print(f"job_id: {job_id}", file=out, flush=True)
    if follow_logs:
        try:
            status, run_id = follow(client, job_id, out)
        except KeyboardInterrupt:
            print(f"\nstopped following; job {job_id} goes on (ray job stop {job_id} --address {address} ends it)", file=out)
            return 130
    else:
        status, run_id = wait_for_run(client, job_id, run_timeout)
    if run_id:
        print(f"run_id: {run_id}", file=out, flush=True)
    print(f"job {job_id}: {status}", file=out, flush=True)
    if follow_logs or status in FINAL:
        return exit_code(status)
    print(f"follow it with: ray job logs {job_id} --address {address} --follow", file=out, flush=True)
    return 0
