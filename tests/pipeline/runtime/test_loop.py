"""The step loop on the in-process pool: the same losses as the steps done by hand, restores, give-ups, and a
run resumed from an interrupt's checkpoint that applies every share once."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.build import build_learner
from pipeline.errors import TrainingError
from pipeline.runtime import checkpoint
from pipeline.runtime.callbacks import Checkpoints, PeriodicCheckpoint, RestorePoint, StepEnd
from pipeline.runtime.flat_buffer import Layout
from pipeline.runtime.local import LocalPool
from pipeline.runtime.loop import StepLoop
from pipeline.runtime.policy import MAX_SERVER_RESTORES, FailurePolicy
from pipeline.runtime.pool import ServerLost, ended_version, split_batch
from pipeline.runtime.server import ParameterServer
from pipeline.runtime.worker import EpisodeWorker
from pipeline.tracking.mlflow_tracker import MlflowTracker
from tasks.store.parquet import precompute
from tests.pipeline.runtime.sinusoid_run import sinusoid_config

STEPS = 5


class Record:
    """A callback keeping every step's metrics (a redone step's last)."""

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}

    def on_step(self, step: StepEnd) -> None:
        self.metrics[step.version] = dict(step.metrics)


def fresh_state(config):
    learner = build_learner(config)
    return ParameterServer.fresh(Layout.of(learner.init(config.seed)).flatten(learner.init(config.seed)))


def by_hand(config, steps: int) -> list[float]:
    """``steps`` sync steps with a ParameterServer and the workers called one after another, no loop."""
    t = config.train
    server = ParameterServer(fresh_state(config), config.optimizer, t.steps, t.workers, "sync")
    raw = config.model_dump(mode="json")
    workers = [EpisodeWorker(i, t.workers, raw, n) for i, n in enumerate(split_batch(t.meta_batch, t.workers))]
    losses = []
    for share in range(steps):
        reports = [w.step(server, share) for w in workers]
        losses.append(sum(r.metrics["loss"] * r.n_episodes for r in reports) / t.meta_batch)
    for w in workers:
        w.close()
    return losses


def start(config, tmp_path, pool_class=LocalPool, callbacks=(), every: int | None = None):
    """A loop over an in-process pool from version 0, checkpointing to an MLflow run on SQLite in ``tmp_path``."""
    precompute(config)
    state = fresh_state(config)
    pool = pool_class(config, state, [None] * config.train.workers)
    tracker = MlflowTracker(config.tracking, "loop")
    checkpoints = Checkpoints(pool, tracker, tmp_path / "scratch", config, None, RestorePoint(state, list(pool.positions)))
    callbacks = [*callbacks, *([PeriodicCheckpoint(checkpoints, every)] if every else [])]
    loop = StepLoop(pool, FailurePolicy(config.train.max_bad_grads), checkpoints, callbacks, config.train, 0)
    return loop, tracker


def test_sync_steps_through_the_loop_give_the_losses_of_the_steps_by_hand(tmp_path):
    config = sinusoid_config(tmp_path, train_episodes=1000, steps=STEPS)
    record = Record()
    loop, _ = start(config, tmp_path, callbacks=[record])
    loop.run()
    loop.pool.stop()
    assert loop.version == STEPS and sorted(record.metrics) == list(range(1, STEPS + 1))
    assert [record.metrics[s]["train/loss"] for s in range(1, STEPS + 1)] == pytest.approx(by_hand(config, STEPS), rel=1e-6)
    last = record.metrics[STEPS]
    assert last["server/staleness"] == 0 and last["faults/server_restores"] == 0 and last["throughput/episodes_per_s"] > 0


def test_async_steps_apply_one_push_each(tmp_path):
    config = sinusoid_config(tmp_path, train_episodes=1000, steps=STEPS, mode="async", max_staleness=1)
    record = Record()
    loop, _ = start(config, tmp_path, callbacks=[record])
    loop.run()
    loop.pool.stop()
    assert sorted(record.metrics) == list(range(1, STEPS + 1))
    assert all(m["server/staleness"] == 0 for m in record.metrics.values())


class ServerDiesAt4(LocalPool):
    """The server is lost once, right after applying step 4 (before the step's checkpoint)."""

    died = False

    def stats(self):
        stats = super().stats()
        if stats["version"] == 4 and not ServerDiesAt4.died:
            ServerDiesAt4.died = True
            raise ServerLost("the parameter server died (test)")
        return stats


def test_a_lost_server_is_restored_from_the_last_checkpoint_and_no_step_is_lost(tmp_path):
    """Lost after step 4 was applied but before the loop saw it: the loop had seen step 3, the last checkpoint
    is step 2, so one step it had seen is redone (and step 4 computed again)."""
    config = sinusoid_config(tmp_path, train_episodes=1000, steps=STEPS)
    record = Record()
    loop, _ = start(config, tmp_path, ServerDiesAt4, callbacks=[record], every=2)
    loop.run()
    loop.pool.stop()
    assert ServerDiesAt4.died and loop.server_restores == 1 and loop.steps_redone == 1
    assert [record.metrics[s]["train/loss"] for s in range(1, STEPS + 1)] == pytest.approx(by_hand(config, STEPS), rel=1e-6)
    assert record.metrics[STEPS]["faults/steps_redone"] == 1


class ServerAlwaysLost(LocalPool):
    def stats(self):
        raise ServerLost("the parameter server died (test)")


def test_a_server_lost_again_and_again_ends_the_run(tmp_path):
    loop, _ = start(sinusoid_config(tmp_path, train_episodes=1000, steps=STEPS), tmp_path, ServerAlwaysLost)
    with pytest.raises(TrainingError, match=f"died {MAX_SERVER_RESTORES + 1} times with no checkpoint between"):
        loop.run()
    loop.pool.stop()
    assert loop.server_restores == MAX_SERVER_RESTORES


def test_max_bad_grads_stop_the_loop_after_a_checkpoint_of_the_good_params(tmp_path):
    config = sinusoid_config(tmp_path, train_episodes=1000, steps=STEPS, max_bad_grads=3)
    config = config.model_copy(update={"algorithm": config.algorithm.model_copy(update={"inner_lr": 1e30})})
    loop, tracker = start(config, tmp_path)
    with pytest.raises(TrainingError, match=r"\d+ rejected gradients in a row \(train.max_bad_grads=3\).*non-finite"):
        loop.run()
    loop.pool.stop()
    tracker.flush()
    saved = checkpoint.load(tracker.download("checkpoints/latest", tmp_path / "dl"))
    assert saved.server.version == 0 and saved.server.rejected_nonfinite >= 3


class InterruptedWithACallOut(LocalPool):
    """At server version ``at`` the run is interrupted while worker ``worker``'s call is out: after its push
    landed (``lands``) or before, so the interrupt's checkpoint is written with a share the loop has no report of
    or, in sync mode, with worker 0's report of a step that never completed."""

    at, worker, lands = 3, 1, True

    def _report(self, i, handle):
        if self.server.version() == self.at and i == self.worker:
            if self.lands:
                super()._report(i, handle)
            raise KeyboardInterrupt
        return super()._report(i, handle)


class Untracked:
    """A tracker for ``Checkpoints`` alone: the checkpoints stay in the scratch folder."""

    def log_artifacts(self, local_dir, artifact_path):
        pass


def run_to_6(tmp_path, mode: str, pool_class=LocalPool, resume: bool = False):
    """The sinusoid run to step 6 in ``mode`` with a checkpoint every 3 steps, and on an interrupt (as the driver
    does); ``resume``: from ``tmp_path``'s last checkpoint. Every step's loss and the final parameters."""
    config = sinusoid_config(tmp_path, train_episodes=1000, steps=6, mode=mode, max_staleness=1)
    precompute(config, progress=False)
    scratch = tmp_path / "scratch"
    if resume:
        saved = checkpoint.load(scratch / "latest")
        state, positions = saved.server, saved.positions
    else:
        state, positions = fresh_state(config), [None] * config.train.workers
    pool = pool_class(config, state, positions)
    checkpoints = Checkpoints(pool, Untracked(), scratch, config, None, RestorePoint(state, list(positions)))
    record = Record()
    loop = StepLoop(pool, FailurePolicy(3), checkpoints, [record, PeriodicCheckpoint(checkpoints, 3)], config.train, ended_version(state))
    try:
        loop.run()
    except KeyboardInterrupt:
        checkpoints.save("latest")
        raise
    finally:
        pool.stop()
    return {step: metrics["train/loss"] for step, metrics in record.metrics.items()}, pool.pull()


@pytest.mark.parametrize(
    "mode, at, worker, lands",
    [("sync", 3, 1, False), ("sync", 3, 1, True), ("async", 2, 0, True)],
    ids=["sync-step-pending", "sync-step-applied", "async"],
)
def test_a_run_resumed_from_an_interrupt_applies_every_share_once(tmp_path, mode, at, worker, lands):
    """Resumed to step 6, it has the losses and the final parameters of the uninterrupted run: no share applied
    twice (the checkpoint holds the server's record of the shares it has, and the resumed pool redoes the landed
    one with its number, first: the in-process pool's async order is the undisturbed one), none lost (no report of
    an incomplete sync step counts). A step whose report never came is ended by its redo (``ended_version``): every
    step after the interrupt is logged."""
    full, (_, full_params) = run_to_6(tmp_path / "full", mode)
    interrupted = type("Interrupted", (InterruptedWithACallOut,), {"at": at, "worker": worker, "lands": lands})
    with pytest.raises(KeyboardInterrupt):
        run_to_6(tmp_path / "cut", mode, interrupted)
    resumed, (version, params) = run_to_6(tmp_path / "cut", mode, resume=True)
    assert sorted(resumed) == list(range(at + 1, 7))
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([full[s] for s in sorted(resumed)], rel=1e-6)
    assert version == 6
    np.testing.assert_allclose(params, full_params, rtol=1e-6, atol=1e-7)
