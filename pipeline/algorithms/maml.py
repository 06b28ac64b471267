"""MAML (Finn et al. 2017), first-order MAML and Meta-SGD (Li et al. 2017), as pure functions.

The meta-loss of a batch of episodes is the mean over tasks of the query loss
after ``inner_steps`` of SGD on the task's support set, starting from the
meta-parameters. Second-order MAML differentiates through the inner
gradients; first-order MAML treats them as constants; Meta-SGD learns one
inner learning rate per parameter (parameters ``inner_lr.<name>``).

Three ways to batch the tasks of a meta-batch compute the same numbers:
``loop`` (one task at a time with torch.autograd.grad(create_graph=True), the
way learn2learn and higher do it; the reference), ``stacked`` (all tasks in
one pass of the network's ``apply_tasks``: batched matmuls and grouped
convolutions, per-task BatchNorm) and ``vmap`` (torch.func.vmap of the
per-task function). ``auto`` is ``stacked``, the fastest on CPUs and GPUs alike in bench/throughput.py.

``checkpoint`` recomputes each inner step in the backward pass (torch.utils.checkpoint):
second-order memory of one inner step instead of all of them, the same meta-gradient.

ANIL (Raghu et al. 2020, "Rapid learning or feature reuse?"): ``adapt_params``, globs
over parameter names (``("head.*",)``), restricts the inner loop to the parameters
they match; the others stay at their meta-parameter values during adaptation and
are meta-learned only (through the query loss, and second order through the
inner gradients).

``adapt_norm=False`` (cbfinn/maml's): the BatchNorm parameters stay out of the inner
loop, like ANIL's non-adapted ones; they are meta-learned only. In cbfinn's ``maml.py``
the inner step ``tf.gradients(task_lossa, list(weights.values()))`` covers the
``weights`` dict (convolutions, biases, head), while ``tf.contrib.layers.batch_norm``'s
offset is a variable of its own, trained only by the outer Adam.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.algorithms.meta_batch import episodes_per_pass, sliced_meta_grad
from pipeline.nets.conv4 import Conv4
from pipeline.nets.mlp import MLP
from pipeline.nets.module import ModuleNet, for_evaluation
from pipeline.nets.norm import query_outputs
from pipeline.optim.base import GradientTransformation, apply_updates
from pipeline.optim.sgd import sgd
from pipeline.optim.unroll import unroll
from pipeline.types import Metrics, Params, Predictor
from tasks.episodes import Episodes

LossKind = Literal["cross_entropy", "mse"]
Batching = Literal["auto", "loop", "stacked", "vmap"]
LR_PREFIX = "inner_lr."
Network = MLP | Conv4 | ModuleNet


def task_losses(kind: LossKind, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean loss of each task: ``out[..., N, O]`` against ``y[..., N]`` labels or ``y[..., N, O]`` targets."""
    if kind == "cross_entropy":
        return F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="none").view(y.shape).mean(-1)
    return (out - y).square().mean(dim=(-2, -1))


