"""The step loop: sync (every worker each step) or async (each push on its own), until train.steps.

After every step it asks the failure policy whether to go on, builds the step's
metrics and hands them to the callbacks; when the server dies it asks the policy
whether to restore it from the last checkpoint. It knows neither Ray nor MLflow:
the server and the workers are a ``Pool``, everything else is a callback.
"""
from __future__ import annotations

import sys
import time
from typing import Hashable, Sequence

from pipeline.config import TrainConfig
from pipeline.errors import TrainingError
from pipeline.runtime.callbacks import Callback, Checkpoints, RestorePoint, StepEnd
from pipeline.runtime.policy import FailurePolicy, GiveUp
from pipeline.runtime.pool import Pool, ServerLost
from pipeline.runtime.worker import StepReport


def summarize(reports: Sequence[StepReport], wall: float) -> dict[str, float]:
    """Step metrics weighted by episode count, the time split (s), throughput (episodes/s) and staleness."""
    total = sum(r.n_episodes for r in reports)
    out: dict[str, float] = {}
    for key in reports[0].metrics:
        out[f"train/{key}"] = sum(r.metrics[key] * r.n_episodes for r in reports) / total
    for key in reports[0].timings:
        out[f"time/{key}"] = sum(r.timings[key] for r in reports) / len(reports)
    busiest = max(sum(r.timings.values()) for r in reports)
    out["time/wait_s"] = max(wall - busiest, 0.0)
    out["time/step_s"] = wall
    out["throughput/episodes_per_s"] = total / wall
    out["server/staleness"] = sum(r.result.staleness for r in reports) / len(reports)
    return out


class StepLoop:
    """Runs a pool from ``version`` to ``train.steps``; ``version``, ``server_restores`` and ``steps_redone``
    tell how far it got and what it survived (counts since this loop started)."""

    def __init__(
        self,
        pool: Pool,
        policy: FailurePolicy,
        checkpoints: Checkpoints,
        callbacks: Sequence[Callback],
        train: TrainConfig,
        version: int,
    ) -> None:
        self.pool, self.policy, self.checkpoints, self.callbacks = pool, policy, checkpoints, list(callbacks)
        self.steps, self.mode = train.steps, train.mode
        self.version = version
        self.server_restores = 0
        self.steps_redone = 0
        self._restores_in_a_row = 0
        self._restored_from: RestorePoint | None = None

    def run(self) -> None:
        """Step until train.steps; raises TrainingError when the policy gives up."""
        while self.version < self.steps:
            try:
                if self.mode == "sync":
                    self._sync()
                else:
                    self._async()
            except ServerLost as e:
                self._restore(e)

    def _sync(self) -> None:
        while self.version < self.steps:
            start = time.perf_counter()
            reports = self.pool.step_all()
            self._after_step(reports, time.perf_counter() - start)

    def _async(self) -> None:
        started: dict[Hashable, tuple[int, float]] = {self.pool.submit(i): (i, time.perf_counter()) for i in range(self.pool.size)}
        while self.version < self.steps:
            handle = self.pool.wait_any(list(started))
            i, start = started.pop(handle)
            report = self.pool.result(i, handle)
            self._after_step([report], time.perf_counter() - start)
            if self.version < self.steps:
                started[self.pool.submit(i)] = (i, time.perf_counter())
        for handle, (i, _) in started.items():
            self.pool.result(i, handle)

    def _after_step(self, reports: list[StepReport], wall: float) -> None:
        stats = self.pool.stats()
        decision = self.policy.after_step(int(stats["bad_in_a_row"]), reports)
        if isinstance(decision, GiveUp):
            if decision.checkpoint:
                self.checkpoints.save("latest")
            raise TrainingError(decision.reason)
        advanced = int(stats["version"]) - self.version
        self.version = int(stats["version"])
        if advanced <= 0:
            return
        metrics = summarize(reports, wall)
        metrics.update({f"server/{k}": v for k, v in stats.items() if k not in ("version", "bad_in_a_row")})
        metrics["faults/worker_restarts"] = self.pool.restarts
        metrics["faults/server_restores"] = self.server_restores
        metrics["faults/steps_redone"] = self.steps_redone
        step = StepEnd(self.version, self.version >= self.steps, reports, metrics)
        for callback in self.callbacks:
            callback.on_step(step)

    def _restore(self, error: ServerLost) -> None:
        """Restore the server from the last checkpoint (the workers restart at its positions), as the policy allows."""
        point = self.checkpoints.restore_point
        self._restores_in_a_row = self._restores_in_a_row + 1 if point is self._restored_from else 1
        self._restored_from = point
        decision = self.policy.server_died(self._restores_in_a_row, error)
        if isinstance(decision, GiveUp):
            raise TrainingError(decision.reason) from error
        redone = self.version - point.state.version
        print(
            f"parameter server died at step {self.version} ({error}); restoring it from the "
            f"checkpoint of step {point.state.version}: {redone} steps will be redone",
            file=sys.stderr,
        )
        self.pool.restore(point.state, point.positions)
        self.version = point.state.version
        self.server_restores += 1
        self.steps_redone += redone
