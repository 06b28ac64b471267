"""The job spec of ``python -m pipeline submit``: built and checked locally, before any cluster work."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.runtime.submit import (
    EXCLUDES,
    FORWARDED_ENV,
    STOP_WAIT_S,
    SubmitError,
    exit_code,
    job_spec,
    run_id_in,
)

CONFIG = """
name: tiny
task: {name: sinusoid, shots: 5, queries: 5}
store: {path: s3://bucket/episodes, train_episodes: 10, val_episodes: 2, test_episodes: 2}
train: {steps: 3, meta_batch: 2}
"""
ENV = {
    "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t-value-xyz",
    "HOME": "/home/someone",
    "PATH": "/usr/bin",
    "AWS_REGION": "",
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text(CONFIG)
    return tmp_path


def test_entrypoint_trains_the_config_by_its_path_inside_the_project(project: Path) -> None:
    spec = job_spec(project / "configs" / "tiny.yaml", ["train.steps=20", "name=a b"], ENV, root=project)
    assert shlex.split(spec.entrypoint) == [
        "python", "-m", "pipeline", "train", "configs/tiny.yaml", "--set", "train.steps=20", "--set", "name=a b",
    ]
    assert spec.metadata == {"metapipe.config": "configs/tiny.yaml", "metapipe.name": "a b"}


def test_project_is_the_working_dir_without_environments_data_or_stores(project: Path) -> None:
    spec = job_spec(project / "configs" / "tiny.yaml", [], ENV, root=project)
    assert spec.runtime_env["working_dir"] == str(project.resolve())
    for name in (".venv", ".git", "episodes", "mlruns", "mlflow.db"):
        assert name in spec.runtime_env["excludes"]
    assert set(spec.runtime_env) == {"working_dir", "excludes", "env_vars"}
    assert list(EXCLUDES) == spec.runtime_env["excludes"]


def test_only_tracking_and_storage_variables_reach_the_job(project: Path) -> None:
    env_vars = job_spec(project / "configs" / "tiny.yaml", [], ENV, root=project).runtime_env["env_vars"]
    assert env_vars == {k: v for k, v in ENV.items() if k in FORWARDED_ENV and v} | {"RAY_JOB_STOP_WAIT_TIME_S": STOP_WAIT_S}
    assert "HOME" not in env_vars and "PATH" not in env_vars
    assert "AWS_REGION" not in env_vars, "empty variables are not forwarded"


def test_credentials_never_appear_on_the_command_line(project: Path) -> None:
    spec = job_spec(project / "configs" / "tiny.yaml", [], ENV, root=project)
    assert ENV["AWS_SECRET_ACCESS_KEY"] not in spec.entrypoint
    leaky = f"tracking.uri=http://user:{ENV['AWS_SECRET_ACCESS_KEY']}@127.0.0.1:5000"
    with pytest.raises(SubmitError, match=r"\$AWS_SECRET_ACCESS_KEY"):
        job_spec(project / "configs" / "tiny.yaml", [leaky], ENV, root=project)


def test_config_outside_the_project_is_refused(project: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("elsewhere") / "tiny.yaml"
    outside.write_text(CONFIG)
    with pytest.raises(SubmitError, match="must lie inside the project"):
        job_spec(outside, [], ENV, root=project)


def test_a_base_outside_the_project_is_refused(project: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp("elsewhere") / "task.yaml"
    base.write_text(CONFIG)
    (project / "configs" / "run.yaml").write_text(f"base: {base}\nname: run\n")
    with pytest.raises(SubmitError, match=f"its base {base} must lie inside the project"):
        job_spec(project / "configs" / "run.yaml", [], ENV, root=project)


def test_a_run_without_a_tracking_server_is_refused(project: Path) -> None:
    env = {k: v for k, v in ENV.items() if k != "MLFLOW_TRACKING_URI"}
    with pytest.raises(SubmitError, match="MLFLOW_TRACKING_URI"):
        job_spec(project / "configs" / "tiny.yaml", [], env, root=project)
    spec = job_spec(project / "configs" / "tiny.yaml", ["tracking.uri=http://10.0.0.5:5000"], env, root=project)
    assert "MLFLOW_TRACKING_URI" not in spec.runtime_env["env_vars"]


def test_config_is_validated_before_submission(project: Path) -> None:
    with pytest.raises(ConfigError, match="train.steps"):
        job_spec(project / "configs" / "tiny.yaml", ["train.steps=0"], ENV, root=project)


def test_local_store_is_flagged_for_multi_node_clusters(project: Path) -> None:
    config = project / "configs" / "tiny.yaml"
    assert job_spec(config, [], ENV, root=project).warnings == ()
    (warning,) = job_spec(config, ["store.path=episodes/tiny"], ENV, root=project).warnings
    assert "episodes/tiny" in warning and "s3://" in warning


def test_run_id_is_read_from_the_driver_log_line() -> None:
    log = "precomputing...\nrun_id: 0123abcd4567ef\n 40%|####   | 8/20\n"
    assert run_id_in(log) == "0123abcd4567ef"
    assert run_id_in("no run yet\nstarting run_id soon\n") is None


def test_exit_status_follows_the_job() -> None:
    assert exit_code("SUCCEEDED") == 0
    assert exit_code("FAILED") == 1
    assert exit_code("STOPPED") == 1


def test_cli_reports_a_refused_submission_in_one_line(
    project: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    status = main(["submit", str(project / "configs" / "tiny.yaml"), "--address", "http://127.0.0.1:1"])
    assert status == 2
    assert "must lie inside the project" in capsys.readouterr().err


def test_ray_job_stop_waits_for_the_final_checkpoint_unless_the_submitter_says_otherwise(project: Path) -> None:
    config = project / "configs" / "tiny.yaml"
    assert job_spec(config, [], ENV, root=project).runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "60"
    own = job_spec(config, [], {**ENV, "RAY_JOB_STOP_WAIT_TIME_S": "5"}, root=project)
    assert own.runtime_env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"] == "5"


def test_resume_continues_the_run_in_the_job(project: Path) -> None:
    spec = job_spec(project / "configs" / "tiny.yaml", ["train.steps=40"], ENV, root=project, resume="0123abcd")
    assert shlex.split(spec.entrypoint)[-4:] == ["--set", "train.steps=40", "--resume", "0123abcd"]


def test_resuming_an_unknown_run_is_refused_before_anything_is_submitted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    # a dead address: any cluster call would fail with another message
    status = main(["submit", "sinusoid_maml", "--address", "http://127.0.0.1:1", "--resume", "0123abcd"])
    err = capsys.readouterr().err
    assert status == 2 and "run 0123abcd: not found" in err, err
