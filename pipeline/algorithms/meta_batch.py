"""The gradient of a meta-batch's mean loss, computed a slice of episodes at a time.

MAML (``loop`` and ``stacked`` batching) and Meta Networks backpropagate a meta-batch in slices so
that one slice's autograd graph is alive at a time. Episodes do not interact in either learner, so
summing each slice's gradient of ``sum(per-episode losses) / n`` gives the gradient of the whole
meta-batch's mean loss, to float rounding.

How many episodes go in one pass is a learner's choice, measured per device type (``episodes_per_pass``).
"""

from collections.abc import Callable

import torch

from pipeline.types import Metrics, Params
from tasks.episodes import Episodes

EpisodeLosses = Callable[[Episodes], tuple[torch.Tensor, Metrics]]
"""Per-episode losses ``[len(part)]`` of a slice of episodes, differentiable, and that slice's mean metrics."""


def episodes_per_pass(asked: int | None, device: torch.device, cpu: int, gpu: int) -> int:
    """Episodes per pass: ``asked`` when given, else the learner's default for ``device``: ``cpu`` on a CPU,
    ``gpu`` on an accelerator (each learner's own figures, from its benchmark where one was measured)."""
    if asked is not None:
        return asked
    return cpu if device.type == "cpu" else gpu


def sliced_meta_grad(params: Params, episodes: Episodes, size: int, losses_of: EpisodeLosses) -> tuple[Params, Metrics]:
    """Gradient of the mean of ``losses_of(episodes)`` w.r.t. ``params``, ``size`` episodes per backward pass.

    ``params`` are the leaves ``losses_of`` differentiates through (each gradient has its
    parameter's shape; a parameter no slice uses gets zeros). Metrics are the slices' metrics
    weighted by their share of the episodes (the meta-batch's means when each metric is a
    per-slice mean). Raises ``ValueError`` for ``size < 1``.
    """
    if size < 1:
        raise ValueError(f"episodes per backward pass must be at least 1, got {size}")
    keys = list(params)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    metrics: Metrics = {}
    n = len(episodes)
    for start in range(0, n, size):
        part = episodes[start : start + size]
        losses, part_metrics = losses_of(part)
        grads = torch.autograd.grad(losses.sum() / n, [params[k] for k in keys], allow_unused=True)
        for k, g in zip(keys, grads):
            if g is not None:
                total[k] += g
        for k, v in part_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v * len(part) / n
    return total, metrics
