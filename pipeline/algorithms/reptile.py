"""Reptile (Nichol, Achiam and Schulman 2018) as pure functions.

Each task takes ``inner_steps`` of SGD or Adam on its support set from the
meta-parameters theta; the meta-"gradient" is ``theta - mean(adapted theta)``,
which the parameter server feeds to its optimizer like any gradient (with
``optimizer.name: sgd`` and a linear schedule, the outer step of openai/supervised-reptile
``reptile.py``/``train.py``: theta + eps * (mean phi - theta), eps annealed linearly).
Tasks run one at a time (``loop``) or stacked in one pass (``stacked``); both give the
same numbers.

As in openai's ``train_step``, meta-training may use more examples per class than
the test tasks have (``train_shots``, taken from the support then the query
examples) in mini-batches of ``inner_batch`` examples (``_mini_batches``: shuffled,
without replacement, reshuffled at each pass). The shuffles are drawn from a
generator seeded with the episodes' content, so ``meta_grad`` stays a pure function.
Evaluation and ``adapt`` take full-batch steps on the support set.

With ``adapt_params`` (ANIL's globs, see pipeline/algorithms/maml.py) only the
matching parameters are adapted and get Reptile's direction; Reptile gives the
others none (they do not move in the inner loop), so they get the first-order
MAML gradient instead: the query-loss gradient at the adapted parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.algorithms.l2l import episode_generator
from pipeline.algorithms.maml import (
    LossKind,
    Network,
    adapt_tasks,
    adapted_names,
    evaluate_tasks,
    predictor,
    query_metrics,
    task_losses,
    unmatched_patterns,
)
from pipeline.nets.norm import query_outputs
from pipeline.optim.adam import adam
from pipeline.optim.base import GradientTransformation
from pipeline.optim.sgd import sgd
from pipeline.optim.unroll import unroll
from pipeline.types import Metrics, Params, Predictor
from tasks.episodes import Episodes

ReptileBatching = Literal["auto", "loop", "stacked"]


@dataclass(frozen=True)
class Reptile:
    """Reptile over ``network`` with an SGD or Adam inner loop (Adam with beta1 = 0, as in the paper)."""

    network: Network
    loss: LossKind
    inner_lr: float
    inner_steps: int = 5
    eval_inner_steps: int | None = None
    inner_optimizer: Literal["sgd", "adam"] = "sgd"
    batching: ReptileBatching = "auto"
    adapt_params: tuple[str, ...] | None = None
    train_shots: int | None = None
    inner_batch: int | None = None

    def __post_init__(self) -> None:
        for key in ("train_shots", "inner_batch"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"Reptile.{key} must be at least 1, got {getattr(self, key)}")
        if self.adapt_params is not None:
            unmatched = unmatched_patterns(self.network.init(0), self.adapt_params)
            if unmatched:
                raise ValueError(f"Reptile.adapt_params: {unmatched} match no parameter of the network")
        if self.inner_optimizer not in ("sgd", "adam"):
            raise ValueError(f"Reptile.inner_optimizer must be 'sgd' or 'adam', got {self.inner_optimizer!r}")
        if self.batching not in ("auto", "loop", "stacked"):
            raise ValueError(f"Reptile.batching must be auto, loop or stacked, got {self.batching!r}")
        if not self.inner_lr > 0 or self.inner_steps < 1:
            raise ValueError(
                f"Reptile: need inner_lr > 0 and inner_steps >= 1, got {self.inner_lr}, {self.inner_steps}"
            )

    def init(self, seed: int, dtype: torch.dtype = torch.float32) -> Params:
        """The network's initial parameters."""
        return self.network.init(seed, dtype)

    def optimizer(self) -> GradientTransformation:
        """The inner-loop optimizer."""
        if self.inner_optimizer == "adam":
            return adam(self.inner_lr, betas=(0.0, 0.999))
        return sgd(self.inner_lr)

    def training_set(self, episodes: Episodes) -> tuple[torch.Tensor, torch.Tensor]:
        """What a task meta-trains on: its support set, or ``train_shots`` examples per class taken from its
        support then query examples (classification, every class with as many examples): ``x[T, N*train_shots, ...]``."""
        if self.train_shots is None:
            return episodes.support_x, episodes.support_y
        x = torch.cat([episodes.support_x, episodes.query_x], dim=1)
        y = torch.cat([episodes.support_y, episodes.query_y], dim=1)
        tasks, ways = y.shape[0], int(y.max()) + 1
        by_class = y.argsort(dim=1, stable=True).view(tasks, ways, -1)  # each class's examples, in order
        if by_class.shape[2] < self.train_shots:
            raise ValueError(f"Reptile.train_shots {self.train_shots}: the episodes have {by_class.shape[2]} examples per class")
        index = by_class[:, :, : self.train_shots].flatten(1)
        rows = torch.arange(tasks, device=y.device).unsqueeze(1)
        return x[rows, index], y[rows, index]

    def minibatches(self, episodes: Episodes, examples: int) -> torch.Tensor | None:
        """Indices ``[inner_steps, T, inner_batch]`` into each task's training set, as openai's ``_mini_batches``
        (shuffled, without replacement, reshuffled at each pass); None without ``inner_batch``."""
        if self.inner_batch is None:
            return None
        needed = self.inner_steps * self.inner_batch
        passes = -(-needed // examples)
        shuffles = torch.rand(len(episodes), passes, examples, generator=episode_generator(episodes, salt=1))
        order = shuffles.argsort(-1).flatten(1)[:, :needed].to(episodes.support_y.device)
        return order.view(len(episodes), self.inner_steps, self.inner_batch).transpose(0, 1)

    def _adapt(
        self, params: Params, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor | None, adapt: frozenset[str]
    ) -> tuple[Params, torch.Tensor]:
        """Stacked tasks adapted on ``x``/``y``, full batch or the mini-batches ``order`` names; only the
        parameters in ``adapt`` move (and come back per task)."""
        if order is None:
            return adapt_tasks(self.network, self.loss, self.optimizer(), params, x, y, self.inner_steps, False, adapt)
        tasks = x.shape[0]
        rows = torch.arange(tasks, device=x.device).unsqueeze(1)
        batches = iter(order)
        frozen = {k: v for k, v in params.items() if k not in adapt}

        def losses(p: Params) -> torch.Tensor:
            index = next(batches)  # the next step's mini-batch of every task
            return task_losses(self.loss, self.network.apply_tasks(frozen | p, x[rows, index]), y[rows, index])

        fast = {k: v.expand(tasks, *v.shape) for k, v in params.items() if k in adapt}
        fast, first = unroll(losses, fast, self.optimizer(), self.inner_steps, False)
        return frozen | fast, first

    def adapt_tasks(self, params: Params, episodes: Episodes) -> tuple[Params, torch.Tensor]:
        """Each task's adapted parameters (leading task dimension) and its training loss before adapting
        (on the first mini-batch with ``inner_batch``)."""
        batching = self.batching
        if batching == "auto":
            batching = "stacked" if episodes.support_x.device.type == "cuda" else "loop"
        adapt = adapted_names(params, self.adapt_params)
        x, y = self.training_set(episodes)
        order = self.minibatches(episodes, x.shape[1])
        if batching == "stacked":
            return self._adapt(params, x, y, order, adapt)
        parts = [
            self._adapt(params, x[i : i + 1], y[i : i + 1], None if order is None else order[:, i : i + 1], adapt)
            for i in range(len(episodes))
        ]
        fast = {k: torch.cat([p[0][k] for p in parts]) if k in adapt else params[k] for k in params}
        return fast, torch.cat([p[1] for p in parts])

    def meta_loss(self, params: Params, episodes: Episodes) -> tuple[torch.Tensor, Metrics]:
        """Mean query loss at the adapted parameters (first-order: differentiable through the update path only)."""
        fast, pre = self.adapt_tasks(params, episodes)
        out = query_outputs(self.network, fast, episodes.support_x, episodes.query_x)
        losses = task_losses(self.loss, out, episodes.query_y)
        return losses.mean(), query_metrics(self.loss, losses, out, episodes.query_y, pre)

    def meta_grad(self, params: Params, episodes: Episodes) -> tuple[Params, Metrics]:
        """``theta - mean over tasks of the adapted theta``, and the query metrics at the adapted parameters.

        Parameters left out of ``adapt_params`` get the mean over tasks of the query-loss
        gradient at the adapted parameters (first-order MAML's) instead.
        """
        detached = {k: v.detach() for k, v in params.items()}
        adapt = adapted_names(params, self.adapt_params)
        with torch.enable_grad():
            fast, pre = self.adapt_tasks(detached, episodes)
        fast = {k: v.detach() if k in adapt else v.requires_grad_() for k, v in fast.items()}
        frozen = [k for k in params if k not in adapt]
        with torch.set_grad_enabled(bool(frozen)):
            out = query_outputs(self.network, fast, episodes.support_x, episodes.query_x)
            losses = task_losses(self.loss, out, episodes.query_y)
        grads = {k: detached[k] - fast[k].mean(0) for k in params if k in adapt}
        if frozen:
            grads |= dict(zip(frozen, torch.autograd.grad(losses.mean(), [fast[k] for k in frozen])))
        metrics = query_metrics(self.loss, losses.detach(), out.detach(), episodes.query_y, pre)
        return {k: grads[k] for k in params}, metrics

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Adapt to one task with ``eval_inner_steps`` (default ``inner_steps``); see ``maml.predictor``."""
        adapt = adapted_names(params, self.adapt_params)
        return predictor(self.network, self.loss, self.optimizer(), params, support_x, support_y, self._eval_steps(), adapt)

    def _eval_steps(self) -> int:
        return self.eval_inner_steps or self.inner_steps

    def evaluate(
        self, params: Params, episodes: Episodes, steps: int | None = None, chunk: int = 32
    ) -> dict[str, torch.Tensor]:
        """Per-episode metrics after ``steps`` (default ``eval_inner_steps``); see ``maml.evaluate_tasks``."""
        adapt = adapted_names(params, self.adapt_params)
        return evaluate_tasks(
            self.network, self.loss, self.optimizer(), params, episodes, steps or self._eval_steps(), chunk, adapt
        )
