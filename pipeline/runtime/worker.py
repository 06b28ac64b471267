"""The episode worker: pull parameters, read its own episodes, compute a meta-gradient, push it.

A plain class, run in-process by unit tests and wrapped with ``ray.remote`` by the
driver (one GPU each when the cluster has GPUs). It knows the MetaLearner contract
and nothing of any one algorithm.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.build import build_learner
from pipeline.config import validate
from pipeline.runtime.flat_buffer import Layout
from pipeline.runtime.server import Push, PushResult
from tasks.store.parquet import open_store


@dataclass(frozen=True)
class StepReport:
    """What one worker did in one step, tagged with the worker that did it."""

    worker_id: int
    version: int
    n_episodes: int
    metrics: dict[str, float]
    timings: dict[str, float]
    position: dict[str, Any]
    result: PushResult


def call(actor: Any, method: str, *args: Any) -> Any:
    """Call ``method`` on a Ray actor handle (and wait) or on a plain in-process object."""
    fn = getattr(actor, method)
    if hasattr(fn, "remote"):
        import ray

        return ray.get(fn.remote(*args))
    return fn(*args)


class EpisodeWorker:
    """Computes meta-gradients on its own share of the training episodes."""

    def __init__(
        self,
        worker_id: int,
        num_workers: int,
        config: dict[str, Any],
        episodes_per_step: int,
        position: dict[str, Any] | None = None,
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.worker_id = worker_id
        self.config = validate(config, f"worker {worker_id}")
        self.learner = build_learner(self.config)
        self.layout = Layout.of(self.learner.init(self.config.seed))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, self.config.train.dtype)
        self.episodes_per_step = episodes_per_step
        store = open_store(self.config.store.path)
        self.reader = store.reader(
            "train", batch_size=episodes_per_step, worker=worker_id, num_workers=num_workers, start=position, loop=True,
            augment=getattr(self.config.task, "augment", None),
            device=self.device if self.config.store.device_table == "auto" and self.device.type == "cuda" else None,
        )

    def close(self) -> None:
        """Stop the reader's read-ahead (a Ray actor is simply killed; an in-process worker is closed)."""
        self.reader.close()

    def step(self, server: Any) -> StepReport:
        """One pull -> read -> compute -> push cycle against ``server``."""
        t0 = time.perf_counter()
        version, flat = call(server, "pull")
        t1 = time.perf_counter()
        episodes = next(self.reader).to(self.device, self.dtype)
        t2 = time.perf_counter()
        params = {
            k: v.to(self.device, self.dtype).requires_grad_() for k, v in self.layout.unflatten(torch.from_numpy(flat.copy())).items()
        }
        grads, metrics = self.learner.meta_grad(params, episodes)
        grad = self.layout.flatten(grads).numpy()
        t3 = time.perf_counter()
        result = call(server, "push", Push(self.worker_id, version, grad, len(episodes)))
        t4 = time.perf_counter()
        timings = {"pull_s": t1 - t0, "read_s": t2 - t1, "compute_s": t3 - t2, "push_s": t4 - t3}
        return StepReport(self.worker_id, version, len(episodes), metrics, timings, self.reader.position, result)
