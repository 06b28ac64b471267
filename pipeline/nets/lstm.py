"""The coordinate-wise LSTM of learned optimizers, and its gradient preprocessing, as pure functions.

Andrychowicz et al. 2016 ("Learning to learn by gradient descent by gradient
descent") run one small LSTM over every coordinate of a network's parameters,
a coordinate being one row of a batch, so a few weights serve a network of
any size. Used by L2L (pipeline/algorithms/l2l.py), the Meta-learner LSTM
(meta_lstm.py) and MetaNet's generator of task-level fast weights (fast_weights.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.nets import init


def preprocess(grad: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al.'s preprocessing (section 3.2), ``grad[...] -> [..., 2]``.

    ``(log|g| / p, sgn g)`` where ``|g| >= e^-p``, else ``(-1, e^p g)``: values
    spanning many orders of magnitude become inputs of order one. Raises
    ValueError for ``p <= 0``.
    """
    if not p > 0:
        raise ValueError(f"gradient preprocessing p must be positive, got {p}")
    threshold = math.exp(-p)
    magnitude = grad.abs()
    large = magnitude >= threshold
    first = torch.where(large, magnitude.clamp_min(threshold).log() / p, torch.full_like(grad, -1.0))
    second = torch.where(large, grad.sign(), grad * math.exp(p))
    return torch.stack((first, second), dim=-1)


def cell(
    x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step with gate order i, f, g, o as in ``torch.nn.LSTM`` (one bias: ``b_ih + b_hh``).

    ``x[..., inputs]``, ``h`` and ``c`` ``[..., hidden]``, ``weight_ih[4 hidden, inputs]``,
    ``weight_hh[4 hidden, hidden]``, ``bias[4 hidden]``; returns the new ``(h, c)``.
    """
    gates = F.linear(x, weight_ih, bias) + F.linear(h, weight_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def init_cell(
    inputs: int, hidden: int, gen: torch.Generator, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weight_ih [4h, inputs], weight_hh [4h, h], bias [4h])`` drawn in that order, U(+-1/sqrt(h)) as torch.nn.LSTM.

    Raises ValueError for ``inputs < 1`` or ``hidden < 1``.
    """
    if inputs < 1 or hidden < 1:
        raise ValueError(f"LSTM cell: inputs and hidden must be >= 1, got inputs={inputs}, hidden={hidden}")
    bound = 1.0 / math.sqrt(hidden)
    return (
        init.uniform((4 * hidden, inputs), bound, gen, dtype),
        init.uniform((4 * hidden, hidden), bound, gen, dtype),
        init.uniform((4 * hidden,), bound, gen, dtype),
    )
