"""Shared types: parameters, metrics, predictors and the meta-learner contract.

Every algorithm is a small functional object over a dict of meta-parameter
tensors, so the server, the workers and export never special-case one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, ClassVar, Protocol, runtime_checkable

import torch

from tasks.episodes import Episodes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Params = dict[str, torch.Tensor]
"""Named tensors, in the style of torch.func (functional_call, grad)."""

Metrics = dict[str, float]
"""Scalar metrics of one computation, keyed by name (loss, accuracy, ...)."""

Carry = dict[str, torch.Tensor]
"""A Truncated learner's state between two server steps (detached tensors; opaque to everything else)."""

Predictor = Callable[[torch.Tensor], torch.Tensor]
"""Maps query inputs to logits (classification) or outputs (regression)."""


class MetaLearner(Protocol):
    """The contract every algorithm fulfils; nothing in it knows about Ray."""

    def init(self, seed: int) -> Params:
        """Fresh meta-parameters, deterministic in ``seed``."""
        ...

    def meta_loss(self, params: Params, episodes: Episodes) -> tuple[torch.Tensor, Metrics]:
        """Differentiable mean meta-loss over the batch of episodes, and its metrics."""
        ...

    def meta_grad(self, params: Params, episodes: Episodes) -> tuple[Params, Metrics]:
        """Meta-gradient with the keys of ``params`` (to be applied by a gradient-descent server)."""
        ...

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Adapt to one task's support set (no batch dimension) and return its predictor."""
        ...


@runtime_checkable
class BatchedEvaluation(Protocol):
    """Optional for a MetaLearner: adapt to many episodes at once (pipeline/evaluation.py uses it when present)."""

    def evaluate(self, params: Params, episodes: Episodes) -> dict[str, torch.Tensor]:
        """Per-episode query metrics after adaptation, each ``[len(episodes)]``: ``loss`` (the MSE for
        regression) and, for classification, ``accuracy``."""
        ...


@runtime_checkable
class Illustrated(Protocol):
    """Optional for a MetaLearner: figures of what it learned, logged under ``plots/`` at the run's end."""

    def figures(self, params: Params, episodes: Episodes) -> dict[str, Figure]:
        """Named matplotlib figures drawn on ``episodes`` (held-out test episodes)."""
        ...


@runtime_checkable
class Truncated(Protocol):
    """Optional for a MetaLearner: a state (the *carry*) that outlives a server step; one meta-gradient per truncation.

    A worker (pipeline/runtime/worker.py) holding such a learner reads a batch of
    episodes, ``begin``s a carry on them, and then calls ``truncation_grad`` with
    episodes and the latest carry once per server step. With ``keeps_episodes``
    (L2L's trajectories) every truncation gets the episodes the trajectory began
    with until it returns None (the trajectory ended); then come new episodes and a
    new ``begin``. Without (Reptile's inner Adam carried from task to task) new
    episodes come at every step and the carry goes on. The worker reports the carry
    with its reader position, so a checkpoint or a replacement worker continues exactly.
    """

    keeps_episodes: ClassVar[bool]
    """True: the same episodes until the carry ends; False: new episodes at every step, the carry going on."""

    def begin(self, episodes: Episodes) -> Carry:
        """The carry at the start of the trajectories of ``episodes``."""
        ...

    def truncation_grad(self, params: Params, episodes: Episodes, carry: Carry) -> tuple[Params, Metrics, Carry | None]:
        """The next truncation's meta-gradient (keys of ``params``), its metrics, and the carry after it (None: the
        trajectory ended)."""
        ...


@runtime_checkable
class CarriedEvaluation(Protocol):
    """Optional for a Truncated learner: meta-test adaptation from the carry meta-training left, as
    openai/supervised-reptile's ``Reptile.evaluate`` adapts every test task from a copy of the training's inner
    Adam state (Reptile with ``algorithm.eval_state: carried``).

    Wherever meta-test happens (validation, the test, ``pipeline evaluate``, exports and serving) the runtime
    takes worker slot 0's carry (pipeline.evaluation.meta_test_state: the same whatever the number of workers
    evaluating), asks ``eval_start`` what evaluation starts from, and passes that as ``state`` to ``evaluate``
    and ``adapt``. Every task adapts from that same state; none changes it.
    """

    def eval_start(self, carry: Carry | None) -> Carry | None:
        """What every meta-test task adapts from, given worker slot 0's ``carry`` (None: no step taken yet): that
        state, or None for a fresh start (the learner's setting says so, or there is no carry)."""
        ...

    def evaluate(self, params: Params, episodes: Episodes, *, state: Carry | None = None) -> dict[str, torch.Tensor]:
        """``BatchedEvaluation.evaluate``, every episode adapting from ``state`` (None: fresh)."""
        ...

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, state: Carry | None = None) -> Predictor:
        """``MetaLearner.adapt`` from ``state`` (None: fresh)."""
        ...
