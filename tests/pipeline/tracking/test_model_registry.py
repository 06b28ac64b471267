"""Registering a run's model: a new version with the test metrics, refused for unusable runs."""
from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tracking.model_registry import (
    RegistryError,
    description,
    register,
    run_link,
    version_tags,
)

METRICS = {"test/accuracy": 0.875, "test/accuracy_ci95": 0.0123, "test/episodes": 600.0}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A SQLite tracking store with one experiment whose artifacts live in a temporary folder."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    experiment = MlflowClient(uri).create_experiment("metapipe", artifact_location=(root / "artifacts").as_uri())
    return uri, experiment


def make_run(store: tuple[str, str], tmp_path: Path, model: bool = True, status: str = "FINISHED") -> str:
    uri, experiment = store
    client = MlflowClient(uri)
    run = client.create_run(experiment, run_name="tiny-maml", tags={"metapipe.algorithm": "maml"})
    for key, value in METRICS.items():
        client.log_metric(run.info.run_id, key, value, step=20)
    client.log_metric(run.info.run_id, "train/loss", 0.5, step=20)
    (tmp_path / "model").mkdir(parents=True)
    (tmp_path / "model" / "MLmodel").write_text("flavors: {}\n")
    if model:  # a logged model of the run, as Model.log makes it
        logged = client.create_logged_model(experiment, name="model", source_run_id=run.info.run_id)
        client.log_model_artifacts(logged.model_id, str(tmp_path / "model"))
    else:  # only a plain artifact folder, which the UI does not show as a model
        client.log_artifacts(run.info.run_id, str(tmp_path / "model"), "model")
    if status != "RUNNING":
        client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_version_carries_test_metrics_run_and_source(store: tuple[str, str], tmp_path: Path) -> None:
    uri, experiment = store
    run_id = make_run(store, tmp_path)
    version = register(run_id, "tiny-maml", uri)
    assert version.run_id == run_id
    (logged,) = MlflowClient(uri).search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")
    assert version.source == logged.artifact_location
    assert version.tags["test/accuracy"] == "0.875"
    assert version.tags["test/accuracy_ci95"] == "0.0123"
    assert version.tags["metapipe.run_id"] == run_id
    assert version.tags["metapipe.algorithm"] == "maml"
    assert "train/loss" not in version.tags
    assert "test/accuracy = 0.875 ± 0.012 (95% CI) over 600 held-out episodes" in version.description
    stored = MlflowClient(uri, registry_uri=uri).get_model_version("tiny-maml", version.version)
    assert stored.tags == version.tags and stored.run_id == run_id


def test_registering_again_adds_a_version(store: tuple[str, str], tmp_path: Path) -> None:
    uri, _ = store
    first = register(make_run(store, tmp_path / "a"), "twice", uri)
    second = register(make_run(store, tmp_path / "b"), "twice", uri)
    assert (int(first.version), int(second.version)) == (1, 2)


def test_run_link_only_for_a_server(store: tuple[str, str]) -> None:
    uri, experiment = store
    client = MlflowClient(uri)
    run = client.get_run(client.create_run(experiment).info.run_id)
    link = run_link("http://127.0.0.1:5000/", run)
    assert link == f"http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run.info.run_id}"
    assert run_link(uri, run) is None


def test_description_and_tags_of_a_run_without_test_metrics(store: tuple[str, str], tmp_path: Path) -> None:
    uri, experiment = store
    client = MlflowClient(uri)
    run = client.get_run(client.create_run(experiment, run_name="bare").info.run_id)
    assert version_tags(run) == {"metapipe.run_id": run.info.run_id}
    assert "no test metrics logged" in description(run, None)


@pytest.mark.parametrize(
    ("model", "status", "message"),
    [(False, "FINISHED", "no logged model"), (True, "RUNNING", "is RUNNING"), (True, "FAILED", "is FAILED")],
    ids=["no-model", "still-running", "failed"],
)
def test_unusable_runs_are_refused(store: tuple[str, str], tmp_path: Path, model: bool, status: str, message: str) -> None:
    uri, _ = store
    run_id = make_run(store, tmp_path, model=model, status=status)
    with pytest.raises(RegistryError, match=message) as refused:
        register(run_id, "refused", uri)
    assert f"run {run_id}" in str(refused.value)


def test_unknown_run_is_named(store: tuple[str, str]) -> None:
    with pytest.raises(RegistryError, match="run 0000ffff not found"):
        register("0000ffff", "nothing", store[0])
