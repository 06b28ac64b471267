"""Truncated learners in process: L2L's trajectories span server steps and new episodes come only when one ends;
carried Reptile reads new episodes every step while its inner Adam state goes on; for both, a replaced pool or a
resumed run goes on with the same losses (L2L also in async mode). Carried Reptile's meta-test adapts from worker
slot 0's inner Adam state in training, in ``pipeline evaluate`` and in its export alike."""
from __future__ import annotations

import json
import math
import re

import mlflow.pyfunc
import pytest
import torch
from mlflow.tracking import MlflowClient

import pipeline
from pipeline.build import build_learner
from pipeline.cli import main
from pipeline.evaluation import evaluate, score
from pipeline.export.directory import STATE
from pipeline.runtime import checkpoint
from pipeline.runtime.driver import resumed_checkpoint, run
from pipeline.runtime.flat_buffer import Layout
from pipeline.runtime.local import LocalPool
from pipeline.runtime.pool import split_batch
from pipeline.runtime.runs import load_run
from pipeline.runtime.server import ParameterServer
from pipeline.runtime.worker import EpisodeWorker
from pipeline.tracking.mlflow_tracker import MlflowTracker
from tasks.store.parquet import open_store, precompute
from tests.pipeline.runtime.truncated_run import carried_reptile_config, l2l_config

CONFIGS = {"l2l": l2l_config, "reptile-carried": carried_reptile_config}


def fresh_pool(config) -> LocalPool:
    precompute(config, progress=False)
    layout = Layout.of(build_learner(config).init(config.seed))
    return LocalPool(config, ParameterServer.fresh(layout.flatten(build_learner(config).init(config.seed))), [None] * config.train.workers)


def losses(pool: LocalPool, steps: int) -> list[list[float]]:
    return [[r.metrics["loss"] for r in pool.step_all()] for _ in range(steps)]


def test_a_trajectory_spans_its_truncations_and_reads_new_episodes_only_at_its_end(tmp_path):
    pool = fresh_pool(l2l_config(tmp_path, steps=6))
    seen = []
    for _ in range(6):
        reports = pool.step_all()
        position = pool.positions[0]
        seen.append((position["reader"]["episodes"], None if position["carry"] is None else int(position["carry"]["step"])))
        assert reports[0].metrics["initial_loss"] != reports[0].metrics["final_loss"]
    # the reader stands before the running trajectory's 2 episodes until it ends
    assert seen == [(0, 2), (0, 4), (2, None), (2, 2), (2, 4), (4, None)]
    pool.stop()


def test_carried_reptile_reads_new_episodes_every_step_and_its_inner_adam_goes_on(tmp_path):
    pool = fresh_pool(carried_reptile_config(tmp_path, steps=3))
    seen = []
    for _ in range(3):
        pool.step_all()
        seen.append([(p["reader"]["episodes"], int(p["carry"]["step"])) for p in pool.positions])
    # 2 episodes a worker a step, 2 inner steps a task: 4 more Adam steps each server step
    assert seen == [[(2, 4), (2, 4)], [(4, 8), (4, 8)], [(6, 12), (6, 12)]]
    pool.stop()


@pytest.mark.parametrize("config_of", list(CONFIGS.values()), ids=list(CONFIGS))
def test_workers_replaced_mid_trajectory_go_on_with_the_same_losses(tmp_path, config_of):
    """Every worker replaced (as a dead one is) at step 4 (L2L: in its second trajectory): nothing lost or repeated."""
    config = config_of(tmp_path, steps=8)
    undisturbed = fresh_pool(config)
    expected = losses(undisturbed, 8)
    undisturbed.stop()
    pool = fresh_pool(config)
    got = losses(pool, 4)
    assert pool.positions[0]["carry"] is not None
    pool.restore(pool.state(), pool.positions)  # new workers from the positions the pool kept
    got += losses(pool, 4)
    pool.stop()
    assert got == expected


@pytest.mark.parametrize("config_of", list(CONFIGS.values()), ids=list(CONFIGS))
def test_a_resumed_run_has_the_losses_of_an_uninterrupted_one(tmp_path, config_of):
    """A run stopped at step 4 (L2L: mid-trajectory; the checkpoint holds the carries) and resumed to step 8."""

    def train(path, steps, resume=None):
        config = config_of(path, steps=steps, val_every=4, checkpoint_every=4)
        tracker = MlflowTracker(config.tracking, config.name, run_id=resume)
        ckpt = resumed_checkpoint(config, tracker, path / "resume") if resume else None
        run(config, precompute(config, progress=False), tracker, lambda s, p, _: LocalPool(config, s, p), resume=ckpt, progress=False)
        return {m.step: m.value for m in MlflowClient(config.tracking.uri).get_metric_history(tracker.run_id, "train/loss")}, tracker.run_id

    full, _ = train(tmp_path / "a", 8)
    _, run_id = train(tmp_path / "b", 4)
    resumed, _ = train(tmp_path / "b", 8, resume=run_id)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), step


