"""Adam (Kingma and Ba 2015) as a pure ``init``/``update`` pair: the server's, the inner loop's, fine-tuning's.

The same update as ``torch.optim.Adam`` without weight decay (checked step by
step against it), over a flat tensor (the parameter server's buffer) or a dict
of named tensors with any leading task dimension. ``eps_root`` is added inside
the square root as in TorchOpt and optax. Its default, 1e-16, keeps the derivative
of the update finite where a second moment is exactly 0 (a gradient coordinate
that was always 0, common with dead ReLUs), so any Adam may be differentiated in
an unroll with ``create_graph=True``; it moves no update by more than rounding.
0 gives torch.optim's update exactly: the parameter server's choice.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from pipeline.optim.base import GradientTransformation, State, Tree, tree_map
from pipeline.optim.schedule import Schedule


class AdamState(NamedTuple):
    """Steps taken, and the first and second moment estimates (trees shaped like the params).

    Field names are torch.optim.Adam's; the server checkpoints them as they are.
    """

    step: int
    exp_avg: Tree
    exp_avg_sq: Tree

    @classmethod
    def zeros(cls, params: Tree) -> AdamState:
        """Step 0 and zero moments shaped like ``params``: where every Adam starts."""
        return cls(0, tree_map(torch.zeros_like, params), tree_map(torch.zeros_like, params))


def adam(
    lr: float | Schedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    eps_root: float = 1e-16,
) -> GradientTransformation:
    """Adam with learning rate ``lr`` (a float, or a schedule of the 0-based step count).

    Raises ValueError naming the value for a float ``lr <= 0``, betas outside
    [0, 1), ``eps <= 0`` or ``eps_root < 0``. Reptile's paper uses it in the
    inner loop with ``betas[0] = 0``.
    """
    if not callable(lr) and not lr > 0:
        raise ValueError(f"adam: lr must be positive, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"adam: betas must be two values in [0, 1), got {list(betas)}")
    if not eps > 0:
        raise ValueError(f"adam: eps must be positive, got {eps!r}")
    if not eps_root >= 0:
        raise ValueError(f"adam: eps_root must be >= 0, got {eps_root!r}")
    beta1, beta2 = betas

    def update(grads: Tree, state: State) -> tuple[Tree, AdamState]:
        rate = lr(state.step) if callable(lr) else lr
        step = state.step + 1
        exp_avg = tree_map(lambda m, g: beta1 * m + (1 - beta1) * g, state.exp_avg, grads)
        exp_avg_sq = tree_map(lambda v, g: beta2 * v + g * g * (1 - beta2), state.exp_avg_sq, grads)  # (g*g) first, as before
        step_size = rate / (1 - beta1**step)
        bias2 = 1 - beta2**step
        # optax's form, sqrt(v / bias2 + eps_root); torch.optim divides sqrt(v) by sqrt(bias2), equal up to
        # rounding. This form keeps the server's updates bit for bit what they were (the README's figures).
        updates = tree_map(lambda m, v: -step_size * m / ((v / bias2 + eps_root).sqrt() + eps), exp_avg, exp_avg_sq)
        return updates, AdamState(step, exp_avg, exp_avg_sq)

    return GradientTransformation(AdamState.zeros, update)
