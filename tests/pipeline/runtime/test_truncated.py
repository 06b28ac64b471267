"""Truncated learners in process: L2L's trajectories span server steps and new episodes come only when one ends;
carried Reptile reads new episodes every step while its inner Adam state goes on; for both, a replaced pool or a
resumed run goes on with the same losses."""
from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pipeline.build import build_learner
from pipeline.runtime.driver import run
from pipeline.runtime.flat_buffer import Layout
from pipeline.runtime.local import LocalPool
from pipeline.runtime.server import ParameterServer
from pipeline.tracking.mlflow_tracker import MlflowTracker
from tasks.store.parquet import precompute
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
        run(config, precompute(config, progress=False), tracker, lambda s, p, _: LocalPool(config, s, p), resumed=resume is not None, progress=False)
        return {m.step: m.value for m in MlflowClient(config.tracking.uri).get_metric_history(tracker.run_id, "train/loss")}, tracker.run_id

    full, _ = train(tmp_path / "a", 8)
    _, run_id = train(tmp_path / "b", 4)
    resumed, _ = train(tmp_path / "b", 8, resume=run_id)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        assert resumed[step] == pytest.approx(full[step], rel=1e-6), step
