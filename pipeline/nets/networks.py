"""The networks of the MAML paper as pure functions over a dict of parameters.

Each network is a frozen dataclass with ``init(seed) -> Params`` and
``apply(params, x)`` for one task. ``apply_tasks(params, x)`` runs a stack of
tasks ``x[T, N, ...]`` in one pass: ``params`` either shared by all tasks (no
task dimension, one big matmul/convolution over all T*N inputs) or per task
(a leading task dimension of size T, batched matmuls and grouped convolutions).
BatchNorm is written by hand and always normalizes with each task's own batch
statistics (transductive, as in MAML; no running statistics), so a task's
output never depends on the other tasks it is batched with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.types import Params


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(seed)


def _xavier(shape: tuple[int, ...], fan_in: int, fan_out: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    bound = (6.0 / (fan_in + fan_out)) ** 0.5
    return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x[T, N, in]`` times a shared ``[out, in]`` or per-task ``[T, out, in]`` weight."""
    if weight.dim() == 2:
        return F.linear(x, weight, bias)
    return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))


@dataclass(frozen=True)
class MLP:
    """Fully connected ReLU network; the sinusoid net of the MAML paper is ``sizes=(1, 40, 40, 1)``.

    Parameters ``layer{i}.weight`` ``[out, in]`` (Xavier-uniform) and ``layer{i}.bias`` (zeros).
    """

    sizes: tuple[int, ...] = (1, 40, 40, 1)

    def init(self, seed: int | torch.Generator, dtype: torch.dtype = torch.float32) -> Params:
        """Fresh parameters, identical for the same seed."""
        gen = _generator(seed)
        params: Params = {}
        for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            params[f"layer{i}.weight"] = _xavier((fan_out, fan_in), fan_in, fan_out, gen, dtype)
            params[f"layer{i}.bias"] = torch.zeros(fan_out, dtype=dtype)
        return params

    def apply(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """One task: ``x[N, in] -> [N, out]``."""
        return self.apply_tasks(params, x.unsqueeze(0)).squeeze(0)

    def apply_tasks(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Stacked tasks: ``x[T, N, in] -> [T, N, out]``; params shared or with a leading T."""
        layers = len(self.sizes) - 1
        for i in range(layers):
            x = _linear(x, params[f"layer{i}.weight"], params[f"layer{i}.bias"])
            if i < layers - 1:
                x = F.relu(x)
        return x


@dataclass(frozen=True)
class Conv4:
    """The Conv4 of the MAML paper: 4 x (3x3 conv, BatchNorm, ReLU), then a linear head to ``ways``.

    ``downsample="stride"`` (Omniglot): stride-2 convolutions, then the mean over
    space as in Finn et al.'s code; ``"maxpool"`` (Mini-ImageNet): stride 1 and a
    2x2 max-pool per block, then flatten. The convolutions have no bias (the
    BatchNorm that follows removes it). Parameters: ``conv{i}.weight``,
    ``bn{i}.weight`` (gamma, ones), ``bn{i}.bias`` (beta, zeros), ``head.weight``, ``head.bias``.
    """

    in_channels: int
    image_size: int
    ways: int
    filters: int = 64
    downsample: Literal["stride", "maxpool"] = "stride"
    eps: float = 1e-5

    def __post_init__(self) -> None:
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
        gen = _generator(seed)
        params: Params = {}
        channels = self.in_channels
        for i in range(4):
            params[f"conv{i}.weight"] = _xavier(
                (self.filters, channels, 3, 3), channels * 9, self.filters * 9, gen, dtype
            )
            params[f"bn{i}.weight"] = torch.ones(self.filters, dtype=dtype)
            params[f"bn{i}.bias"] = torch.zeros(self.filters, dtype=dtype)
            channels = self.filters
        params["head.weight"] = _xavier((self.ways, self.features()), self.features(), self.ways, gen, dtype)
        params["head.bias"] = torch.zeros(self.ways, dtype=dtype)
        return params

    def apply(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """One task: ``x[N, C, H, W] -> logits[N, ways]``."""
        return self.apply_tasks(params, x.unsqueeze(0)).squeeze(0)

    def apply_tasks(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        """Stacked tasks: ``x[T, N, C, H, W] -> [T, N, ways]``; params shared or with a leading T."""
        stride = 2 if self.downsample == "stride" else 1
        for i in range(4):
            x = _conv_tasks(x, params[f"conv{i}.weight"], stride)
            x = F.relu(_batch_norm_tasks(x, params[f"bn{i}.weight"], params[f"bn{i}.bias"], self.eps))
            if self.downsample == "maxpool":
                t, n = x.shape[:2]
                x = F.max_pool2d(x.flatten(0, 1), 2).unflatten(0, (t, n))
        x = x.mean(dim=(3, 4)) if self.downsample == "stride" else x.flatten(2)
        return _linear(x, params["head.weight"], params["head.bias"])


def _conv_tasks(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """3x3 'same' convolution of ``x[T, N, C, H, W]``: one conv for a shared weight, grouped per task otherwise."""
    t, n = x.shape[:2]
    if weight.dim() == 4:
        return F.conv2d(x.flatten(0, 1), weight, stride=stride, padding=1).unflatten(0, (t, n))
    # tasks become channel groups: [N, T*C, H, W] with weight [T*F, C, 3, 3]
    out = F.conv2d(x.transpose(0, 1).flatten(1, 2), weight.flatten(0, 1), stride=stride, padding=1, groups=t)
    return out.unflatten(1, (t, weight.shape[1])).transpose(0, 1)


def _batch_norm_tasks(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalize ``x[T, N, F, H, W]`` with each task's mean and biased variance over (N, H, W).

    Written out rather than F.batch_norm: native batch_norm under torch.func.vmap
    gave second-order meta-gradients about 1% off (issue 4).
    """
    var, mean = torch.var_mean(x, dim=(1, 3, 4), correction=0, keepdim=True)
    shape = (-1, 1, x.shape[2], 1, 1)
    scale = torch.rsqrt(var + eps) * gamma.reshape(shape)
    # (x - mean) * scale + beta with one full-size pass; scale and shift are [T, 1, F, 1, 1]
    return torch.addcmul(beta.reshape(shape) - mean * scale, x, scale)
