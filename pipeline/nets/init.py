"""Seeded initializers: every draw from an explicit ``torch.Generator``, in float64, then cast.

Drawing in float64 and casting makes a parameter's value independent of the
dtype asked for (float32 params are the float64 ones rounded), and the same
generator state always gives bit-identical tensors: checkpoints and tests rely
on it, so the arithmetic of each initializer below must not change.
"""
from __future__ import annotations

import math

import torch


def generator(seed: int | torch.Generator) -> torch.Generator:
    """``seed`` itself when it is a generator (to draw several networks from one stream), else a fresh seeded one."""
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(seed)


def uniform(shape: tuple[int, ...], bound: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """U(-bound, bound) of ``shape``, computed as ``(r * 2 - 1) * bound`` with r ~ U(0, 1)."""
    return ((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(dtype)


def uniform_between(shape: tuple[int, ...], low: float, high: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """U(low, high) of ``shape``, computed as ``r * (high - low) + low`` with r ~ U(0, 1)."""
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * (high - low) + low).to(dtype)


def xavier_uniform(shape: tuple[int, ...], fan_in: int, fan_out: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Glorot and Bengio's uniform initialization: U(-b, b) with ``b = sqrt(6 / (fan_in + fan_out))``."""
    return uniform(shape, (6.0 / (fan_in + fan_out)) ** 0.5, gen, dtype)


def kaiming_normal(shape: tuple[int, ...], fan_in: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """He et al.'s normal initialization for ReLU layers: N(0, 2 / fan_in)."""
    return normal(shape, math.sqrt(2.0 / fan_in), gen, dtype)


def normal(shape: tuple[int, ...], std: float, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """N(0, std^2) of ``shape``, computed as ``z * std`` with z ~ N(0, 1)."""
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype)
