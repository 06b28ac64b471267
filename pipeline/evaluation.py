"""Meta-test evaluation: adapt to each held-out episode, score its queries, report mean and 95% CI."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.types import (
    BatchedEvaluation,
    CarriedEvaluation,
    Carry,
    MetaLearner,
    Params,
    Predictor,
    Truncated,
)
from tasks.episodes import Episodes


@dataclass(frozen=True)
class EvalResult:
    """Mean of a per-episode metric over ``n`` episodes with its 95% confidence half-width."""

    metric: str
    mean: float
    ci95: float
    n: int
    scores: tuple[float, ...] = ()
    """Each episode's value, in episode order (the run's per-episode test table)."""

    def __str__(self) -> str:
        if self.n < 2:  # one value has no spread: say so rather than print nan
            shown = f"{100 * self.mean:.2f}%" if self.metric == "accuracy" else f"{self.mean:.4f}"
            return f"{self.metric} {shown} (1 episode: no 95% interval)"
        if self.metric == "accuracy":
            return f"accuracy {100 * self.mean:.2f}% +- {100 * self.ci95:.2f}% (95% CI, {self.n} episodes)"
        return f"{self.metric} {self.mean:.4f} +- {self.ci95:.4f} (95% CI, {self.n} episodes)"


def is_classification(episodes: Episodes) -> bool:
    """Integer query targets mean classification; floating targets mean regression."""
    return not episodes.query_y.is_floating_point()


def score(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Accuracy for integer targets (predictions are logits), mean squared error otherwise."""
    if targets.is_floating_point():
        return float(((predictions - targets) ** 2).mean())
    return float((predictions.argmax(-1) == targets).float().mean())


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and 1.96 standard errors (the interval the few-shot papers report)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def eval_state(learner: MetaLearner, carry: Carry | None) -> Carry | None:
    """What every meta-test episode adapts from, given the ``carry`` meta-training left (worker slot 0's, or an
    export's): ``learner.eval_start(carry)`` for a learner that evaluates from one (pipeline.types.CarriedEvaluation:
    Reptile with ``algorithm.eval_state: carried``), else None (a fresh start).

    Raises ValueError when ``carry`` is not a state the learner adapts from (another network's, or of other
    ``adapt_params``).
    """
    return learner.eval_start(carry) if isinstance(learner, CarriedEvaluation) else None


def meta_test_state(learner: MetaLearner, positions: Sequence[dict[str, Any] | None]) -> Carry | None:
    """The state every meta-test task adapts from (``eval_state``): what ``learner`` takes of worker
    slot 0's carry in ``positions`` (a pool's or a checkpoint's; EpisodeWorker.position), so the same whatever the
    number of workers evaluating (with one worker in training, openai's Reptile exactly); None for a fresh start.

    Raises ValueError as ``eval_state``, when that carry does not fit ``learner``."""
    position = positions[0] if positions else None
    return eval_state(learner, position["carry"] if isinstance(learner, Truncated) and position else None)


def adapt_from(learner: MetaLearner, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, state: Carry | None) -> Predictor:
    """``learner.adapt`` to one task, from ``state`` (``eval_state``'s) when there is one."""
    if state is None:
        return learner.adapt(params, support_x, support_y)
    return learner.adapt(params, support_x, support_y, state)


def scores(learner: MetaLearner, params: Params, episodes: Episodes, state: Carry | None = None) -> list[float]:
    """Each episode's query accuracy (classification) or MSE (regression) after adapting to its support set, every
    episode from ``state`` (``eval_state``'s; None: the learner's fresh start).

    Batched through the learner's own ``evaluate`` when it has one (MAML, Reptile, ProtoNets, the Meta-LSTM: many
    episodes per pass); otherwise ``learner.adapt`` one episode at a time.
    """
    if isinstance(learner, BatchedEvaluation):
        metrics = learner.evaluate(params, episodes) if state is None else learner.evaluate(params, episodes, state=state)
        return metrics["accuracy" if is_classification(episodes) else "loss"].tolist()
    values = []
    for i in range(len(episodes)):
        e = episodes[i]
        predict = adapt_from(learner, params, e.support_x[0], e.support_y[0], state)
        with torch.no_grad():
            values.append(score(predict(e.query_x[0]), e.query_y[0]))
    return values


def metric_name(episodes: Episodes) -> str:
    """What ``scores`` gives for ``episodes``: ``accuracy`` (classification) or ``mse`` (regression)."""
    return "accuracy" if is_classification(episodes) else "mse"


@dataclass(frozen=True)
class EvalShare:
    """One worker's part of an evaluation: ``scores`` of its consecutive slice of the episodes, in order."""

    worker_id: int
    metric: str
    scores: list[float]


def aggregate(shares: list[EvalShare]) -> EvalResult:
    """Mean and 95% interval over the shares' scores in worker order: the numbers ``evaluate`` gives when the
    shares are consecutive slices of one set (the driver adapts nothing itself)."""
    values = [v for share in shares for v in share.scores]
    mean, ci = mean_ci95(values)
    return EvalResult(shares[0].metric, mean, ci, len(values), tuple(values))


def evaluate(learner: MetaLearner, params: Params, episodes: Episodes, state: Carry | None = None) -> EvalResult:
    """Mean and 95% interval of ``scores`` over ``episodes`` (accuracy, or MSE for regression), every episode
    adapted from ``state`` (``eval_state``'s; None: fresh), in this process."""
    return aggregate([EvalShare(0, metric_name(episodes), scores(learner, params, episodes, state))])
