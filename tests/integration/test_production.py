"""The production path end to end on 127.0.0.1, through the CLI a user runs.

SeaweedFS holds the episode store and MLflow's artifacts; a short sinusoid MAML run is submitted
to a real Ray head with ``python -m pipeline submit --follow``, registered with
``python -m pipeline export RUN_ID --register NAME`` and served with ``mlflow models serve``.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient

import mlflow
from pipeline.runtime.submit import run_id_in
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

pytestmark = pytest.mark.integration

CONFIG = "configs/sinusoid_maml.yaml"
STORE = [
    f"store.path=s3://{BUCKET}/episodes/sinusoid", "store.train_episodes=400", "store.val_episodes=8",
    "store.test_episodes=8", "store.shard_episodes=200",
]
TRAIN = [
    "name=it-sinusoid", "train.steps=20", "train.meta_batch=4", "train.val_every=10", "train.val_episodes=8",
    "train.test_episodes=8", "train.checkpoint_every=10", "train.log_every=5", "tracking.system_metrics_s=1",
]
MODEL = "it-sinusoid-maml"


def cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "pipeline", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@dataclass(frozen=True)
class Job:
    run_id: str
    job_id: str
    output: str
    status_at_first_progress: str | None
    """The MLflow run's status when the followed log showed its first progress line."""


def submit_and_follow(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, str | None]:
    """``python -m pipeline submit ... --follow``, its output read as it comes: the exit status, the output, and the
    run's MLflow status when the first progress line (``step N/M ...``) arrived."""
    command = [sys.executable, "-m", "pipeline", *args]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killer = threading.Timer(timeout, process.kill)
    killer.start()
    lines: list[str] = []
    status = None
    try:
        for line in process.stdout:
            lines.append(line)
            run_id = run_id_in("".join(lines)) if status is None and line.startswith("step ") else None
            if run_id:
                status = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(run_id).info.status
        return process.wait(), "".join(lines), status
    finally:
        killer.cancel()


@pytest.fixture(scope="module")
def job(client_env: dict[str, str], ray_head: RayHead) -> Job:
    """Precompute the store to s3:// and train on the Ray head through ``pipeline submit --follow``."""
    made = cli(["precompute", CONFIG, *sets(STORE)], client_env, timeout=120)
    assert made.returncode == 0, made.stderr
    args = ["submit", CONFIG, *sets(STORE + TRAIN), "--address", ray_head.address, "--follow"]
    returncode, output, status_at_first_progress = submit_and_follow(args, client_env, timeout=420)
    assert returncode == 0, output[-6000:]
    run_id = run_id_in(output)
    job_id = next(line.split(": ", 1)[1] for line in output.splitlines() if line.startswith("job_id: "))
    assert run_id, output[-3000:]
    return Job(run_id, job_id, output, status_at_first_progress)


def test_the_followed_log_shows_progress_lines_while_the_run_goes_on(job: Job) -> None:
    steps = [line for line in job.output.splitlines() if line.startswith("step ")]
    assert [line.split("  ")[0] for line in steps] == ["step 5/20 (25%)", "step 10/20 (50%)", "step 15/20 (75%)", "step 20/20 (100%)"]
    assert "episodes/s" in steps[0] and "ETA" in steps[0] and "val mse" in steps[1]
    assert job.status_at_first_progress == "RUNNING"  # shown while the job ran, not at its end
    assert "meta-test: 8 episodes..." in job.output