def async_losses(config, steps: int, lost_at: int | None = None) -> list[float]:
    """Each step's loss in async mode on the in-process pool: worker ``k % 2`` at step ``k`` (the in-process
    pool's async order), each push applied alone. At step ``lost_at`` the worker's push lands, its report is lost,
    and a new worker started at its last position (its trajectory's episodes and carry) redoes the call."""
    pool = fresh_pool(config)
    got = []
    try:
        for k in range(steps):
            i = k % pool.size
            handle = pool.submit(i)
            if k == lost_at:
                assert pool.positions[i]["carry"] is not None  # mid-trajectory
                pool._report(i, handle)  # its push lands, its report is lost
                pool.workers[i].close()
                batch = split_batch(config.train.meta_batch, pool.size)[i]
                pool.workers[i] = EpisodeWorker(i, pool.size, config.model_dump(mode="json"), batch, pool.positions[i])
            got.append(pool.result(i, handle).metrics["loss"])
        assert pool.stats()["version"] == steps and pool.stats()["duplicate_shares"] == (lost_at is not None)
    finally:
        pool.stop()
    return got


@pytest.mark.parametrize("config_of", list(CONFIGS.values()), ids=list(CONFIGS))
def test_async_truncations_go_on_with_the_same_losses_when_a_worker_is_replaced_mid_trajectory(tmp_path, config_of):
    """Worker 1 lost after its push of its second step landed (step 4 of 8; L2L: its trajectory's second
    truncation): its replacement redoes that step from the carry of the first (at the parameters the lost call had,
    and not applied again) and goes on with the carry it computed: the losses of an undisturbed run."""
    config = config_of(tmp_path, steps=8, mode="async", max_staleness=1)
    undisturbed = async_losses(config, 8)
    assert all(math.isfinite(loss) for loss in undisturbed) and len(set(undisturbed)) == 8
    assert async_losses(config, 8, lost_at=3) == undisturbed


def test_carried_reptile_meta_tests_from_worker_slot_0s_state_in_training_evaluate_and_its_export(tmp_path, capsys):
    """A run of 2 workers (each carrying its own inner Adam): validation, the meta-test, ``pipeline evaluate`` (one
    place, from the best checkpoint) and the export with its pyfunc model all adapt from worker slot 0's state in the
    best checkpoint, and give the same scores; a fresh Adam gives others; an export without the state adapts fresh."""
    config = carried_reptile_config(tmp_path, steps=4, val_every=2, checkpoint_every=2)
    tracker = MlflowTracker(config.tracking, config.name)
    result = run(config, precompute(config, progress=False), tracker, lambda s, p, _: LocalPool(config, s, p), export_dir=tmp_path / "export", progress=False)
    _, params, state = load_run(tracker.run_id, config.tracking.uri, "best")
    best = checkpoint.load(tracker.download("checkpoints/best", tmp_path / "best"))
    slots = [p["carry"] for p in best.positions]
    assert all(torch.equal(state[k], slots[0][k]) for k in state) and not torch.equal(state["exp_avg.layer0.weight"], slots[1]["exp_avg.layer0.weight"])
    learner, store = build_learner(config), open_store(config.store.path)
    test, val = store.read_split("test"), store.read_split("val")
    assert evaluate(learner, params, val, state).mean == pytest.approx(best.best_val, rel=1e-6)  # validation: the same state
    again, fresh = evaluate(learner, params, test, state), evaluate(learner, params, test)
    assert again.scores == pytest.approx(result.test.scores, rel=1e-5)
    assert min(abs(a - b) for a, b in zip(fresh.scores, again.scores)) > 1e-4
    for flags, expected in [([], again), (["--set", "algorithm.eval_state=fresh"], fresh)]:
        assert main(["evaluate", tracker.run_id, "--tracking-uri", config.tracking.uri, "--episodes", "4", *flags]) == 0
        assert capsys.readouterr().out.strip().endswith(f"test {expected}")
    other = ["--set", 'algorithm.adapt_params=["layer1.*"]']  # the carry holds the state of every parameter
    assert main(["evaluate", tracker.run_id, "--tracking-uri", config.tracking.uri, "--episodes", "4", *other]) == 2
    assert re.search(r"the inner state its checkpoint carried does not fit .*--set algorithm.eval_state=fresh", capsys.readouterr().err)
    assert main(["evaluate", tracker.run_id, "--tracking-uri", config.tracking.uri, "--episodes", "4", *other, "--set", "algorithm.eval_state=fresh"]) == 0

    exported = pipeline.load(tmp_path / "export")
    assert (tmp_path / "export" / STATE).is_file() and set(exported.state) == set(state)

    def served(predict) -> list[float]:
        return [score(predict(test[i]), test.query_y[i]) for i in range(len(test))]

    assert served(lambda e: exported.adapt(e.support_x[0], e.support_y[0])(e.query_x[0])) == pytest.approx(again.scores, rel=1e-5)
    mlflow.set_tracking_uri(config.tracking.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{tracker.run_id}/model")
    requests = [{"support_x": e.support_x[0].tolist(), "support_y": e.support_y[0].tolist(), "query_x": e.query_x[0].tolist()} for e in map(test.__getitem__, range(len(test)))]
    assert [score(torch.tensor(model.predict(r)), test.query_y[i]) for i, r in enumerate(requests)] == pytest.approx(again.scores, rel=1e-5)

    meta = json.loads((tmp_path / "export" / "export.json").read_text())
    del meta["eval_state_sha256"]  # an export written before the state was exported
    (tmp_path / "export" / "export.json").write_text(json.dumps(meta))
    (tmp_path / "export" / STATE).unlink()
    old = pipeline.load(tmp_path / "export")
    assert old.state is None
    assert served(lambda e: old.adapt(e.support_x[0], e.support_y[0])(e.query_x[0])) == pytest.approx(fresh.scores, rel=1e-5)
