"""MetaNet, the Meta-LSTM and ProtoNets through the whole pipeline: store, parameter server and worker on local Ray, MLflow, export."""
from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.build import build_learner
from pipeline.config import validate
from pipeline.export.directory import load
from pipeline.runtime import driver
from tasks.fewshot import labels
from tests.helpers import small_omniglot_run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_ray")]


def test_metanet_trains_through_the_parameter_server_and_exports(tmp_path):
    algorithm = {"name": "metanet", "conv_layers": 2, "filters": 4, "hidden": 8, "representation": 8, "rep_steps": 3}
    config = validate(small_omniglot_run(tmp_path, "test-metanet", algorithm=algorithm))
    result = driver.train(config, export_dir=tmp_path / "export", progress=False)
    assert result.steps == 6 and 0.0 <= result.test.mean <= 1.0
    exported = load(tmp_path / "export")
    assert set(exported.params) == set(build_learner(config).init(0))
    gen = torch.Generator().manual_seed(9)
    predict = exported.adapt(torch.rand(5, 1, 28, 28, generator=gen), labels(1, 5, 1)[0])
    assert predict(torch.rand(10, 1, 28, 28, generator=gen)).shape == (10, 5)


def test_meta_lstm_trains_through_the_parameter_server_logs_its_gates_and_exports(tmp_path) -> None:
    config = validate(
        small_omniglot_run(
            tmp_path, "test-meta-lstm", model={"network": "conv4", "filters": 4}, algorithm={"name": "meta_lstm", "inner_steps": 3}
        )
    )
    result = driver.train(config, export_dir=tmp_path / "export", progress=False)
    assert result.steps == 6 and 0.0 <= result.test.mean <= 1.0
    plots = {a.path for a in MlflowClient(config.tracking.uri).list_artifacts(result.run_id, "plots")}
    assert plots == {"plots/episodes.png", "plots/gates.png", "plots/learning_curve.png"}
    exported = load(tmp_path / "export")
    assert set(exported.params) == set(build_learner(config).init(0))


def test_protonet_trains_through_the_parameter_server_and_exports(tmp_path) -> None:
    model = {"network": "conv4", "filters": 4, "downsample": "maxpool"}
    config = validate(small_omniglot_run(tmp_path, "test-protonet", model=model, algorithm={"name": "protonet"}))
    result = driver.train(config, export_dir=tmp_path / "export", progress=False)
    assert result.steps == 6 and 0.0 <= result.test.mean <= 1.0
    exported = load(tmp_path / "export")
    assert set(exported.params) == set(build_learner(config).init(0)) and not any(k.startswith("head.") for k in exported.params)
    gen = torch.Generator().manual_seed(9)
    size = config.task_spec.input_shape[1]
    predict = exported.adapt(torch.rand(5, 1, size, size, generator=gen), labels(1, 5, 1)[0])
    assert predict(torch.rand(10, 1, size, size, generator=gen)).shape == (10, 5)
