"""Fast weights of Meta Networks: made from loss gradients, kept in memory, used by augmented layers.

Munkhdalai & Yu (2017) generate fast weights with small networks fed with the
loss gradients of the support examples (the meta-information). Both generators
are coordinate-wise: every weight coordinate is one row of a batch, so the same
few meta-parameters serve a layer of any size. The gradients enter through the
log/sign preprocessing of Andrychowicz et al. (2016) (pipeline.nets.lstm).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.nets import init, lstm
from pipeline.types import Params


def init_lstm_generator(prefix: str, hidden: int, gen: torch.Generator, dtype: torch.dtype) -> Params:
    """Coordinate-wise LSTM (2 inputs, ``hidden`` units) and a linear read-out to one value.

    Keys ``{prefix}.w_ih [4h, 2]``, ``{prefix}.w_hh [4h, h]``, ``{prefix}.bias [4h]``,
    ``{prefix}.out.weight [1, h]``, ``{prefix}.out.bias [1]``; uniform(+-1/sqrt(h)) as torch.nn.LSTM.
    """
    w_ih, w_hh, bias = lstm.init_cell(2, hidden, gen, dtype)
    return {
        f"{prefix}.w_ih": w_ih,
        f"{prefix}.w_hh": w_hh,
        f"{prefix}.bias": bias,
        f"{prefix}.out.weight": init.uniform((1, hidden), 1.0 / math.sqrt(hidden), gen, dtype),
        f"{prefix}.out.bias": torch.zeros(1, dtype=dtype),
    }


def lstm_generate(params: Params, prefix: str, grads: torch.Tensor, p: float) -> torch.Tensor:
    """Task-level fast weights from a sequence of gradients: ``grads[B, T, *shape] -> [B, *shape]``.

    The LSTM reads the T preprocessed gradients of each coordinate in order; its
    last hidden state, read out linearly, is that coordinate's fast weight.
    """
    batch, steps, shape = grads.shape[0], grads.shape[1], grads.shape[2:]
    inputs = lstm.preprocess(grads.flatten(2), p)  # [B, T, P, 2]
    w_ih, w_hh, bias = params[f"{prefix}.w_ih"], params[f"{prefix}.w_hh"], params[f"{prefix}.bias"]
    h = inputs.new_zeros(batch, inputs.shape[2], w_hh.shape[1])
    c = torch.zeros_like(h)
    for t in range(steps):
        h, c = lstm.cell(inputs[:, t], h, c, w_ih, w_hh, bias)
    out = F.linear(h, params[f"{prefix}.out.weight"], params[f"{prefix}.out.bias"]).squeeze(-1)
    return out.reshape(batch, *shape)


def init_mlp_generator(prefix: str, hidden: int, gen: torch.Generator, dtype: torch.dtype) -> Params:
    """Coordinate-wise MLP 2 -> hidden -> hidden -> 1 with ReLU (as the authors' code).

    Keys ``{prefix}.l{i}.weight`` and ``{prefix}.l{i}.bias`` for i in 0..2; uniform(+-1/sqrt(fan_in)).
    """
    params: Params = {}
    for i, (fan_in, fan_out) in enumerate(((2, hidden), (hidden, hidden), (hidden, 1))):
        bound = 1.0 / math.sqrt(fan_in)
        params[f"{prefix}.l{i}.weight"] = init.uniform((fan_out, fan_in), bound, gen, dtype)
        params[f"{prefix}.l{i}.bias"] = init.uniform((fan_out,), bound, gen, dtype)
    return params


def mlp_generate(params: Params, prefix: str, grads: torch.Tensor, p: float) -> torch.Tensor:
    """Example-level fast weights, one per gradient: ``grads[...] -> [...]`` (same shape)."""
    h = lstm.preprocess(grads, p)
    for i in range(3):
        h = F.linear(h, params[f"{prefix}.l{i}.weight"], params[f"{prefix}.l{i}.bias"])
        if i < 2:
            h = F.relu(h)
    return h.squeeze(-1)


def fast_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x[*batch, in]`` times a weight ``[*batch, out, in]`` of its own per batch entry (broadcast allowed)."""
    return torch.matmul(weight, x.unsqueeze(-1)).squeeze(-1)


def augmented_linear(x: torch.Tensor, slow: torch.Tensor, fast: torch.Tensor, activation: bool = True) -> torch.Tensor:
    """Layer augmentation: the slow ``[out, in]`` and fast ``[*batch, out, in]`` branches on the same input.

    Hidden layers pass each branch through a ReLU and add them; the softmax
    layer (``activation=False``) adds the two transformed inputs before the
    softmax, as the paper does for its output layer.
    """
    slow_out, fast_out = F.linear(x, slow), fast_linear(x, fast)
    if activation:
        return F.relu(slow_out) + F.relu(fast_out)
    return slow_out + fast_out


def attention_weights(keys: torch.Tensor, queries: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Softmax over cosine similarities: ``keys[B, S, R]``, ``queries[B, Q, R] -> [B, Q, S]``.

    ``scale`` multiplies the cosines before the softmax (1 in the paper).
    """
    cosine = F.normalize(queries, dim=-1, eps=1e-8) @ F.normalize(keys, dim=-1, eps=1e-8).transpose(1, 2)
    return torch.softmax(scale * cosine, dim=-1)


def attention_read(
    keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """Read memory ``values[B, S, *shape]`` with attention from ``queries[B, Q, R]``: ``[B, Q, *shape]``."""
    weights = attention_weights(keys, queries, scale)
    shape = values.shape[2:]
    return (weights @ values.flatten(2)).unflatten(2, shape)
