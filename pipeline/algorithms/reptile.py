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

The inner Adam starts afresh at each task (``algorithm.inner_state: per_task``), or,
in ``CarriedReptile`` (``carried``), keeps its moments and step count from task to
task, as openai's ``train_step`` does (its ``minimize_op``'s Adam slots are not among
the variables it resets between tasks: reptile.py ``_model_state``, models.py). A
worker adapts its tasks one after the other in episode order, and the state goes on
into its next server step (pipeline.types.Truncated, ``keeps_episodes`` False).
Evaluation and ``adapt`` start every test task from a fresh inner optimizer, or, in
``CarriedReptile`` with ``eval_state: carried`` (pipeline.types.CarriedEvaluation), from a
given carried Adam state, as openai's ``Reptile.evaluate`` (it saves every variable, Adam's
slots and beta powers included, before each test task and restores them after): every
test task starts from that same state and none changes it, so the tasks stay independent
and are adapted batched.

With ``adapt_params`` (ANIL's globs, see pipeline/algorithms/maml.py) only the
matching parameters are adapted and get Reptile's direction; Reptile gives the
others none (they do not move in the inner loop), so they get the first-order
MAML gradient instead: the query-loss gradient at the adapted parameters.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from pipeline.algorithms.l2l import episode_generator
from pipeline.algorithms.maml import (
    LossKind,
    Network,
    adapted_names,
    evaluate_tasks,
    predictor,
    query_metrics,
    task_losses,
    unmatched_patterns,
)
from pipeline.nets.norm import query_outputs
from pipeline.optim.adam import AdamState, adam
from pipeline.optim.base import GradientTransformation, State
from pipeline.optim.sgd import sgd
from pipeline.optim.unroll import unroll_from
from pipeline.types import Carry, Metrics, Params, Predictor
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
        self, params: Params, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor | None, adapt: frozenset[str],
        state: State | None = None,
    ) -> tuple[Params, torch.Tensor, State]:
        """Stacked tasks adapted on ``x``/``y``, full batch or the mini-batches ``order`` names, from the inner
        optimizer's ``state`` (None: a fresh one); only the parameters in ``adapt`` move (and come back per task).
        Returns them, the tasks' first training losses and the optimizer's state after the last step."""
        tasks = x.shape[0]
        rows = torch.arange(tasks, device=x.device).unsqueeze(1)
        batches = iter(order) if order is not None else None
        frozen = {k: v for k, v in params.items() if k not in adapt}

        def losses(p: Params) -> torch.Tensor:
            if batches is None:
                return task_losses(self.loss, self.network.apply_tasks(frozen | p, x), y)
            index = next(batches)  # the next step's mini-batch of every task
            return task_losses(self.loss, self.network.apply_tasks(frozen | p, x[rows, index]), y[rows, index])

        fast = {k: v.expand(tasks, *v.shape) for k, v in params.items() if k in adapt}
        optimizer = self.optimizer()
        fast, state, first = unroll_from(losses, fast, optimizer, optimizer.init(fast) if state is None else state, self.inner_steps, False)
        return frozen | fast, first, state

    def adapt_tasks(self, params: Params, episodes: Episodes) -> tuple[Params, torch.Tensor]:
        """Each task's adapted parameters (leading task dimension) and its training loss before adapting
        (on the first mini-batch with ``inner_batch``), each task from a fresh inner optimizer."""
        fast, first, _ = self._adapt_tasks(params, episodes, None)
        return fast, first

    def _adapt_tasks(self, params: Params, episodes: Episodes, state: State | None) -> tuple[Params, torch.Tensor, State | None]:
        """``adapt_tasks``; with an inner optimizer ``state`` the tasks adapt one after the other in episode order,
        each from the state the one before left (the first from ``state``), and the last one's state comes back."""
        batching = self.batching
        if batching == "auto":
            batching = "stacked" if episodes.support_x.device.type == "cuda" else "loop"
        adapt = adapted_names(params, self.adapt_params)
        x, y = self.training_set(episodes)
        order = self.minibatches(episodes, x.shape[1])
        if batching == "stacked" and state is None:
            fast, first, _ = self._adapt(params, x, y, order, adapt)
            return fast, first, None
        parts = []
        for i in range(len(episodes)):
            fast, first, after = self._adapt(params, x[i : i + 1], y[i : i + 1], None if order is None else order[:, i : i + 1], adapt, state)
            parts.append((fast, first))
            state = None if state is None else after  # per task (None): every task from a fresh optimizer
        fast = {k: torch.cat([p[0][k] for p in parts]) if k in adapt else params[k] for k in params}
        return fast, torch.cat([p[1] for p in parts]), state

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
        grads, metrics, _ = self._meta_grad(params, episodes, None)
        return grads, metrics

    def _meta_grad(self, params: Params, episodes: Episodes, state: State | None) -> tuple[Params, Metrics, State | None]:
        """``meta_grad``, the tasks adapted from the inner optimizer ``state`` as ``_adapt_tasks`` says; and the state after."""
        detached = {k: v.detach() for k, v in params.items()}
        adapt = adapted_names(params, self.adapt_params)
        with torch.enable_grad():
            fast, pre, state = self._adapt_tasks(detached, episodes, state)
        fast = {k: v.detach() if k in adapt else v.requires_grad_() for k, v in fast.items()}
        frozen = [k for k in params if k not in adapt]
        with torch.set_grad_enabled(bool(frozen)):
            out = query_outputs(self.network, fast, episodes.support_x, episodes.query_x)
            losses = task_losses(self.loss, out, episodes.query_y)
        grads = {k: detached[k] - fast[k].mean(0) for k in params if k in adapt}
        if frozen:
            grads |= dict(zip(frozen, torch.autograd.grad(losses.mean(), [fast[k] for k in frozen])))
        metrics = query_metrics(self.loss, losses.detach(), out.detach(), episodes.query_y, pre)
        return {k: grads[k] for k in params}, metrics, state

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, state: Carry | None = None) -> Predictor:
        """Adapt to one task with ``eval_inner_steps`` (default ``inner_steps``) from the inner Adam ``state`` (a
        ``CarriedReptile`` carry; None: a fresh optimizer); see ``maml.predictor``.

        Raises ValueError for a ``state`` with an SGD inner loop, or not the inner Adam state of this network's
        adapted parameters (keys or shapes).
        """
        adapt = adapted_names(params, self.adapt_params)
        return predictor(self.network, self.loss, self._optimizer_from(state, params, adapt), params, support_x, support_y, self._eval_steps(), adapt)

    def _eval_steps(self) -> int:
        return self.eval_inner_steps or self.inner_steps

    def evaluate(
        self, params: Params, episodes: Episodes, steps: int | None = None, chunk: int = 32, *, state: Carry | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-episode metrics after ``steps`` (default ``eval_inner_steps``), every episode adapted from the inner
        Adam ``state`` (a ``CarriedReptile`` carry; None: a fresh optimizer); see ``maml.evaluate_tasks``.

        Raises ValueError for a ``state`` as ``adapt``.
        """
        adapt = adapted_names(params, self.adapt_params)
        return evaluate_tasks(
            self.network, self.loss, self._optimizer_from(state, params, adapt), params, episodes, steps or self._eval_steps(), chunk, adapt
        )

    def _optimizer_from(self, state: Carry | None, params: Params, adapt: frozenset[str]) -> GradientTransformation:
        """The inner optimizer; with ``state`` (an inner Adam carry of the ``adapt`` parameters of ``params``) its ``init`` gives
        that state, broadcast over the tasks and on the parameters' device and dtype, instead of a fresh one: every
        task starts from the same state and none changes it (``update`` returns new tensors).

        Raises ValueError for a state with an SGD inner loop, or one not holding the Adam state of ``adapt`` (keys
        or shapes: ``adam_state``).
        """
        optimizer = self.optimizer()
        if state is None:
            return optimizer
        if self.inner_optimizer != "adam":
            raise ValueError(f"Reptile: an inner optimizer state was given, but inner_optimizer is {self.inner_optimizer!r} (no state)")
        start = adam_state(state, {k: params[k] for k in adapt})

        def init(params: Params) -> AdamState:
            def broadcast(tree: Params) -> Params:
                return {k: tree[k].to(params[k]).expand_as(params[k]) for k in params}

            return AdamState(start.step, broadcast(start.exp_avg), broadcast(start.exp_avg_sq))

        return GradientTransformation(init, optimizer.update)


@dataclass(frozen=True)
class CarriedReptile(Reptile):
    """Reptile whose inner Adam keeps its moments and step count from task to task (``algorithm.inner_state:
    carried``), as openai/supervised-reptile's: pipeline.types.Truncated with new episodes at every server step.

    The carry is the inner Adam's state after the worker's last task, detached:
    ``exp_avg.<name>`` and ``exp_avg_sq.<name>`` (shaped like parameter ``<name>``,
    for each adapted parameter) and ``step`` (a 0-d int64: inner steps taken). Each
    server step adapts the episodes' tasks one after the other from it (so
    ``batching: stacked`` does not apply to meta-training). ``meta_grad`` and
    ``meta_loss`` take every task from a fresh state (no carry), like ``Reptile``'s.
    Evaluation and ``adapt`` start every task from the ``state`` they are given (``eval_start``
    says which: a copy of the carry, or None for a fresh Adam; pipeline.types.CarriedEvaluation).
    """

    keeps_episodes: ClassVar[bool] = False
    eval_state: Literal["fresh", "carried"] = "carried"
    """Where meta-test adaptation starts (``eval_start``): a copy of the carried state (openai's) or a fresh Adam."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_optimizer != "adam":
            raise ValueError(f"CarriedReptile needs inner_optimizer 'adam' (SGD has no state to carry), got {self.inner_optimizer!r}")
        if self.eval_state not in ("fresh", "carried"):
            raise ValueError(f"CarriedReptile.eval_state must be 'fresh' or 'carried', got {self.eval_state!r}")

    def eval_start(self, carry: Carry | None) -> Carry | None:
        """The inner Adam state every meta-test task adapts from (``evaluate``/``adapt``'s ``state``), given the
        ``carry`` meta-training left: that carry with ``eval_state: carried`` (openai's ``Reptile.evaluate``), None
        (a fresh Adam) with ``fresh`` or without a carry.

        Raises ValueError naming the keys or shapes when ``carry`` is not this network's inner Adam state.
        """
        if self.eval_state == "fresh" or carry is None:
            return None
        params = self.network.init(0)
        adam_state(carry, {k: params[k] for k in adapted_names(params, self.adapt_params)})
        return carry

    def begin(self, episodes: Episodes) -> Carry:
        """A fresh inner Adam's state (step 0, zero moments) on the episodes' device and dtype."""
        params = self.init(0, episodes.support_x.dtype)
        adapt = adapted_names(params, self.adapt_params)
        zero = {k: torch.zeros(1, *v.shape, dtype=v.dtype, device=episodes.support_x.device) for k, v in params.items() if k in adapt}
        return _carry(AdamState(0, zero, zero))

    def truncation_grad(self, params: Params, episodes: Episodes, carry: Carry) -> tuple[Params, Metrics, Carry]:
        """``meta_grad`` with the tasks adapted one after the other from the carried inner Adam state, and that
        state after the last task (never None: it goes on into the worker's next step).

        Raises ValueError naming the keys or shapes when ``carry`` does not hold the state of every adapted parameter
        (a carry of another network or ``adapt_params``).
        """
        state = adam_state(carry, {k: params[k] for k in adapted_names(params, self.adapt_params)})
        one_task = AdamState(state.step, {k: v[None] for k, v in state.exp_avg.items()}, {k: v[None] for k, v in state.exp_avg_sq.items()})
        grads, metrics, after = self._meta_grad(params, episodes, one_task)
        return grads, metrics, _carry(after)


def adam_state(carry: Carry, adapted: Params) -> AdamState:
    """A CarriedReptile carry as the inner Adam's state of the ``adapted`` parameters (name -> parameter; each
    moment shaped like its parameter, ``step`` 0-d).

    Raises ValueError naming the keys, or the tensors and their shapes, when the carry does not hold exactly that
    state (a carry of another network, of other layer sizes, or of other ``adapt_params``).
    """
    expected = {"step"} | {f"{moment}.{k}" for moment in ("exp_avg", "exp_avg_sq") for k in adapted}
    if set(carry) != expected:
        raise ValueError(
            f"CarriedReptile: the carry's keys differ from the inner Adam state of this network:"
            f" missing {sorted(expected - set(carry))}, unexpected {sorted(set(carry) - expected)}"
        )
    wanted = {"step": torch.Size([])} | {f"{moment}.{k}": v.shape for moment in ("exp_avg", "exp_avg_sq") for k, v in adapted.items()}
    wrong = [f"{k} {tuple(carry[k].shape)} (expected {tuple(shape)})" for k, shape in sorted(wanted.items()) if carry[k].shape != shape]
    if wrong:
        raise ValueError(f"CarriedReptile: the carry's shapes differ from the inner Adam state of this network: {', '.join(wrong)}")
    names = sorted(adapted)
    return AdamState(int(carry["step"]), {k: carry[f"exp_avg.{k}"] for k in names}, {k: carry[f"exp_avg_sq.{k}"] for k in names})


def _carry(state: AdamState) -> Carry:
    """A CarriedReptile carry: the inner Adam ``state`` of one task (moments ``[1, *shape]``, the task dimension
    dropped) as one flat dict of detached tensors."""
    carry: Carry = {"step": torch.tensor(state.step, dtype=torch.int64)}
    for moment, tree in (("exp_avg", state.exp_avg), ("exp_avg_sq", state.exp_avg_sq)):
        carry |= {f"{moment}.{k}": v.detach()[0] for k, v in tree.items()}
    return carry
