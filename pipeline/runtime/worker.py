"""The episode worker: pull parameters, read its own episodes, compute a meta-gradient, push it.

A plain class, run in-process by unit tests and wrapped with ``ray.remote`` by the
driver (a GPU or a fraction of one each when the cluster has GPUs). It knows the
MetaLearner contract and nothing of any one algorithm. A Truncated learner
(pipeline.types) gets one call per server step, its carry kept here between steps
and reported with the reader position: on the same episodes until the carry ends
(``keeps_episodes``), or on new episodes each step with the carry going on. It also evaluates its share
of the validation and test episodes on its own device (``evaluate``), so the
driver only aggregates scores. With ``train.dtype: bfloat16`` its forward and
backward passes run under ``torch.autocast`` (bfloat16 matmuls and convolutions,
float32 parameters and gradients; the server keeps float32 master parameters).
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.build import build_learner
from pipeline.config import validate
from pipeline.evaluation import EvalShare, adapt_from, metric_name, scores
from pipeline.runtime.flat_buffer import Layout
from pipeline.runtime.server import Push, PushResult
from pipeline.tracking.plots import regression_fits
from pipeline.types import Carry, Illustrated, Truncated
from tasks.episodes import Episodes
from tasks.store.parquet import open_store

if TYPE_CHECKING:
    from matplotlib.figure import Figure


FITS_SHOWN = 4
"""Test episodes drawn in the regression fits."""


def compute_device(gpus_per_worker: float) -> torch.device:
    """Where a worker computes: its GPU when it has a share of one (``train.gpus_per_worker`` > 0) and CUDA sees
    one, else the CPU (a worker given no GPU share stays off a GPU it can see: Ray does not hide GPUs from it)."""
    return torch.device("cuda" if gpus_per_worker > 0 and torch.cuda.is_available() else "cpu")


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
        self.device = compute_device(self.config.train.gpus_per_worker)
        self.dtype = getattr(torch, self.config.train.param_dtype)
        self.autocast = self.config.train.dtype == "bfloat16"
        self.episodes_per_step = episodes_per_step
        self.store = open_store(self.config.store.path)
        self._eval_sets: dict[tuple[str, int, int], Episodes] = {}
        self.truncated = isinstance(self.learner, Truncated)
        if self.truncated:  # position = {"reader": where the next step's episodes start, "carry": its state or None}
            position = position or {"reader": None, "carry": None}
            self._carry = {k: v.to(self.device) for k, v in position["carry"].items()} if position["carry"] else None
            self._trajectory: Episodes | None = None
            self._trajectory_start = position = position["reader"]
        self.reader = self.store.reader(
            "train", batch_size=episodes_per_step, worker=worker_id, num_workers=num_workers, start=position, loop=True,
            augment=getattr(self.config.task, "augment", None),
            device=self.device if self.config.store.device_table == "auto" and self.device.type == "cuda" else None,
        )

    def close(self) -> None:
        """Stop the reader's read-ahead (a Ray actor is simply killed; an in-process worker is closed)."""
        self.reader.close()

    def step(self, server: Any, share: int) -> StepReport:
        """One pull -> read -> compute -> push cycle against ``server`` for this worker slot's share number ``share``
        (the pool's; the redo of a call whose reply was lost keeps its number, so the server hands out that call's
        parameters and applies the share once: ParameterServer.pull_for, push)."""
        t0 = time.perf_counter()
        version, flat = call(server, "pull_for", self.worker_id, share)
        t1 = time.perf_counter()
        episodes = self._trajectory_episodes() if self.truncated else next(self.reader).to(self.device, self.dtype)
        t2 = time.perf_counter()
        params = {k: v.requires_grad_() for k, v in self._params(flat).items()}
        with self._compute():
            if self.truncated:
                grads, metrics, self._carry = self.learner.truncation_grad(params, episodes, self._carry or self.learner.begin(episodes))
                if self._carry is None or not self.learner.keeps_episodes:
                    self._trajectory = None  # the next step reads new episodes
            else:
                grads, metrics = self.learner.meta_grad(params, episodes)
        grad = self.layout.flatten(grads).numpy()
        t3 = time.perf_counter()
        result = call(server, "push", Push(self.worker_id, share, version, grad, len(episodes)))
        t4 = time.perf_counter()
        timings = {"pull_s": t1 - t0, "read_s": t2 - t1, "compute_s": t3 - t2, "push_s": t4 - t3}
        return StepReport(self.worker_id, version, len(episodes), metrics, timings, self.position, result)

    def _trajectory_episodes(self) -> Episodes:
        """A Truncated learner's episodes: those of the running trajectory, or the next batch when none runs."""
        if self._trajectory is None:
            self._trajectory_start = self.reader.position
            self._trajectory = next(self.reader).to(self.device, self.dtype)
        return self._trajectory

    @property
    def position(self) -> dict[str, Any]:
        """Where this worker stands after its last step: its reader position; for a Truncated learner, with its
        carry (on the CPU) and the reader position of the episodes its next step takes (the running trajectory's)."""
        if not self.truncated:
            return self.reader.position
        reader = self.reader.position if self._trajectory is None else self._trajectory_start
        return {"reader": reader, "carry": None if self._carry is None else {k: v.detach().cpu() for k, v in self._carry.items()}}

    def evaluate(self, split: str, start: int, stop: int, flat: np.ndarray, state: Carry | None = None) -> EvalShare:
        """Scores (pipeline.evaluation.scores) of episodes ``start:stop`` of the store's ``split`` under the
        flat parameters ``flat``, batched on this worker's device, every episode adapted from ``state``
        (pipeline.evaluation.meta_test_state's; None: fresh).

        The slice is read once and kept for the worker's life (validation repeats it).
        """
        key = (split, start, stop)
        if key not in self._eval_sets:
            # the first ``stop`` episodes, as the driver's read_split would give them; this worker keeps its slice
            self._eval_sets[key] = self.store.read_split(split, limit=stop)[start:stop].to(self.device, self.dtype)
        episodes = self._eval_sets[key]
        with self._compute():
            values = scores(self.learner, self._params(flat), episodes, state)
        return EvalShare(self.worker_id, metric_name(episodes), values)

    def figures(self, flat: np.ndarray, state: Carry | None = None) -> dict[str, Figure]:
        """The figures of the learner under ``flat`` on the first test episodes: its own (pipeline.types.Illustrated,
        on the first) and, for one-dimensional regression, its fits (``regression_fits``, MAML paper figure 2;
        adapted from ``state`` as ``evaluate``)."""
        params = self._params(flat)
        episodes = self.store.read_split("test", limit=FITS_SHOWN).to(self.device, self.dtype)
        with self._compute():
            figures = self.learner.figures(params, episodes[0]) if isinstance(self.learner, Illustrated) else {}
            fits = regression_fits(episodes, lambda support_x, support_y: adapt_from(self.learner, params, support_x, support_y, state))
        return figures | ({"regression_fits": fits} if fits is not None else {})

    def _params(self, flat: np.ndarray) -> dict[str, torch.Tensor]:
        """The flat float32 parameters as the learner's named tensors on this worker's device and dtype."""
        return {k: v.to(self.device, self.dtype) for k, v in self.layout.unflatten(torch.from_numpy(flat.copy())).items()}

    def _compute(self) -> contextlib.AbstractContextManager:
        """bfloat16 autocast on this worker's device type when train.dtype is bfloat16, else nothing."""
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
