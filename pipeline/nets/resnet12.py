"""ResNet-12 as a plain ``torch.nn.Module`` (run through pipeline/nets/module.py's functional_call path).

The form of MetaOptNet (Lee et al. 2019, github.com/kjunelee/MetaOptNet, models/ResNet12_embedding.py)
and learn2learn (learn2learn/vision/models/resnet12.py): four residual blocks of widths
64-160-320-640, each three 3x3 convolutions (no bias) with BatchNorm and leaky ReLU (slope 0.1),
a 1x1 convolution + BatchNorm on the shortcut, and a 2x2 max-pool; optional DropBlock (Ghiasi
et al. 2018) in the last two blocks, as MetaOptNet; then the mean over space (learn2learn's
average pool) and a linear head to ``ways``. BatchNorm keeps no running statistics (batch
statistics, MAML's), and ``model.norm`` applies as for any module.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DropBlock(nn.Module):
    """Drops ``block_size`` x ``block_size`` squares of each feature map with probability ``drop_prob`` per unit (training only).

    Ghiasi, Lin and Le 2018: centres drawn with rate ``gamma`` inside the valid region, grown to
    squares by a max-pool, kept units rescaled by ``numel / kept``.
    """

    def __init__(self, drop_prob: float, block_size: int) -> None:
        super().__init__()
        self.drop_prob, self.block_size = drop_prob, block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x[N, C, H, W]`` with blocks dropped (unchanged in eval mode or with ``drop_prob`` 0)."""
        if not self.training or self.drop_prob == 0:
            return x
        size, block = x.shape[-1], min(self.block_size, x.shape[-1])
        gamma = self.drop_prob / block**2 * size**2 / (size - block + 1) ** 2
        valid = x.shape[-2] - block + 1, size - block + 1
        centres = torch.bernoulli(torch.full((*x.shape[:2], *valid), gamma, dtype=x.dtype, device=x.device))
        pad = block - 1
        dropped = F.max_pool2d(F.pad(centres, (pad, pad, pad, pad)), block, stride=1)[..., : x.shape[-2], :size]
        keep = 1 - dropped
        return x * keep * keep.numel() / keep.sum().clamp(min=1)


class Block(nn.Module):
    """Three 3x3 conv + BatchNorm (+ leaky ReLU) with a 1x1 conv + BatchNorm shortcut, leaky ReLU, 2x2 max-pool, DropBlock."""

    def __init__(self, in_channels: int, width: int, drop_prob: float, block_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, track_running_stats=False)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width, track_running_stats=False)
        self.conv3 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width, track_running_stats=False)
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False), nn.BatchNorm2d(width, track_running_stats=False)
        )
        self.dropblock = DropBlock(drop_prob, block_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.bn1(self.conv1(x)), 0.1)
        out = F.leaky_relu(self.bn2(self.conv2(out)), 0.1)
        out = self.bn3(self.conv3(out))
        out = F.leaky_relu(out + self.shortcut(x), 0.1)
        return self.dropblock(F.max_pool2d(out, 2))


class ResNet12(nn.Module):
    """ResNet-12 with a linear head: ``x[N, C, H, W] -> logits[N, ways]`` (H, W at least 16).

    ``widths``: the four blocks' (64, 160, 320, 640 in the papers); ``drop_prob``: DropBlock's
    rate in blocks 3 and 4 (MetaOptNet: 0.1, block size 5; 0 = off).
    """

    def __init__(
        self, in_channels: int, ways: int, widths: tuple[int, int, int, int] = (64, 160, 320, 640),
        drop_prob: float = 0.0, block_size: int = 5,
    ) -> None:
        super().__init__()
        channels, blocks = in_channels, []
        for i, width in enumerate(widths):
            blocks.append(Block(channels, width, drop_prob if i >= 2 else 0.0, block_size))
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, ways]``: the blocks, the mean over space, the head."""
        return self.head(self.blocks(x).mean(dim=(2, 3)))