def task_accuracy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fraction of correct argmax predictions of each task."""
    return (out.argmax(-1) == y).to(out.dtype).mean(-1)


def adapted_names(names: Iterable[str], patterns: tuple[str, ...] | None) -> frozenset[str]:
    """The parameter names the inner loop adapts: those matching any glob of ``patterns`` (fnmatch); all when None."""
    names = list(names)
    if patterns is None:
        return frozenset(names)
    return frozenset(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))


def unmatched_patterns(names: Iterable[str], patterns: tuple[str, ...]) -> list[str]:
    """The globs of ``patterns`` that match none of ``names`` (a config error: a typo would silently adapt nothing)."""
    names = list(names)
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]


def resolve_batching(batching: Batching, network: Network, device: torch.device) -> Batching:
    """The batching ``auto`` stands for: ``stacked`` for the built-in networks, on a CPU and a GPU alike
    (measured with bench/throughput.py); for a module (no hand-batched path), ``vmap`` on a GPU and ``loop`` on a CPU.

    Second-order Omniglot 5w1s, meta-batch 32, on 2 pinned Xeon cores: stacked in
    chunks of 8 beat the loop 1.06x (1.5x with bench/throughput.py's MALLOC_ENV)
    and vmap; on an H100 stacked beat vmap 1.2x and the loop 19x.
    """
    if batching != "auto":
        return batching
    if isinstance(network, ModuleNet):
        return "vmap" if device.type == "cuda" else "loop"
    return "stacked"


def adapt_tasks(
    network: Network,
    loss: LossKind,
    optimizer: GradientTransformation,
    params: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    steps: int,
    create_graph: bool,
    adapt: frozenset[str] | None = None,
    checkpoint: bool = False,
) -> tuple[Params, torch.Tensor]:
    """Adapt stacked tasks in one pass: adapted parameters and the support losses before adapting.

    The parameters named in ``adapt`` (all when None) come back per task (leading task
    dimension); the others come back as they are, shared by the tasks (ANIL).
    ``checkpoint``: recompute each inner step in the backward pass (``optim.unroll``).
    """
    tasks = support_x.shape[0]
    frozen = {k: v for k, v in params.items() if adapt is not None and k not in adapt}
    fast = {k: v.expand(tasks, *v.shape) for k, v in params.items() if k not in frozen}

    def losses(p: Params) -> torch.Tensor:
        return task_losses(loss, network.apply_tasks(frozen | p, support_x), support_y)

    fast, first = unroll(losses, fast, optimizer, steps, create_graph, checkpoint)
    return frozen | fast, first


def predictor(
    network: Network,
    loss: LossKind,
    optimizer: GradientTransformation,
    params: Params,
    support_x: torch.Tensor,
    support_y: torch.Tensor,
    steps: int,
    adapt: frozenset[str] | None = None,
) -> Predictor:
    """Adapt to one task's support set and return the predictor of its query inputs.

    In the network's ``transductive`` norm mode (MAML's) BatchNorm normalizes each call's
    queries with their own statistics: call the predictor on the whole query set at once.
    In ``support`` mode each query's prediction is independent of the others in the call.
    A module network runs in eval mode (``for_evaluation``: dropout off), adapting and predicting.
    """
    network = for_evaluation(network)
    detached = {k: v.detach() for k, v in params.items()}
    with torch.enable_grad():
        fast, _ = adapt_tasks(network, loss, optimizer, detached, support_x[None], support_y[None], steps, False, adapt)
    fast = {k: v.detach() for k, v in fast.items()}

    def predict(query_x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return query_outputs(network, fast, support_x[None], query_x[None])[0]

    return predict


def evaluate_tasks(
    network: Network,
    loss: LossKind,
    optimizer: GradientTransformation,
    params: Params,
    episodes: Episodes,
    steps: int,
    chunk: int = 32,
    adapt: frozenset[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-episode query metrics before (``pre_``) and after ``steps`` of adaptation, ``chunk`` tasks at a time.

    Returns tensors of shape ``[len(episodes)]``: ``loss``, ``pre_loss`` and, for
    classification, ``accuracy`` and ``pre_accuracy``. A module network runs in eval mode
    (``for_evaluation``: dropout off).
    """
    network = for_evaluation(network)
    detached = {k: v.detach() for k, v in params.items()}
    rows: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(episodes), chunk):
        part = episodes[start : start + chunk]
        with torch.enable_grad():
            fast, _ = adapt_tasks(network, loss, optimizer, detached, part.support_x, part.support_y, steps, False, adapt)
        row = {}
        with torch.no_grad():
            for prefix, p in (("", fast), ("pre_", detached)):
                out = query_outputs(network, {k: v.detach() for k, v in p.items()}, part.support_x, part.query_x)
                row[prefix + "loss"] = task_losses(loss, out, part.query_y)
                if loss == "cross_entropy":
                    row[prefix + "accuracy"] = task_accuracy(out, part.query_y)
        rows.append(row)
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def query_metrics(
    loss: LossKind, losses: torch.Tensor, out: torch.Tensor, y: torch.Tensor, pre: torch.Tensor
) -> Metrics:
    """Batch metrics: post-adaptation query ``loss`` (and ``accuracy``), ``support_loss`` before adapting."""
    metrics = {"loss": losses.mean().item(), "support_loss": pre.mean().item()}
    if loss == "cross_entropy":
        metrics["accuracy"] = task_accuracy(out, y).mean().item()
    return metrics


