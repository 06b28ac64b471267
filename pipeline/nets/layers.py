"""The layers of the built-in networks, batched over tasks by hand (the measured fast path).

Each takes a stack of tasks ``x[T, N, ...]`` and parameters either shared by all tasks
(no task dimension: one big matmul/convolution over all T*N inputs) or per task (a
leading task dimension of size T: batched matmuls and grouped convolutions).
BatchNorm is written by hand and normalizes with each task's own batch statistics
(transductive, as in MAML), over the whole batch or its first ``stats`` examples
(pipeline/nets/norm.py), or with statistics given per task (the Meta-LSTM's running
statistics), so a task's output never depends on the other tasks it is batched with.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def linear_tasks(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x[T, N, in]`` times a shared ``[out, in]`` or per-task ``[T, out, in]`` weight, plus a shared ``[out]`` or
    per-task ``[T, out]`` bias (the two may differ: ANIL adapts some parameters per task, not others)."""
    if weight.dim() == 2 and bias.dim() == 1:
        return F.linear(x, weight, bias)
    if weight.dim() == 2:
        return torch.baddbmm(bias.unsqueeze(-2), x, weight.T.expand(x.shape[0], -1, -1))
    return torch.baddbmm(bias.unsqueeze(-2), x, weight.transpose(1, 2))


def conv_tasks(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """3x3 'same' convolution of ``x[T, N, C, H, W]``: one conv for a shared weight, grouped per task otherwise."""
    t, n = x.shape[:2]
    if weight.dim() == 4:
        return F.conv2d(x.flatten(0, 1), weight, stride=stride, padding=1).unflatten(0, (t, n))
    # tasks become channel groups: [N, T*C, H, W] with weight [T*F, C, 3, 3]
    out = F.conv2d(x.transpose(0, 1).flatten(1, 2), weight.flatten(0, 1), stride=stride, padding=1, groups=t)
    return out.unflatten(1, (t, weight.shape[1])).transpose(0, 1)


def batch_norm_tasks(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor,
    eps: float,
    moments: Moments | None = None,
    stats: int | None = None,
) -> torch.Tensor:
    """Normalize ``x[T, N, F, H, W]`` with each task's mean and biased variance over (N, H, W), then scale by
    ``gamma`` (None: no scale, as cbfinn/maml's ``tf.contrib.layers.batch_norm``) and shift by ``beta``.

    ``moments``: given statistics in place of the batch's own (running statistics;
    see pipeline/algorithms/meta_lstm.py). ``stats``: take the batch's over its first
    ``stats`` of the N examples only (the support set, in ``support`` norm mode); None:
    over all N.
    Written out rather than F.batch_norm: native batch_norm under torch.func.vmap
    gave second-order meta-gradients about 1% off (issue 4).
    """
    mean, var, _ = moments if moments is not None else batch_moments(x if stats is None else x[:, :stats])
    shape = (-1, 1, x.shape[2], 1, 1)
    scale = torch.rsqrt(var + eps) if gamma is None else torch.rsqrt(var + eps) * gamma.reshape(shape)
    # (x - mean) * scale + beta with one full-size pass; scale and shift are [T, 1, F, 1, 1]
    return torch.addcmul(beta.reshape(shape) - mean * scale, x, scale)


class Moments(NamedTuple):
    """BatchNorm statistics of a stack of tasks: ``mean`` and biased ``var`` ``[T, 1, F, 1, 1]`` over ``count`` values."""

    mean: torch.Tensor
    var: torch.Tensor
    count: int


def batch_moments(x: torch.Tensor) -> Moments:
    """Each task's mean and biased variance of ``x[T, N, F, H, W]`` over (N, H, W)."""
    var, mean = torch.var_mean(x, dim=(1, 3, 4), correction=0, keepdim=True)
    return Moments(mean, var, x.shape[1] * x.shape[3] * x.shape[4])