def test_run_metrics_are_in_the_tracking_server(job: Job, mlflow_server: str) -> None:
    client = MlflowClient(mlflow_server)
    run = client.get_run(job.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "20"
    assert run.data.params["store.path"] == f"s3://{BUCKET}/episodes/sinusoid"
    losses = client.get_metric_history(job.run_id, "train/loss")
    assert max(m.step for m in losses) == 20 and all(math.isfinite(m.value) for m in losses)
    test = {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}
    assert 0 <= run.data.metrics["system/cpu_utilization_percentage"] <= 100  # the driver's node, by MLflow's monitor
    assert test["test/episodes"] == 8
    assert any(k.endswith("_ci95") for k in test) and all(math.isfinite(v) for v in test.values())


def test_store_checkpoints_and_model_are_objects_in_the_bucket(job: Job, s3: S3, creds: Credentials, mlflow_server: str) -> None:
    client = s3.client(creds)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in page.get("Contents", [])]
    run_keys = [k for k in keys if f"/{job.run_id}/artifacts/" in k]
    assert all(k.startswith("mlflow/") for k in run_keys)
    artifacts = {k.split("/artifacts/", 1)[1] for k in run_keys}
    assert "test_results.json" in artifacts, sorted(artifacts)
    for folder in ("checkpoints/latest/", "checkpoints/best/", "export/", "plots/"):
        assert any(a.startswith(folder) for a in artifacts), f"no {folder} in {sorted(artifacts)}"
    client_run = MlflowClient(mlflow_server).get_run(job.run_id)
    (model,) = MlflowClient(mlflow_server).search_logged_models(
        [client_run.info.experiment_id], filter_string=f"source_run_id = '{job.run_id}'"
    )
    assert any(k.startswith("mlflow/") and k.endswith(f"/models/{model.model_id}/artifacts/MLmodel") for k in keys)
    assert any(k.startswith("episodes/sinusoid/") and k.endswith(".parquet") for k in keys)


