"""The Conv4 of the MAML paper as a pure function over a dict of parameters.

A frozen dataclass with ``init(seed) -> Params``, ``apply(params, x)`` for one task and
``apply_tasks(params, x[T, N, C, H, W])`` for a stack of tasks in one pass, shared or
per-task parameters alike (pipeline/nets/layers.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.nets import init
from pipeline.nets.layers import (
    Moments,
    batch_moments,
    batch_norm_tasks,
    conv_tasks,
    linear_tasks,
)
from pipeline.nets.norm import NORM_MODES, NormMode
from pipeline.types import Params


@dataclass(frozen=True)
class Conv4:
    """The Conv4 of the MAML paper: 4 x (3x3 conv, BatchNorm, ReLU), then a linear head to ``ways``.

    ``downsample="stride"`` (Omniglot): stride-2 convolutions, then the mean over
    space as in Finn et al.'s code; ``"maxpool"`` (Mini-ImageNet): stride 1 and a
    2x2 max-pool per block, then flatten. The convolutions have no bias (the
    BatchNorm that follows removes it). ``norm``: where the BatchNorm statistics of
    query passes come from (pipeline/nets/norm.py). Parameters: ``conv{i}.weight``,
    ``bn{i}.weight`` (gamma, ones; only with ``norm_scale``), ``bn{i}.bias`` (beta, zeros),
    ``head.weight``, ``head.bias``. ``norm_scale=False`` is cbfinn/maml's BatchNorm
    (``utils.py`` ``normalize``: ``tf.contrib.layers.batch_norm``, whose default is
    ``scale=False``): an offset, no scale.
    """

    in_channels: int
    image_size: int
    ways: int
    filters: int = 64
    downsample: Literal["stride", "maxpool"] = "stride"
    eps: float = 1e-5
    norm: NormMode = "transductive"
    norm_scale: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORM_MODES:
            raise ValueError(f"Conv4.norm must be one of {NORM_MODES}, got {self.norm!r}")
        if self.downsample not in ("stride", "maxpool"):
            raise ValueError(f"Conv4.downsample must be 'stride' or 'maxpool', got {self.downsample!r}")
        if self.features() < 1:
            raise ValueError(f"Conv4: image_size {self.image_size} is too small for 4 max-pool blocks")

    def features(self) -> int:
        """Width of the head's input."""
        if self.downsample == "stride":
            return self.filters
        size = self.image_size
        for _ in range(4):
            size //= 2
        return self.filters * size * size

    def init(self, seed: int | torch.Generator, dtype: torch.dtype = torch.float32) -> Params:
        """Fresh parameters, identical for the same seed."""
        gen = init.generator(seed)
        params: Params = {}
        channels = self.in_channels
        for i in range(4):
            params[f"conv{i}.weight"] = init.xavier_uniform(
                (self.filters, channels, 3, 3), channels * 9, self.filters * 9, gen, dtype
            )
            if self.norm_scale:
                params[f"bn{i}.weight"] = torch.ones(self.filters, dtype=dtype)
            params[f"bn{i}.bias"] = torch.zeros(self.filters, dtype=dtype)
            channels = self.filters
        params["head.weight"] = init.xavier_uniform((self.ways, self.features()), self.features(), self.ways, gen, dtype)
        params["head.bias"] = torch.zeros(self.ways, dtype=dtype)
        return params

    def batch_norm_names(self) -> frozenset[str]:
        """The names of the BatchNorm parameters (``algorithm.adapt_norm: false`` keeps them out of the inner loop)."""
        return frozenset(k for i in range(4) for k in (f"bn{i}.weight", f"bn{i}.bias") if self.norm_scale or k.endswith("bias"))

    def apply(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """One task: ``x[N, C, H, W] -> logits[N, ways]``."""
        return self.apply_tasks(params, x.unsqueeze(0)).squeeze(0)

    def apply_tasks(self, params: Params, x: torch.Tensor, stats: int | None = None) -> torch.Tensor:
        """Stacked tasks: ``x[T, N, C, H, W] -> [T, N, ways]``; params shared or with a leading T.

        ``stats``: BatchNorm statistics over each task's first ``stats`` examples (None: all N).
        """
        return self.apply_moments(params, x, stats=stats)[0]

    def apply_moments(
        self, params: Params, x: torch.Tensor, moments: Sequence[Moments] | None = None, stats: int | None = None
    ) -> tuple[torch.Tensor, list[Moments]]:
        """``apply_tasks`` that also returns the statistics each BatchNorm normalized with (pipeline/nets/layers.py).

        ``moments`` (one per block) normalizes with those statistics instead of the
        batch's own (the returned list is then ``moments``); else ``stats`` as in ``apply_tasks``.
        """
        stride = 2 if self.downsample == "stride" else 1
        used = []
        for i in range(4):
            x = conv_tasks(x, params[f"conv{i}.weight"], stride)
            used.append(moments[i] if moments is not None else batch_moments(x if stats is None else x[:, :stats]))
            gamma = params[f"bn{i}.weight"] if self.norm_scale else None
            x = F.relu(batch_norm_tasks(x, gamma, params[f"bn{i}.bias"], self.eps, used[-1]))
            if self.downsample == "maxpool":
                t, n = x.shape[:2]
                x = F.max_pool2d(x.flatten(0, 1), 2).unflatten(0, (t, n))
        x = x.mean(dim=(3, 4)) if self.downsample == "stride" else x.flatten(2)
        return linear_tasks(x, params["head.weight"], params["head.bias"]), used
