"""A user's own network, as a researcher would bring it: GroupNorm and a residual connection (never seen by metapipe).

Used by tests/pipeline/nets/test_module.py and tests/integration/test_user_module.py through
``model: {network: module, factory: "tests.pipeline.nets.user_module:ResidualGroupNormNet"}``.
"""
from __future__ import annotations

import torch
from torch import nn


class ResidualGroupNormNet(nn.Module):
    """conv -> GroupNorm -> ReLU, a residual block of two such convs, mean over space, linear head."""

    def __init__(self, in_channels: int, ways: int, width: int = 8, groups: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, stride=2, padding=1), nn.GroupNorm(groups, width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(groups, width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(groups, width),
        )
        self.classifier = nn.Linear(width, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.classifier(h.mean(dim=(2, 3)))
