"""Evaluation split over the workers (in process): the same numbers as evaluating every episode in one place;
bfloat16 autocast steps close to float32 ones; a step redone by a replacement worker after the lost call's push
landed is applied once; what of the server's record of shares a checkpoint keeps."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.build import build_learner
from pipeline.config import validate
from pipeline.evaluation import evaluate
from pipeline.runtime.flat_buffer import Layout
from pipeline.runtime.local import LocalPool
from pipeline.runtime.pool import eval_slices, split_batch
from pipeline.runtime.server import ParameterServer, PushResult
from pipeline.runtime.worker import EpisodeWorker, compute_device
from tasks.store.parquet import precompute
from tests.helpers import small_omniglot_run
from tests.pipeline.runtime.sinusoid_run import sinusoid_config


@pytest.mark.parametrize(
    "episodes, workers, slices",
    [(5, 3, [(0, 2), (2, 4), (4, 5)]), (4, 2, [(0, 2), (2, 4)]), (1, 2, [(0, 1), (1, 1)]), (7, 1, [(0, 7)])],
    ids=["uneven", "even", "fewer-episodes-than-workers", "one-worker"],
)
def test_eval_slices_cover_the_episodes_in_order(episodes, workers, slices):
    assert eval_slices(episodes, workers) == slices


def trained_pool(config, steps: int = 2):
    """An in-process pool after ``steps`` steps, its learner and layout."""
    learner = build_learner(config)
    layout = Layout.of(learner.init(config.seed))
    pool = LocalPool(config, ParameterServer.fresh(layout.flatten(learner.init(config.seed))), [None] * config.train.workers)
    for _ in range(steps):
        pool.step_all()
    return pool, learner, layout


@pytest.mark.parametrize("task", ["sinusoid", "omniglot"])
def test_workers_evaluate_to_the_numbers_of_one_place(tmp_path, task, one_thread):
    """Validation and test scored by 2 workers (and by 3, one of them idle) equal ``evaluate`` of the whole set.

    The workers compute on the CPU (``gpus_per_worker: 0``) like ``evaluate`` here: a GPU's numbers differ in the last bits.
    """
    if task == "sinusoid":
        config = sinusoid_config(tmp_path, train_episodes=1000, gpus_per_worker=0)
    else:
        raw = small_omniglot_run(tmp_path, "eval", model={"network": "conv4", "filters": 4})
        raw["store"] |= {"val_episodes": 5, "test_episodes": 2}
        config = validate(raw | {"train": {**raw["train"], "workers": 2, "gpus_per_worker": 0}})
    store = precompute(config, progress=False)
    pool, learner, layout = trained_pool(config)
    try:
        _, flat = pool.pull()
        params = layout.unflatten(torch.from_numpy(flat.copy()))
        for split in ("val", "test"):
            count = store.episodes(split)
            expected = evaluate(learner, params, store.read_split(split))
            assert pool.evaluate(split, count, flat) == expected, split
            assert expected.metric == ("mse" if task == "sinusoid" else "accuracy") and expected.n == count
    finally:
        pool.stop()


def test_a_worker_computes_on_its_gpu_share_and_on_the_cpu_without_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compute_device(0.25).type == "cuda" and compute_device(1.0).type == "cuda"
    assert compute_device(0.0).type == "cpu"  # train.gpus_per_worker: 0 on a machine with a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compute_device(1.0).type == "cpu"


class Recorder:
    """A server stub: hands out fixed parameters, keeps the pushed gradient."""

    def __init__(self, flat):
        self.flat, self.grad = flat, None

    def pull_for(self, worker_id, share):
        return 0, self.flat

    def push(self, push):
        self.grad = torch.from_numpy(push.grad)
        return PushResult(True, "", 0, True, 0)


def test_bfloat16_autocast_steps_stay_close_to_float32(tmp_path, one_thread):
    """Sinusoid MAML under bfloat16 autocast (8 significant bits: ~0.4% per rounding) against float32. The
    first meta-gradient of the same parameters and episodes: cosine above 0.97 and a difference under 30% of
    its norm (second-order terms through bf16 matmuls); the train losses of four sync steps within 1%."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = sinusoid_config(tmp_path / dtype, train_episodes=1000, dtype=dtype)
        precompute(config, progress=False)
        params = build_learner(config).init(config.seed)
        initial = Layout.of(params).flatten(params)
        server = Recorder(initial.numpy())
        worker = EpisodeWorker(0, 1, config.model_dump(mode="json"), 8)
        worker.step(server, 0)
        worker.close()
        pool = LocalPool(config, ParameterServer.fresh(initial), [None, None])
        runs[dtype] = server.grad, [sum(r.metrics["loss"] for r in pool.step_all()) / 2 for _ in range(4)]
        pool.stop()
    (grad32, loss32), (grad16, loss16) = runs["float32"], runs["bfloat16"]
    assert loss16 != loss32  # autocast did change the arithmetic
    cosine = float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0))
    assert cosine > 0.97 and float((grad16 - grad32).norm() / grad32.norm()) < 0.3  # measured: 0.980 and 0.20
    assert loss16 == pytest.approx(loss32, rel=1e-2)  # measured: within 0.15%


