"""MetaNet, the Meta-LSTM, ProtoNets and carried Reptile through the whole pipeline: store, parameter server and worker on
local Ray, MLflow, export."""
from __future__ import annotations

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.build import build_learner
from pipeline.config import validate
from pipeline.evaluation import evaluate
from pipeline.export.directory import load
from pipeline.runtime import driver
from pipeline.runtime.runs import load_run
from tasks.fewshot import labels
from tasks.store.parquet import open_store
from tests.helpers import small_omniglot_run
from tests.pipeline.runtime.truncated_run import carried_reptile_config

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


def test_carried_reptile_meta_tests_on_the_workers_from_worker_slot_0s_state(tmp_path) -> None:
    """Two Ray workers, each carrying its own inner Adam: the meta-test on the workers adapts every test task from
    worker slot 0's state in the best checkpoint (shipped to both), giving the scores of ``pipeline evaluate`` in one
    process; the export holds that state."""
    config = carried_reptile_config(tmp_path, steps=2, val_every=2, checkpoint_every=2)
    result = driver.train(config, export_dir=tmp_path / "export", progress=False)
    _, params, state = load_run(result.run_id, config.tracking.uri, "best")
    test = open_store(config.store.path).read_split("test")
    learner = build_learner(config)
    assert list(result.test.scores) == pytest.approx(evaluate(learner, params, test, state).scores, rel=1e-5)
    assert list(result.test.scores) != pytest.approx(evaluate(learner, params, test).scores, rel=1e-3)
    assert set(load(tmp_path / "export").state) == set(state)