def test_registered_model_serves_few_shot_predictions(job: Job, client_env: dict[str, str], scratch: Path) -> None:
    registered = cli(["export", job.run_id, "--register", MODEL], client_env, timeout=120)
    assert registered.returncode == 0, registered.stderr
    assert f"models:/{MODEL}/1" in registered.stdout
    version = MlflowClient(client_env["MLFLOW_TRACKING_URI"]).get_model_version(MODEL, "1")
    assert version.run_id == job.run_id and "test/episodes" in version.tags

    port = free_port()
    # Serving needs only the tracking server: it proxies the model's artifacts from S3.
    env = base_env(scratch) | {"MLFLOW_TRACKING_URI": client_env["MLFLOW_TRACKING_URI"]}
    log = scratch / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", f"models:/{MODEL}/1", "--env-manager", "local", "-p", str(port), "--host", "127.0.0.1"],
            cwd=scratch, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{url}/ping"), "mlflow models serve", 150, server, log)
        xs = [-4.0, -2.5, -1.0, 0.0, 0.5, 1.5, 2.0, 3.0, 4.0, 4.5]
        request = {"inputs": {
            "support_x": [[x] for x in xs], "support_y": [[2.0 * math.sin(x - 0.5)] for x in xs],
            "query_x": [[-3.0], [-0.5], [1.0], [2.5], [3.5], [4.9], [0.1]],
        }}
        body = urllib.request.Request(f"{url}/invocations", json.dumps(request).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(body, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
        assert len(predictions) == 7
        assert all(math.isfinite(float(p[0] if isinstance(p, list) else p)) for p in predictions)
    finally:
        stop_tree(server.pid)


def test_no_credential_in_params_tags_artifacts_or_logs(
    job: Job, mlflow_server: str, ray_head: RayHead, creds: Credentials, scratch: Path
) -> None:
    from ray.job_submission import JobSubmissionClient

    client = MlflowClient(mlflow_server)
    run = client.get_run(job.run_id)
    texts = {f"param {k}": v for k, v in run.data.params.items()} | {f"tag {k}": v for k, v in run.data.tags.items()}
    logs = JobSubmissionClient(ray_head.address).get_job_logs(job.job_id)
    assert f"run_id: {job.run_id}" in logs
    texts |= {"job logs (Jobs API)": logs, "submit output": job.output}
    artifacts = Path(client.download_artifacts(job.run_id, "", str(scratch / "scan")))
    mlflow.set_tracking_uri(mlflow_server)  # runs:/RUN/model finds the run's logged model through the global URI
    model = Path(download_artifacts(f"runs:/{job.run_id}/model", dst_path=str(artifacts / "logged-model")))
    files = [p for p in artifacts.rglob("*") if p.is_file()]
    assert any(p.name == "MLmodel" for p in model.rglob("*")) and any(p.suffix == ".json" for p in files)
    blobs = {f"artifact {p.relative_to(artifacts)}": p.read_bytes() for p in files}
    ray_logs = [p for p in ray_head.logs.rglob("*") if p.is_file()]
    assert any(p.name == f"job-driver-{job.job_id}.log" for p in ray_logs)
    blobs |= {f"Ray log {p.relative_to(ray_head.logs)}": p.read_bytes() for p in ray_logs}
    blobs |= {f"server log {p.name}": p.read_bytes() for p in scratch.glob("*.log")}
    for name, secret in creds.values().items():
        leaks = [where for where, text in texts.items() if secret in text]
        leaks += [where for where, blob in blobs.items() if secret.encode() in blob]
        assert not leaks, f"${name} appears in {leaks}"


def test_s3_store_accepts_only_the_configured_credentials(s3: S3, creds: Credentials) -> None:
    from botocore.exceptions import ClientError

    wrong = S3(s3.endpoint).client(Credentials(creds.access_key, "not-the-secret", creds.mlflow_token))
    with pytest.raises(ClientError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        wrong.list_objects_v2(Bucket=BUCKET)


def test_s3_script_refuses_to_start_without_credentials(scratch: Path) -> None:
    env = base_env(scratch) | {"METAPIPE_S3_DIR": str(scratch / "unused")}
    refused = subprocess.run([str(ROOT / "mlflow" / "s3.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "AWS_SECRET_ACCESS_KEY" in refused.stderr
    assert not (scratch / "unused").exists()


def test_ray_job_stop_ends_the_run_with_a_final_checkpoint_and_submit_resume_finishes_it(
    job: Job, client_env: dict[str, str], ray_head: RayHead
) -> None:
    """``ray job stop`` sends the driver SIGTERM: it writes checkpoints/latest, marks the run KILLED and exits
    within the RAY_JOB_STOP_WAIT_TIME_S the submission sets (Ray's 3 s would SIGKILL it mid-upload);
    ``submit --resume RUN_ID`` then continues the same run on the cluster to its (new) last step."""
    from ray.job_submission import JobSubmissionClient

    from pipeline.runtime.submit import FINAL

    def run_to(steps: int) -> list[str]:
        kept = [item for item in TRAIN if item.split("=")[0] not in {"name", "train.steps", "train.val_every", "train.checkpoint_every"}]
        return STORE + kept + ["name=it-stopped", f"train.steps={steps}", "train.val_every=100000", "train.checkpoint_every=100000"]

    started = cli(["submit", CONFIG, *sets(run_to(100000)), "--address", ray_head.address], client_env, timeout=300)
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = run_id_in(started.stdout)
    job_id = next(line.split(": ", 1)[1] for line in started.stdout.splitlines() if line.startswith("job_id: "))
    tracking = MlflowClient(client_env["MLFLOW_TRACKING_URI"])
    wait_until(lambda: tracking.get_metric_history(run_id, "train/loss"), "the stopped run's first metrics", 180)
    jobs = JobSubmissionClient(ray_head.address)
    assert jobs.stop_job(job_id)
    wait_until(lambda: str(jobs.get_job_status(job_id).value) in FINAL, "the stopped job's end", 90)
    logs = jobs.get_job_logs(job_id)
    assert "terminated (SIGTERM) at step" in logs and "checkpoint written, run marked KILLED" in logs, logs[-3000:]
    assert tracking.get_run(run_id).info.status == "KILLED"
    # checkpoint_every is past the end: the only checkpoint is the one SIGTERM wrote
    assert {a.path for a in tracking.list_artifacts(run_id, "checkpoints")} == {"checkpoints/latest"}

    stopped_at = int(logs.split("terminated (SIGTERM) at step ")[1].split(":")[0])
    args = ["submit", CONFIG, *sets(run_to(stopped_at + 3)), "--address", ray_head.address, "--resume", run_id, "--follow"]
    returncode, output, _ = submit_and_follow(args, client_env, timeout=300)
    assert returncode == 0, output[-4000:]
    assert f"resuming run {run_id} after step {stopped_at}" in output
    assert tracking.get_run(run_id).info.status == "FINISHED"
    assert max(m.step for m in tracking.get_metric_history(run_id, "train/loss")) == stopped_at + 3