def sync_losses(config, steps: int, lost_at: int | None = None) -> list[float]:
    """Each step's train loss on an in-process pool of two workers. At step ``lost_at`` worker 1's call runs after
    worker 0's and completes the step, its report is lost, and a new worker started at the position of its last
    finished step redoes the call (its share number kept), as RayPool does when a node dies after the push."""
    params = build_learner(config).init(config.seed)
    pool = LocalPool(config, ParameterServer.fresh(Layout.of(params).flatten(params)), [None, None])
    losses = []
    try:
        for step in range(steps):
            handles = [pool.submit(i) for i in range(pool.size)]
            reports = [pool.result(0, handles[0])]
            if step == lost_at:
                pool._report(1, handles[1])  # its push lands, its report is lost
                pool.workers[1].close()
                batch = split_batch(config.train.meta_batch, pool.size)[1]
                pool.workers[1] = EpisodeWorker(1, pool.size, config.model_dump(mode="json"), batch, pool.positions[1])
            reports.append(pool.result(1, handles[1]))
            losses.append(sum(r.metrics["loss"] * r.n_episodes for r in reports) / config.train.meta_batch)
        assert pool.stats()["version"] == steps and pool.stats()["duplicate_shares"] == (lost_at is not None)
    finally:
        pool.stop()
    return losses


def test_a_step_redone_after_its_push_landed_is_applied_once(tmp_path, one_thread):
    config = sinusoid_config(tmp_path, train_episodes=1000)
    precompute(config, progress=False)
    assert sync_losses(config, 4, lost_at=1) == sync_losses(config, 4)


def test_a_checkpoint_keeps_the_record_of_the_shares_the_pool_has_no_report_of():
    """Worker 0's share 4 was reported (its position is after it), worker 1's share 7 landed unreported: only the
    latter stays, the parameters before the last update only while it was computed at them, and a pool started
    from that state numbers worker 1's next call 7 (its redo) and worker 0's from 1."""
    from pipeline.runtime.pool import checkpoint_state, share_counters
    from pipeline.runtime.server import Received

    answer = PushResult(True, "", 4, True, 0)
    state = ParameterServer.fresh(torch.zeros(2))
    for version, kept in ((3, True), (2, False)):
        state = dataclasses.replace(state, received={0: Received(4, 1, answer), 1: Received(7, version, answer)}, before=(3, torch.ones(2)))
        saved = checkpoint_state(state, [4, 6])
        assert saved.received == {1: Received(7, version, answer)} and (saved.before is not None) == kept
        assert share_counters(saved, 2) == [0, 6]
    assert checkpoint_state(state, [4, 7]).received == {} and share_counters(checkpoint_state(state, [4, 7]), 2) == [0, 0]
