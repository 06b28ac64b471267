"""Register a run's logged pyfunc model as a named version in the MLflow model registry.

The version carries the run's test metrics as tags and in its description, and
links back to the run, so whoever serves ``models:/NAME/VERSION`` knows how it
tested and where it came from.
"""
from __future__ import annotations

from typing import Any

from mlflow.entities import LoggedModel, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient

from pipeline.errors import RegistryError

MODEL_PATH = "model"
"""The name of the pyfunc model the driver logs as a model of the run (``runs:/RUN_ID/model``)."""
AWAIT_CREATION_S = 60
"""How long ``register`` waits for a new model version to be ready, in seconds."""


def test_metrics(run: Run) -> dict[str, float]:
    """The run's final ``test/...`` metrics."""
    return {key: value for key, value in run.data.metrics.items() if key.startswith("test/")}


def run_link(tracking_uri: str, run: Run) -> str | None:
    """The run's page on a tracking server's UI; None for stores without one (sqlite, files)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"


def version_tags(run: Run) -> dict[str, str]:
    """Tags of the model version: the test metrics, the source run and its algorithm."""
    tags = {key: repr(value) for key, value in sorted(test_metrics(run).items())}
    tags["metapipe.run_id"] = run.info.run_id
    algorithm = run.data.tags.get("metapipe.algorithm")
    if algorithm:
        tags["metapipe.algorithm"] = algorithm
    return tags


def description(run: Run, link: str | None) -> str:
    """One paragraph: what was tested, how well, and which run produced it."""
    metrics = test_metrics(run)
    means = sorted(k for k in metrics if not k.endswith("_ci95") and k != "test/episodes")
    parts = []
    for key in means:
        ci = metrics.get(f"{key}_ci95")
        parts.append(f"{key} = {metrics[key]:.4g}" + (f" ± {ci:.2g} (95% CI)" if ci is not None else ""))
    episodes = metrics.get("test/episodes")
    tested = "; ".join(parts) if parts else "no test metrics logged"
    if episodes is not None:
        tested += f" over {int(episodes)} held-out episodes"
    name = run.info.run_name or run.info.run_id
    return f"Meta-learner from run {name} ({run.info.run_id}): {tested}." + (f" Run: {link}" if link else "")


def register(run_id: str, name: str, tracking_uri: str) -> ModelVersion:
    """Register ``runs:/<run_id>/model`` as a new version of ``name`` and return it once it is ready
    (at most AWAIT_CREATION_S).

    Refuses runs that did not finish or have no logged model, naming the run.
    """
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as e:
        raise RegistryError(f"run {run_id} not found at {tracking_uri}: {e.message}") from None
    if run.info.status != "FINISHED":
        raise RegistryError(f"run {run_id} is {run.info.status}: only a FINISHED run's model can be registered")
    model = logged_model(client, run)
    _ensure_registered_model(client, name)
    link = run_link(tracking_uri, run)
    return client.create_model_version(
        name=name,
        source=model.artifact_location,  # not models:/ID, which a SQLite registry resolves through the global URI
        run_id=run_id,
        tags=version_tags(run),
        run_link=link,
        description=description(run, link),
        model_id=model.model_id,
        await_creation_for=AWAIT_CREATION_S,
    )


def logged_model(client: MlflowClient, run: Run) -> LoggedModel:
    """The run's pyfunc model ``MODEL_PATH`` (the last one logged); RegistryError naming the run when it has none."""
    models = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{MODEL_PATH}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        max_results=1,
    )
    if not models:
        raise RegistryError(f"run {run.info.run_id} has no logged model {MODEL_PATH!r}")
    return models[0]


def _ensure_registered_model(client: Any, name: str) -> None:
    try:
        client.create_registered_model(name, description="A metapipe meta-learner: adapt to a support set, predict its queries.")
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise RegistryError(f"cannot create registered model {name!r}: {e.message}") from None
