"""The failure policy: what a run does about a dead or hung worker, a dead server or rejected gradients.

It only decides; the pool replaces workers and the loop restores the server or
stops the run. Decisions are small frozen values, so each case reads (and is
tested) as a plain function call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from pipeline.runtime.worker import StepReport

MAX_WORKER_RESTARTS_PER_STEP = 3
"""Replacements of one worker within one step (or one evaluation) before the run gives up."""

MAX_SERVER_RESTORES = 3
"""Server restores in a row with no new checkpoint between them before the run gives up."""


@dataclass(frozen=True)
class Continue:
    """Nothing to do: the run goes on."""


@dataclass(frozen=True)
class ReplaceWorker:
    """Start a new worker ``worker`` at the reader position of its last finished step and redo its step."""

    worker: int


@dataclass(frozen=True)
class RestoreServer:
    """Start a new server from the last checkpoint; every worker restarts at that checkpoint's positions."""


@dataclass(frozen=True)
class GiveUp:
    """Stop the run (TrainingError with ``reason``); ``checkpoint``: write checkpoints/latest first."""

    reason: str
    checkpoint: bool = False


@dataclass(frozen=True)
class FailurePolicy:
    """Limits on what a run survives; ``max_bad_grads`` is train.max_bad_grads."""

    max_bad_grads: int
    max_worker_restarts_per_step: int = MAX_WORKER_RESTARTS_PER_STEP
    max_server_restores: int = MAX_SERVER_RESTORES

    def worker_died(self, worker: int, deaths: int, error: BaseException) -> ReplaceWorker | GiveUp:
        """Worker ``worker``'s process died, or hung past train.call_timeout_s (``error`` says which), for the
        ``deaths``-th time in the current call."""
        if deaths > self.max_worker_restarts_per_step:
            return GiveUp(f"worker {worker} died or hung {deaths} times in one call: {error}")
        return ReplaceWorker(worker)

    def server_died(self, restores_in_a_row: int, error: BaseException) -> RestoreServer | GiveUp:
        """The server died; ``restores_in_a_row`` counts this restore and those since the last checkpoint."""
        if restores_in_a_row > self.max_server_restores:
            return GiveUp(f"the parameter server died {restores_in_a_row} times with no checkpoint between: {error}")
        return RestoreServer()

    def after_step(self, bad_in_a_row: int, reports: Sequence[StepReport]) -> Continue | GiveUp:
        """After a step: ``bad_in_a_row`` gradients rejected in a row by the server, ``reports`` the step's pushes."""
        if bad_in_a_row < self.max_bad_grads:
            return Continue()
        bad = [f"worker {r.worker_id} at version {r.version}: {r.result.reason}" for r in reports if not r.result.accepted]
        return GiveUp(
            f"{bad_in_a_row} rejected gradients in a row (train.max_bad_grads={self.max_bad_grads}); last: {bad}", checkpoint=True
        )
