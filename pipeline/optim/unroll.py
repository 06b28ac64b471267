"""The differentiable inner loop: optimizer steps on a task loss, kept in the autograd graph or not."""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.optim.base import GradientTransformation, apply_updates
from pipeline.types import Params


def unroll(
    task_losses: Callable[[Params], torch.Tensor],
    params: Params,
    optimizer: GradientTransformation,
    steps: int,
    create_graph: bool,
) -> tuple[Params, torch.Tensor]:
    """Take ``steps`` optimizer steps on ``task_losses(params)``; return the adapted params and the first losses.

    ``task_losses`` returns one loss per task ``[T]`` (or a scalar for one task);
    its sum is differentiated, which gives each task its own gradient when the
    tasks are independent. ``create_graph=True`` keeps the inner gradients
    differentiable (second-order MAML; Adam then wants ``eps_root > 0``);
    otherwise they are taken at detached copies, so the result depends on
    ``params`` only through the update path (first-order MAML, Reptile,
    fine-tuning). The first losses are detached.
    """
    state = optimizer.init(params)
    first = None
    for _ in range(steps):
        at = params if create_graph else {k: v.detach().requires_grad_() for k, v in params.items()}
        losses = task_losses(at)
        if first is None:
            first = losses.detach()
        grads = torch.autograd.grad(losses.sum(), list(at.values()), create_graph=create_graph)
        updates, state = optimizer.update(dict(zip(at, grads)), state)
        params = apply_updates(params, updates)
    return params, first
