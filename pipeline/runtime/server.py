"""The parameter server: meta-parameters as one flat buffer, Adam or SGD, a version counter.

A plain class so it runs in-process in unit tests; the driver wraps it with
``ray.remote``. Sync mode waits for every worker of a version and averages their
gradients weighted by episode count (summed in worker order, so the result does
not depend on arrival order); async mode applies each push at once and rejects
pushes more than ``max_staleness`` versions old. Non-finite gradients are
rejected and counted, never applied.

A push is idempotent per share: each carries its worker slot, the pool's number for
that slot's step call (``share``; a redo of a call whose reply was lost carries the
same number) and the version it was computed at. A share the server already has is
never applied again: it gets the first push's answer (a share older than the slot's
last is refused), and ``pull_for`` hands a redo the parameters the lost call had, so
the redo reproduces it (exactly while those are the current ones or the ones before
the last update: always in sync mode). That record is part of the server's state, so a
checkpoint carries it (pipeline.runtime.pool.checkpoint_state) and a server restored from
one does not apply again a share it had applied before it was written.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.config import OptimizerConfig
from pipeline.optim.adam import AdamState, adam
from pipeline.optim.base import apply_updates
from pipeline.optim.clip import clip_by_global_norm
from pipeline.optim.schedule import Schedule, cosine, linear
from pipeline.optim.sgd import sgd


@dataclass(frozen=True)
class Push:
    """A worker's meta-gradient for the parameters of ``version``: worker slot ``worker_id``'s share number
    ``share`` (numbered by the pool per slot, increasing; a redo of a call keeps its number)."""

    worker_id: int
    share: int
    version: int
    grad: np.ndarray
    n_episodes: int


@dataclass(frozen=True)
class PushResult:
    """What the server did with a push: accepted or why not, and whether it applied an update."""

    accepted: bool
    reason: str
    version: int
    applied: bool
    staleness: int


@dataclass(frozen=True)
class Received:
    """A worker slot's last share: its number, the version it was computed at and the server's answer to it."""

    share: int
    version: int
    result: PushResult


@dataclass
class ServerState:
    """Everything a checkpoint needs to restore the server exactly."""

    params: torch.Tensor
    adam: AdamState
    """The optimizer's state: Adam's moments and step count (``optimizer.name: sgd`` advances only the step)."""
    version: int
    rejected_nonfinite: int = 0
    rejected_stale: int = 0
    bad_in_a_row: int = 0
    grad_norm: float = 0.0
    pending: dict[int, Push] = field(default_factory=dict)
    received: dict[int, Received] = field(default_factory=dict)
    """Each worker slot's last share (a share pushed again is answered from here, not applied again)."""
    before: tuple[int, torch.Tensor] | None = None
    """The version and parameters before the last update (what ``pull_for`` hands the redo of a share computed there)."""


def learning_rate(optimizer: OptimizerConfig, total_steps: int) -> float | Schedule:
    """``optimizer.lr`` under ``optimizer.schedule`` over ``total_steps`` server steps (a float when constant)."""
    if optimizer.schedule == "cosine":
        return cosine(optimizer.lr, total_steps)
    if optimizer.schedule == "linear":
        return linear(optimizer.lr, optimizer.lr_final, total_steps)
    return optimizer.lr


