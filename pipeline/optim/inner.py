"""Inner-loop optimizers as pairs of pure functions, in the style of TorchOpt.

``init(params) -> state`` and ``update(grads, state) -> (deltas, state)``; the
new parameters are ``apply_updates(params, deltas)``. Nothing is updated in
place, so the updates stay differentiable (MAML backpropagates through SGD),
and every tensor may carry a leading task dimension (the state follows it).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from pipeline.types import Params

State = tuple
"""An optimizer's state: an immutable tuple of tensors and counters."""


class InnerOptimizer(NamedTuple):
    """An ``init``/``update`` pair."""

    init: Callable[[Params], State]
    update: Callable[[Params, State], tuple[Params, State]]


def apply_updates(params: Params, deltas: Params) -> Params:
    """``params + deltas`` key by key (keys of ``params`` absent from ``deltas`` stay as they are)."""
    return {k: v + deltas[k] if k in deltas else v for k, v in params.items()}


def sgd(lr: float | Params) -> InnerOptimizer:
    """Plain SGD; ``lr`` is a float or one tensor per parameter (Meta-SGD's learnable rates)."""
    if isinstance(lr, (int, float)) and not lr > 0:
        raise ValueError(f"sgd: lr must be positive, got {lr!r}")

    def init(params: Params) -> State:
        return ()

    def update(grads: Params, state: State) -> tuple[Params, State]:
        if isinstance(lr, dict):
            return {k: -lr[k] * g for k, g in grads.items()}, state
        return {k: -lr * g for k, g in grads.items()}, state

    return InnerOptimizer(init, update)


def adam(lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> InnerOptimizer:
    """Adam (Kingma and Ba), the same update as torch.optim.Adam without weight decay.

    Reptile's paper uses it in the inner loop with ``betas[0] = 0``.
    """
    if not lr > 0:
        raise ValueError(f"adam: lr must be positive, got {lr!r}")
    if not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"adam: betas must lie in [0, 1), got {list(betas)}")
    if not eps > 0:
        raise ValueError(f"adam: eps must be positive, got {eps!r}")
    beta1, beta2 = betas

    def init(params: Params) -> State:
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        return (0, zeros, dict(zeros))

    def update(grads: Params, state: State) -> tuple[Params, State]:
        count, mu, nu = state
        count += 1
        mu = {k: beta1 * mu[k] + (1 - beta1) * g for k, g in grads.items()}
        nu = {k: beta2 * nu[k] + (1 - beta2) * g * g for k, g in grads.items()}
        step = lr / (1 - beta1**count)
        root = (1 - beta2**count) ** 0.5
        deltas = {k: -step * mu[k] / (nu[k].sqrt() / root + eps) for k in grads}
        return deltas, (count, mu, nu)

    return InnerOptimizer(init, update)


def unroll(
    task_losses: Callable[[Params], torch.Tensor],
    params: Params,
    optimizer: InnerOptimizer,
    steps: int,
    create_graph: bool,
) -> tuple[Params, torch.Tensor]:
    """Take ``steps`` optimizer steps on ``task_losses(params)``; return the adapted params and the first losses.

    ``task_losses`` returns one loss per task (or a scalar for one task); its sum
    is differentiated, which gives each task its own gradient when the tasks
    are independent. ``create_graph=True`` keeps the inner gradients
    differentiable (second-order MAML); otherwise they are taken at detached
    copies, so the result depends on ``params`` only through the update path
    (first-order MAML, Reptile).
    """
    state = optimizer.init(params)
    first = None
    for _ in range(steps):
        at = params if create_graph else {k: v.detach().requires_grad_() for k, v in params.items()}
        losses = task_losses(at)
        if first is None:
            first = losses.detach()
        grads = torch.autograd.grad(losses.sum(), list(at.values()), create_graph=create_graph)
        deltas, state = optimizer.update(dict(zip(at, grads)), state)
        params = apply_updates(params, deltas)
    return params, first
