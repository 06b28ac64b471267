"""The driver's run in process (LocalPool, MLflow on SQLite): every ending gets its learning curve and status."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc
import pytest
from mlflow.entities import LoggedModelStatus
from mlflow.tracking import MlflowClient

from pipeline.errors import Terminated
from pipeline.runtime.driver import run
from pipeline.runtime.local import LocalPool
from pipeline.tracking.mlflow_tracker import MlflowTracker
from tasks.store.parquet import precompute
from tests.pipeline.runtime.sinusoid_run import sinusoid_config


class InterruptedAt3(LocalPool):
    """Raises ``error`` when asked for step 4 (steps 1-3 are done and logged)."""

    error: BaseException = KeyboardInterrupt()

    def step_all(self):
        if self.server.version() == 3:
            raise self.error
        return super().step_all()


class FailsAt3(InterruptedAt3):
    error = RuntimeError("the store went away")


def train_in_process(tmp_path, pool_class, progress=False, **train):
    config = sinusoid_config(tmp_path, train_episodes=1000, **{"steps": 6, "val_every": 3, "checkpoint_every": 3, **train})
    tracker = MlflowTracker(config.tracking, config.name)
    result = run(config, precompute(config), tracker, lambda s, p, _: pool_class(config, s, p), export_dir=tmp_path / "export", progress=progress)
    return result, MlflowClient(config.tracking.uri), tracker.run_id


def test_a_finished_run_is_tested_exported_drawn_and_described(tmp_path, capsys):
    result, client, run_id = train_in_process(tmp_path, LocalPool, progress=True, log_every=3)
    lines = capsys.readouterr().err.splitlines()  # not a terminal: plain progress lines, as a job log shows them
    steps = [line for line in lines if line.startswith("step ")]
    assert [line.split("  ")[0] for line in steps] == ["step 3/6 (50%)", "step 6/6 (100%)"] and "val mse" in steps[0]
    assert "meta-test: 40 episodes..." in lines and "\r" not in "".join(lines)
    run_info = client.get_run(run_id)
    assert run_info.info.status == "FINISHED" and result.steps == 6 and result.export_dir == tmp_path / "export"
    assert run_info.data.metrics["test/episodes"] == 40 and run_info.data.params["train.workers"] == "2"
    assert [m.step for m in client.get_metric_history(run_id, "val/mse")] == [3, 6]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"checkpoints", "export", "plots", "test_results.json", "test_episodes.json"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert plots == {"plots/learning_curve.png", "plots/episodes.png", "plots/regression_fits.png"}

    # What the MLflow UI shows of the run: its logged model, data set, description, source, per-episode table.
    experiment = client.get_experiment(run_info.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run_info.data.tags["mlflow.note.content"].startswith("maml on sinusoid (regression), network mlp: 6 steps")
    assert run_info.data.tags["mlflow.source.type"] == "LOCAL" and run_info.data.tags["mlflow.source.name"]
    (data_set,) = run_info.inputs.dataset_inputs
    assert json.loads(data_set.dataset.source) == {"uri": str(tmp_path / "episodes")} and data_set.dataset.name == "episodes"
    assert not [key for key in run_info.data.metrics if key.startswith("faults/")]  # no fault: no fault charts

    (logged,) = client.search_logged_models([experiment.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert logged.name == "model" and logged.status == LoggedModelStatus.READY
    assert [o.model_id for o in run_info.outputs.model_outputs] == [logged.model_id]
    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    assert model.metadata.get_input_schema().input_names() == ["support_x", "support_y", "query_x"]
    table = json.loads(Path(client.download_artifacts(run_id, "test_episodes.json", str(tmp_path / "dl"))).read_text())
    assert table["columns"] == ["episode", "mse"] and len(table["data"]) == 40
    assert sum(row[1] for row in table["data"]) / 40 == pytest.approx(run_info.data.metrics["test/mse"])


@pytest.mark.parametrize("pool_class, error, status", [(InterruptedAt3, KeyboardInterrupt, "KILLED"), (FailsAt3, RuntimeError, "FAILED")], ids=["killed", "failed"])
def test_a_run_that_ends_early_gets_its_learning_curve(tmp_path, pool_class, error, status):
    with pytest.raises(error):
        train_in_process(tmp_path, pool_class)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run_info,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    run_id = run_info.info.run_id
    assert run_info.info.status == status
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/episodes.png", "plots/learning_curve.png"}
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/latest", "checkpoints/best"}


class InterruptedTwiceAt3(InterruptedAt3):
    """A second Ctrl-C while the final checkpoint is written."""

    def state(self):
        if self.server.version() == 3 and getattr(self, "interrupted", False):
            raise KeyboardInterrupt
        return super().state()

    def step_all(self):
        self.interrupted = self.server.version() == 3
        return super().step_all()


def test_a_second_interrupt_during_the_final_checkpoint_still_marks_the_run_killed(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        train_in_process(tmp_path, InterruptedTwiceAt3)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run_info,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run_info.info.status == "KILLED"
    assert "interrupted; the final checkpoint failed (a second signal), the last periodic one stands" in capsys.readouterr().err


class InterruptedThriceAt3(InterruptedTwiceAt3):
    """A third Ctrl-C while the actors are being stopped, after the second cut the final checkpoint short."""

    def stop(self):
        if getattr(self, "interrupted", False):
            self.interrupted = False
            raise KeyboardInterrupt
        super().stop()


def test_a_third_interrupt_while_the_actors_stop_still_marks_the_run_killed(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train_in_process(tmp_path, InterruptedThriceAt3)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run_info,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run_info.info.status == "KILLED" and run_info.info.end_time is not None


class TerminatedInMetaTest(LocalPool):
    """SIGTERM (as the driver's handler raises it) during the meta-test, after the last step."""

    error: BaseException = Terminated()

    def evaluate(self, split, episodes, flat, state=None):
        if split == "test":
            raise self.error
        return super().evaluate(split, episodes, flat, state)


class FailsInMetaTest(TerminatedInMetaTest):
    error = RuntimeError("a worker's disk is full")


@pytest.mark.parametrize("pool_class, error, status", [(TerminatedInMetaTest, Terminated, "KILLED"), (FailsInMetaTest, RuntimeError, "FAILED")], ids=["killed", "failed"])
def test_a_run_that_stops_after_its_last_step_is_marked_with_its_checkpoints(tmp_path, capsys, pool_class, error, status):
    from pipeline.runtime import checkpoint

    with pytest.raises(error):
        train_in_process(tmp_path, pool_class)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run_info,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    run_id = run_info.info.run_id
    assert run_info.info.status == status and "test/episodes" not in run_info.data.metrics
    told = "terminated (SIGTERM) after the last step, during the meta-test and export: run marked KILLED"
    assert (told in capsys.readouterr().err) == (status == "KILLED")
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert checkpoint.load(client.download_artifacts(run_id, "checkpoints/latest", str(tmp_path / "dl"))).server.version == 6


def test_reading_a_run_back_refuses_overrides_that_change_its_parameters(tmp_path):
    from pipeline.errors import RunError
    from pipeline.runtime.runs import load_run

    _, _, run_id = train_in_process(tmp_path, LocalPool)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config, params, state = load_run(run_id, uri, "best", ["algorithm.eval_inner_steps=3"])
    assert config.algorithm.eval_inner_steps == 3 and params and state is None  # MAML adapts from a fresh start
    with pytest.raises(RunError, match=f"run {run_id}: its checkpoint holds .* parameters, the learner of its config"):
        load_run(run_id, uri, "best", ["model.hidden=[8]"])


def test_export_with_set_writes_a_learner_that_adapts_as_told_and_refuses_set_for_a_registration(tmp_path, capsys):
    import pipeline
    from pipeline.cli import main

    _, _, run_id = train_in_process(tmp_path, LocalPool)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    out = tmp_path / "exported"
    assert main(["export", run_id, "--out", str(out), "--tracking-uri", uri, "--set", "algorithm.eval_inner_steps=3"]) == 0
    assert pipeline.load(out).config.algorithm.eval_inner_steps == 3
    assert main(["export", run_id, "--register", "sinusoid", "--tracking-uri", uri, "--set", "algorithm.eval_inner_steps=3"]) == 2
    assert "--set changes the --out DIR export; --register registers the model the run logged" in capsys.readouterr().err


def test_resuming_ignores_description_and_tracking_but_refuses_another_training_setting(tmp_path, monkeypatch):
    """... and resumes a checkpoint written before a setting existed (its config without the key, as a run checkpointed
    before Reptile's algorithm.eval_state) when the setting is at its default."""
    from pipeline.config import validate
    from pipeline.errors import ConfigError
    from pipeline.runtime import checkpoint, driver
    from pipeline.runtime.driver import resumed_checkpoint

    with pytest.raises(KeyboardInterrupt):
        train_in_process(tmp_path, InterruptedAt3)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (killed,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    raw = sinusoid_config(tmp_path, train_episodes=1000, steps=6, val_every=3, checkpoint_every=3).model_dump(mode="json")

    def resume(**changes):
        config = validate({**raw, **{k: {**raw[k], **v} if isinstance(v, dict) else v for k, v in changes.items()}})
        tracker = MlflowTracker(config.tracking, config.name, run_id=killed.info.run_id)
        return resumed_checkpoint(config, tracker, tmp_path / "resume")

    with pytest.raises(ConfigError, match=r"config differs from the checkpoint's at algorithm.inner_lr \(checkpoint 0.01, now 0.02\)"):
        resume(algorithm={"inner_lr": 0.02})
    def no_ray(config):
        raise AssertionError("Ray started before the resumed config was checked")

    monkeypatch.setattr(driver, "start_ray", no_ray)
    changed = validate({**raw, "algorithm": {**raw["algorithm"], "inner_lr": 0.02}})
    with pytest.raises(ConfigError, match=r"config differs from the checkpoint's at algorithm.inner_lr"):
        driver.train(changed, resume=killed.info.run_id, progress=False)
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    assert resume(description="resumed with a new description", tracking={"system_metrics_s": 5.0}).server.version == 3

    load = checkpoint.load

    def older(path):
        ckpt = load(path)
        del ckpt.config["algorithm"]["eval_inner_steps"]  # None, its default, in the config resumed with
        return ckpt

    monkeypatch.setattr(driver.checkpoint, "load", older)
    assert resume().server.version == 3
    with pytest.raises(ConfigError, match=r"differs from the checkpoint's at algorithm.eval_inner_steps \(checkpoint None, now 2\)"):
        resume(algorithm={"eval_inner_steps": 2})


def resume_in_process(tmp_path, run_id, steps, broken=False):
    """Resume the run ``train_in_process`` made to ``steps``; ``broken``: from its parameters x 10 (a sitting
    whose validation cannot beat the run's best)."""
    from dataclasses import replace

    from pipeline.runtime.driver import resumed_checkpoint
    from tasks.store.parquet import open_store

    config = sinusoid_config(tmp_path, train_episodes=1000, steps=steps, val_every=3, checkpoint_every=3)
    tracker = MlflowTracker(config.tracking, config.name, run_id=run_id)
    ckpt = resumed_checkpoint(config, tracker, tmp_path / "resume")
    if broken:
        ckpt = replace(ckpt, server=replace(ckpt.server, params=ckpt.server.params * 10))
    return config, run(config, open_store(config.store.path), tracker, lambda s, p, _: LocalPool(config, s, p), resume=ckpt, progress=False)


def evaluated_best(config, run_id):
    """What ``pipeline evaluate RUN_ID --episodes 40`` (the run's test_episodes) prints: its checkpoints/best tested."""
    from pipeline.build import build_learner
    from pipeline.evaluation import evaluate
    from pipeline.runtime.runs import load_run
    from tasks.store.parquet import open_store

    _, params, state = load_run(run_id, config.tracking.uri, "best")
    return evaluate(build_learner(config), params, open_store(config.store.path).read_split("test", limit=40), state)


def test_a_resumed_sitting_that_validates_nothing_better_meta_tests_the_runs_best(tmp_path):
    _, client, run_id = train_in_process(tmp_path, LocalPool)
    best = client.get_run(run_id).data.metrics["val/best"]
    config, result = resume_in_process(tmp_path, run_id, 9, broken=True)
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val/mse")}
    assert sorted(val) == [3, 6, 9] and val[9] > 10 * best  # the sitting validated, nothing better
    assert client.get_run(run_id).data.metrics["val/best"] == best
    assert result.test.mean == pytest.approx(evaluated_best(config, run_id).mean, rel=1e-6)
    assert result.test.mean < 10 * best  # not the broken parameters'


def test_a_resumed_run_whose_best_checkpoint_is_unreadable_keeps_the_best_of_the_new_sitting(tmp_path):
    """(a run stopped while uploading checkpoints/best): a warning, and the sitting's first validation is its best."""
    from urllib.parse import urlparse

    _, client, run_id = train_in_process(tmp_path, LocalPool)
    tensors = Path(urlparse(client.get_run(run_id).info.artifact_uri).path) / "checkpoints" / "best" / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8])  # cut short: its sha256 no longer matches state.json's
    with pytest.warns(UserWarning, match="resuming without the run's best checkpoint .*sha256 does not match"):
        config, result = resume_in_process(tmp_path, run_id, 9, broken=True)
    val = {m.step: m.value for m in client.get_metric_history(run_id, "val/mse")}
    assert client.get_run(run_id).data.metrics["val/best"] == val[9]
    assert result.test.mean == pytest.approx(evaluated_best(config, run_id).mean, rel=1e-6)


def test_sigterm_while_training_raises_terminated_and_the_previous_handler_comes_back():
    import os
    import signal
    import threading

    from pipeline.runtime.driver import _sigterm_as_interrupt

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))  # stands in for Ray's
    try:
        with pytest.raises(Terminated, match="SIGTERM"), _sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("SIGTERM did not interrupt training")
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]  # the handler from before is back
        errors = []
        thread = threading.Thread(target=lambda: errors.append(_sigterm_as_interrupt().__enter__()))
        thread.start()
        thread.join()
        assert errors == [None]  # off the main thread nothing is installed (signal.signal would raise there)
    finally:
        signal.signal(signal.SIGTERM, previous)