class ParameterServer:
    """Holds the meta-parameters and applies its optimizer (Adam, or SGD) to the gradients workers push."""

    def __init__(
        self,
        state: ServerState,
        optimizer: OptimizerConfig,
        total_steps: int,
        num_workers: int,
        mode: str = "sync",
        max_staleness: int = 0,
    ) -> None:
        self._s = state
        self._opt = optimizer
        self._total_steps = total_steps
        self._num_workers = num_workers
        self._mode = mode
        self._max_staleness = max_staleness
        # the schedule runs on Adam's step count, which equals the version (both advance in _apply)
        self._lr = learning_rate(optimizer, total_steps)
        self._adam = adam(self._lr, tuple(optimizer.betas), optimizer.eps, eps_root=0.0)  # torch.optim's update, never differentiated
        self._duplicates = 0

    @staticmethod
    def fresh(params: torch.Tensor) -> ServerState:
        """Server state for new meta-parameters at version 0."""
        params = params.detach().to(torch.float32).clone()
        return ServerState(params=params, adam=AdamState.zeros(params), version=0)

    def pull(self) -> tuple[int, np.ndarray]:
        """The current version and a copy of the parameters as one float32 array."""
        return self._s.version, self._s.params.numpy().copy()

    def pull_for(self, worker_id: int, share: int) -> tuple[int, np.ndarray]:
        """The version and a copy of the parameters that worker slot ``worker_id``'s share ``share`` is computed at:
        the current ones, or, when the server already has that share from the version before its last update (the
        redo of a call whose push landed and whose reply was lost), that version's, as the lost call had them."""
        seen, before = self._s.received.get(worker_id), self._s.before
        if seen is not None and seen.share == share and before is not None and seen.version == before[0]:
            return before[0], before[1].numpy().copy()
        return self.pull()

    def version(self) -> int:
        """The number of updates applied so far."""
        return self._s.version

    def stats(self) -> dict[str, float]:
        """Counters for tracking: rejections, consecutive bad gradients, last gradient norm, and shares pushed
        again (not applied again) since this server started."""
        s = self._s
        return {
            "version": s.version,
            "rejected_nonfinite": s.rejected_nonfinite,
            "rejected_stale": s.rejected_stale,
            "bad_in_a_row": s.bad_in_a_row,
            "grad_norm": s.grad_norm,
            "duplicate_shares": self._duplicates,
        }

    def state(self) -> ServerState:
        """The full state (for checkpoints) but the sync pushes still waiting for their step, and with them the
        records of their slots: restored, the server takes their redo as a new share."""
        s = self._s
        received = {w: r for w, r in s.received.items() if w not in s.pending}
        return ServerState(
            s.params.clone(), s.adam, s.version, s.rejected_nonfinite, s.rejected_stale, s.bad_in_a_row, s.grad_norm,
            received=received, before=s.before,
        )

    def push(self, push: Push) -> PushResult:
        """Accept or reject one worker's share; apply an update when a step is complete.

        A share the server already has (a redo, or the late push of a worker taken for dead or hung) is not applied
        again: it gets the answer the first push got; a share older than the slot's last is refused. A share pushed
        after the last step is refused and not recorded. Raises ValueError when the gradient's shape is not the
        parameters'.
        """
        s = self._s
        seen = s.received.get(push.worker_id)
        if seen is not None and push.share <= seen.share:
            self._duplicates += 1
            if push.share == seen.share:
                return seen.result
            reason = f"share {push.share} of worker {push.worker_id} is older than its last, {seen.share}"
            return PushResult(False, reason, s.version, False, s.version - push.version)
        if s.version >= self._total_steps:  # not recorded: a run resumed from here for more steps applies it
            return PushResult(False, "run complete", s.version, False, s.version - push.version)
        result = self._accept(push)
        s.received[push.worker_id] = Received(push.share, push.version, result)
        return result

    def _accept(self, push: Push) -> PushResult:
        s = self._s
        staleness = s.version - push.version
        grad = torch.from_numpy(np.array(push.grad, dtype=np.float32))
        if grad.shape != s.params.shape:
            raise ValueError(
                f"worker {push.worker_id} pushed a gradient of shape {tuple(grad.shape)}, "
                f"the server holds {tuple(s.params.shape)}"
            )
        if not torch.isfinite(grad).all():
            s.rejected_nonfinite += 1
            s.bad_in_a_row += 1
            if self._mode == "sync" and push.version == s.version:
                s.pending[push.worker_id] = Push(push.worker_id, push.share, push.version, np.empty(0), 0)
                applied = self._maybe_apply_sync()
                return PushResult(False, "non-finite gradient", s.version, applied, staleness)
            return PushResult(False, "non-finite gradient", s.version, False, staleness)
        if self._mode == "sync":
            if push.version != s.version:
                s.rejected_stale += 1
                return PushResult(False, f"sync push for version {push.version}, server at {s.version}", s.version, False, staleness)
            if push.worker_id in s.pending:
                reason = f"worker {push.worker_id} already pushed share {s.pending[push.worker_id].share} for version {s.version}"
                return PushResult(False, reason, s.version, False, staleness)
            s.pending[push.worker_id] = push
            applied = self._maybe_apply_sync()
            return PushResult(True, "", s.version, applied, staleness)
        if staleness > self._max_staleness:
            s.rejected_stale += 1
            return PushResult(False, f"stale by {staleness} versions (bound {self._max_staleness})", s.version, False, staleness)
        self._apply(grad)
        return PushResult(True, "", s.version, True, staleness)

    def _maybe_apply_sync(self) -> bool:
        s = self._s
        if len(s.pending) < self._num_workers:
            return False
        good = [s.pending[w] for w in sorted(s.pending) if s.pending[w].n_episodes > 0]
        s.pending = {}
        if not good:
            return False
        total = sum(p.n_episodes for p in good)
        grad = torch.zeros_like(s.params)
        for p in good:
            grad += torch.from_numpy(np.array(p.grad, dtype=np.float32)) * (p.n_episodes / total)
        self._apply(grad)
        return True

    def _apply(self, grad: torch.Tensor) -> None:
        s = self._s
        s.before = (s.version, s.params)  # the update makes new parameters; these stay as they are
        grad, s.grad_norm = clip_by_global_norm(grad, self._opt.clip_norm)
        if self._opt.name == "sgd":
            rate = self._lr(s.adam.step) if callable(self._lr) else self._lr
            updates, _ = sgd(rate).update(grad, ())
            s.adam = s.adam._replace(step=s.adam.step + 1)
        else:
            updates, s.adam = self._adam.update(grad, s.adam)
        s.params = apply_updates(s.params, updates)
        s.version += 1
        s.bad_in_a_row = 0
