"""The MLP of the MAML paper's sinusoid regression as a pure function over a dict of parameters.

A frozen dataclass with ``init(seed) -> Params``, ``apply(params, x)`` for one task and
``apply_tasks(params, x[T, N, in])`` for a stack of tasks in one pass (pipeline/nets/layers.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.nets import init
from pipeline.nets.layers import linear_tasks
from pipeline.types import Params


@dataclass(frozen=True)
class MLP:
    """Fully connected ReLU network; the sinusoid net of the MAML paper is ``sizes=(1, 40, 40, 1)``.

    Parameters ``layer{i}.weight`` ``[out, in]`` (Xavier-uniform) and ``layer{i}.bias`` (zeros).
    """

    sizes: tuple[int, ...] = (1, 40, 40, 1)

    def init(self, seed: int | torch.Generator, dtype: torch.dtype = torch.float32) -> Params:
        """Fresh parameters, identical for the same seed."""
        gen = init.generator(seed)
        params: Params = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            params[f"layer{i}.weight"] = init.xavier_uniform((fan_out, fan_in), fan_in, fan_out, gen, dtype)
            params[f"layer{i}.bias"] = torch.zeros(fan_out, dtype=dtype)
        return params

    def batch_norm_names(self) -> frozenset[str]:
        """No BatchNorm: no names."""
        return frozenset()

    def apply(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """One task: ``x[N, in] -> [N, out]``."""
        return self.apply_tasks(params, x.unsqueeze(0)).squeeze(0)

    def apply_tasks(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Stacked tasks: ``x[T, N, in] -> [T, N, out]``; params shared or with a leading T."""
        layers = len(self.sizes) - 1
        for i in range(layers):
            x = linear_tasks(x, params[f"layer{i}.weight"], params[f"layer{i}.bias"])
            if i < layers - 1:
                x = F.relu(x)
        return x
