"""The MAML paper's Conv4 as a plain ``torch.nn.Module``: a template to read and copy for ``model.network: module``.

Same architecture, parameter names and numbers as the hand-batched pipeline/nets/conv4.py
(tests/pipeline/nets/test_module.py checks losses, adapted weights and meta-gradients
against it), written with torch.nn layers only. Use it as

    model: {network: module, factory: "pipeline.nets.conv4_module:Conv4Module", kwargs: {in_channels: 1, ways: 5}}
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class Conv4Module(nn.Module):
    """4 x (3x3 conv without bias, BatchNorm with batch statistics, ReLU), then a linear head to ``ways``.

    ``downsample="stride"`` (Omniglot): stride-2 convolutions, then the mean over space;
    ``"maxpool"`` (Mini-ImageNet): stride 1 and a 2x2 max-pool per block, then flatten
    (``image_size`` sizes the head). Parameters ``conv{i}.weight``, ``bn{i}.weight``,
    ``bn{i}.bias``, ``head.weight``, ``head.bias``.
    """

    def __init__(
        self, in_channels: int, ways: int, filters: int = 64, downsample: Literal["stride", "maxpool"] = "stride",
        image_size: int = 28,
    ) -> None:
        super().__init__()
        self.downsample = downsample
        stride = 2 if downsample == "stride" else 1
        channels, size = in_channels, image_size
        for i in range(4):
            self.add_module(f"conv{i}", nn.Conv2d(channels, filters, 3, stride=stride, padding=1, bias=False))
            # no running statistics: every batch is normalized with its own (MAML's transductive BatchNorm)
            self.add_module(f"bn{i}", nn.BatchNorm2d(filters, track_running_stats=False))
            channels, size = filters, size // 2
        self.head = nn.Linear(filters if downsample == "stride" else filters * size * size, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[N, C, H, W] -> logits[N, ways]``."""
        for i in range(4):
            x = torch.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
            if self.downsample == "maxpool":
                x = nn.functional.max_pool2d(x, 2)
        x = x.mean(dim=(2, 3)) if self.downsample == "stride" else x.flatten(1)
        return self.head(x)