@dataclass(frozen=True)
class MAML:
    """Second- or first-order MAML over ``network`` with an SGD inner loop.

    ``inner_loss_scale`` multiplies the inner loss (so the inner gradient) of the mean
    support loss: ``ways`` reproduces cbfinn/maml's classification inner step (``utils.py``
    ``xent`` divides each example's loss by K and ``tf.gradients`` sums over the N*K examples).
    """

    network: Network
    loss: LossKind
    inner_lr: float
    inner_steps: int = 1
    eval_inner_steps: int | None = None
    first_order: bool = False
    learn_inner_lr: bool = False
    batching: Batching = "auto"
    task_chunk: int | None = None
    inner_loss_scale: float = 1.0
    adapt_params: tuple[str, ...] | None = None
    checkpoint: bool = False
    adapt_norm: bool = True

    def __post_init__(self) -> None:
        if not self.inner_loss_scale > 0:
            raise ValueError(f"MAML.inner_loss_scale must be positive, got {self.inner_loss_scale}")
        if self.adapt_params is not None:
            unmatched = unmatched_patterns(self.network.init(0), self.adapt_params)
            if unmatched:
                raise ValueError(f"MAML.adapt_params: {unmatched} match no parameter of the network")
            if not self._adapted(self.network.init(0)):
                raise ValueError(f"MAML.adapt_params: {list(self.adapt_params)} match only BatchNorm parameters, which adapt_norm=False keeps out")
        if self.checkpoint and self.batching == "vmap":
            raise ValueError("MAML.checkpoint recomputes inner steps with torch.utils.checkpoint: use batching loop or stacked, not vmap")
        if self.task_chunk is not None and self.task_chunk < 1:
            raise ValueError(f"MAML.task_chunk must be at least 1, got {self.task_chunk}")
        if self.loss not in ("cross_entropy", "mse"):
            raise ValueError(f"MAML.loss must be 'cross_entropy' or 'mse', got {self.loss!r}")
        if self.batching not in ("auto", "loop", "stacked", "vmap"):
            raise ValueError(f"MAML.batching must be auto, loop, stacked or vmap, got {self.batching!r}")
        if not self.inner_lr > 0 or self.inner_steps < 1:
            raise ValueError(
                f"MAML: need inner_lr > 0 and inner_steps >= 1, got {self.inner_lr}, {self.inner_steps}"
            )

    def init(self, seed: int, dtype: torch.dtype = torch.float32) -> Params:
        """The network's initial parameters (plus the Meta-SGD rates of the adapted ones, all ``inner_lr``)."""
        params = self.network.init(seed, dtype)
        if self.learn_inner_lr:
            adapt = self._adapted(params)
            params.update({LR_PREFIX + k: torch.full_like(v, self.inner_lr) for k, v in list(params.items()) if k in adapt})
        return params

    def _adapted(self, names: Iterable[str]) -> frozenset[str]:
        """The parameter names the inner loop adapts: ``adapt_params``' (all when None), less BatchNorm's unless ``adapt_norm``."""
        adapt = adapted_names(names, self.adapt_params)
        return adapt if self.adapt_norm else adapt - self.network.batch_norm_names()

    def _inner(self, params: Params) -> tuple[Params, GradientTransformation, frozenset[str]]:
        """The network's parameters, the inner SGD (with the Meta-SGD rates of ``params``) and the adapted names."""
        net = {k: v for k, v in params.items() if not k.startswith(LR_PREFIX)}
        adapt = self._adapted(net)
        scale = self.inner_loss_scale  # SGD on scale * loss: the rates times scale
        if not self.learn_inner_lr:
            return net, sgd(scale * self.inner_lr), adapt
        missing = [LR_PREFIX + k for k in adapt if LR_PREFIX + k not in params]
        if missing:
            raise KeyError(f"learn_inner_lr: params lack the Meta-SGD rates {missing}; build them with init()")
        return net, sgd({k: scale * params[LR_PREFIX + k] for k in adapt}), adapt

    def _query(self, fast: Params, episodes: Episodes) -> tuple[torch.Tensor, torch.Tensor]:
        out = query_outputs(self.network, fast, episodes.support_x, episodes.query_x)
        return task_losses(self.loss, out, episodes.query_y), out

    def _task_losses(self, params: Params, episodes: Episodes, batching: Batching) -> tuple[torch.Tensor, Metrics]:
        """Post-adaptation query loss of each task, differentiable w.r.t. ``params``."""
        create_graph = not self.first_order
        if batching == "stacked":
            net, optimizer, adapt = self._inner(params)
            fast, pre = adapt_tasks(
                self.network, self.loss, optimizer, net, episodes.support_x, episodes.support_y,
                self.inner_steps, create_graph, adapt, self.checkpoint,
            )
            losses, out = self._query(fast, episodes)
            return losses, query_metrics(self.loss, losses, out, episodes.query_y, pre)
        if batching == "vmap":
            return self._vmap_losses(params, episodes)
        parts = [self._one_task(params, episodes[i]) for i in range(len(episodes))]
        losses = torch.cat([p[0] for p in parts])
        return losses, {k: sum(p[1][k] for p in parts) / len(parts) for k in parts[0][1]}

    def _one_task(self, params: Params, episode: Episodes) -> tuple[torch.Tensor, Metrics]:
        """The reference: one task through ``network.apply`` with torch.autograd.grad, no task dimension."""
        net, optimizer, adapt = self._inner(params)
        sx, sy, qx, qy = (t[0] for t in (episode.support_x, episode.support_y, episode.query_x, episode.query_y))
        frozen = {k: v for k, v in net.items() if k not in adapt}

        def losses(p: Params) -> torch.Tensor:
            return task_losses(self.loss, self.network.apply(frozen | p, sx), sy)

        fast, pre = unroll(
            losses, {k: net[k] for k in adapt}, optimizer, self.inner_steps, not self.first_order, self.checkpoint
        )
        fast = frozen | fast
        out = query_outputs(self.network, fast, sx[None], qx[None])[0]
        loss = task_losses(self.loss, out, qy)
        return loss[None], query_metrics(self.loss, loss, out, qy, pre)

    def _vmap_losses(self, params: Params, episodes: Episodes) -> tuple[torch.Tensor, Metrics]:
        net, optimizer, adapt = self._inner(params)
        frozen = {k: v for k, v in net.items() if k not in adapt}

        def support_loss(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return task_losses(self.loss, self.network.apply(frozen | p, x), y)

        def one_task(sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor):
            fast = {k: net[k] for k in adapt}
            state = optimizer.init(fast)
            pre = support_loss(fast, sx, sy)
            for _ in range(self.inner_steps):
                grads = torch.func.grad(support_loss)(fast, sx, sy)
                if self.first_order:
                    grads = {k: g.detach() for k, g in grads.items()}
                updates, state = optimizer.update(grads, state)
                fast = apply_updates(fast, updates)
            out = query_outputs(self.network, frozen | fast, sx[None], qx[None])[0]
            return task_losses(self.loss, out, qy), out, pre

        e = episodes
        losses, out, pre = torch.func.vmap(one_task, randomness="different")(e.support_x, e.support_y, e.query_x, e.query_y)
        return losses, query_metrics(self.loss, losses, out, e.query_y, pre)

    def _batching(self, device: torch.device) -> Batching:
        """``batching`` resolved (``resolve_batching``); with ``checkpoint``, ``auto`` never picks vmap."""
        batching = resolve_batching(self.batching, self.network, device)
        return "loop" if self.checkpoint and batching == "vmap" else batching

    def meta_loss(self, params: Params, episodes: Episodes) -> tuple[torch.Tensor, Metrics]:
        """Mean post-adaptation query loss over the episodes, differentiable w.r.t. ``params``."""
        batching = self._batching(episodes.support_x.device)
        losses, metrics = self._task_losses(params, episodes, batching)
        return losses.mean(), metrics

    def meta_grad(self, params: Params, episodes: Episodes) -> tuple[Params, Metrics]:
        """Gradient of ``meta_loss`` w.r.t. every parameter.

        ``loop`` and ``stacked`` backpropagate ``task_chunk`` tasks at a time (1 for
        the loop) and sum the gradients: same numbers, less memory, and on a CPU
        chunks of 8 keep the working set in cache (bench/throughput.py).
        """
        device = episodes.support_x.device
        batching = self._batching(device)
        if batching == "vmap":
            keys = list(params)
            loss, metrics = self.meta_loss(params, episodes)
            return dict(zip(keys, torch.autograd.grad(loss, [params[k] for k in keys]))), metrics
        n = len(episodes)
        size = 1 if batching == "loop" else episodes_per_pass(self.task_chunk, device, 8 if isinstance(self.network, Conv4) else n, n)
        return sliced_meta_grad(params, episodes, size, lambda part: self._task_losses(params, part, batching))

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Adapt to one task with ``eval_inner_steps`` (default ``inner_steps``); see ``predictor``."""
        net, optimizer, adapt = self._inner(params)
        return predictor(self.network, self.loss, optimizer, net, support_x, support_y, self._eval_steps(), adapt)

    def _eval_steps(self) -> int:
        return self.eval_inner_steps or self.inner_steps

    def evaluate(
        self, params: Params, episodes: Episodes, steps: int | None = None, chunk: int = 32
    ) -> dict[str, torch.Tensor]:
        """Per-episode metrics after ``steps`` (default ``eval_inner_steps``); see ``evaluate_tasks``."""
        net, optimizer, adapt = self._inner(params)
        return evaluate_tasks(self.network, self.loss, optimizer, net, episodes, steps or self._eval_steps(), chunk, adapt)
