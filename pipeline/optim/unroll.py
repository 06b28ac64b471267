"""The differentiable inner loop: optimizer steps on a task loss, kept in the autograd graph or not."""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from pipeline.optim.base import GradientTransformation, State, apply_updates
from pipeline.types import Params


def unroll(
    task_losses: Callable[[Params], torch.Tensor],
    params: Params,
    optimizer: GradientTransformation,
    steps: int,
    create_graph: bool,
    checkpoint: bool = False,
) -> tuple[Params, torch.Tensor]:
    """``unroll_from`` a fresh optimizer state (``optimizer.init(params)``): the adapted params and the first losses."""
    params, _, first = unroll_from(task_losses, params, optimizer, optimizer.init(params), steps, create_graph, checkpoint)
    return params, first


def unroll_from(
    task_losses: Callable[[Params], torch.Tensor],
    params: Params,
    optimizer: GradientTransformation,
    state: State,
    steps: int,
    create_graph: bool,
    checkpoint: bool = False,
) -> tuple[Params, State, torch.Tensor]:
    """Take ``steps`` optimizer steps on ``task_losses(params)`` from the optimizer state ``state`` (an earlier
    unroll's, as Reptile's carried inner Adam); return the adapted params, the optimizer state after them and
    the first losses.

    ``task_losses`` returns one loss per task ``[T]`` (or a scalar for one task);
    its sum is differentiated, which gives each task its own gradient when the
    tasks are independent. ``create_graph=True`` keeps the inner gradients
    differentiable (second-order MAML; Adam then wants ``eps_root > 0``);
    otherwise they are taken at detached copies, so the result depends on
    ``params`` only through the update path (first-order MAML, Reptile,
    fine-tuning). The first losses are detached.

    ``checkpoint=True`` (with ``create_graph``) keeps only each step's input parameters
    for the backward pass and recomputes the step's forward and inner gradient there
    (``torch.utils.checkpoint``, non-reentrant): memory of one step instead of ``steps``,
    for about one more forward-and-backward per step; the same gradients.
    """

    def step(params: Params, state: tuple) -> tuple[Params, tuple, torch.Tensor]:
        at = params if create_graph else {k: v.detach().requires_grad_() for k, v in params.items()}
        losses = task_losses(at)
        grads = torch.autograd.grad(losses.sum(), list(at.values()), create_graph=create_graph)
        updates, state = optimizer.update(dict(zip(at, grads)), state)
        return apply_updates(params, updates), state, losses.detach()

    first = None
    for _ in range(steps):
        if checkpoint and create_graph:
            params, state, losses = torch_checkpoint(step, params, state, use_reentrant=False)
        else:
            params, state, losses = step(params, state)
        if first is None:
            first = losses
    return params, state, first
