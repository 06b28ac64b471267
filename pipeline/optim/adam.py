"""Adam as a pair of pure functions over flat buffers (the parameter server's optimizer).

Written as ``init``/``update`` in the TorchOpt style so the server holds plain
tensors that checkpoint as they are; checked step by step against torch.optim.Adam.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from pipeline.config import OptimizerConfig


class AdamState(NamedTuple):
    """Step count and the first and second moment estimates."""

    step: int
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor


def init(params: torch.Tensor) -> AdamState:
    """Zero moments shaped like ``params``."""
    return AdamState(0, torch.zeros_like(params), torch.zeros_like(params))


def learning_rate(config: OptimizerConfig, step: int, total_steps: int) -> float:
    """The learning rate at 0-based ``step`` under the configured schedule."""
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return config.lr


def clip(grad: torch.Tensor, max_norm: float | None) -> tuple[torch.Tensor, float]:
    """Scale ``grad`` to at most ``max_norm`` in L2 norm; returns the clipped grad and the original norm."""
    norm = float(grad.norm())
    if max_norm is not None and norm > max_norm:
        grad = grad * (max_norm / (norm + 1e-6))
    return grad, norm


def update(
    grad: torch.Tensor, state: AdamState, lr: float, betas: tuple[float, float], eps: float
) -> tuple[torch.Tensor, AdamState]:
    """The additive update (to be added to the params) and the new state, as torch.optim.Adam."""
    beta1, beta2 = betas
    step = state.step + 1
    exp_avg = state.exp_avg * beta1 + grad * (1 - beta1)
    exp_avg_sq = state.exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    bias1 = 1 - beta1**step
    bias2 = 1 - beta2**step
    denom = (exp_avg_sq / bias2).sqrt() + eps
    return -(lr / bias1) * exp_avg / denom, AdamState(step, exp_avg, exp_avg_sq)
