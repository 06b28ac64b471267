"""Augmentation of training episodes at read time (``task.augment``), seeded by episode.

Random resized crop, horizontal flip and color jitter (brightness, contrast, saturation), drawn for each
image of an episode (support and queries alike) from a torch generator seeded by the episode's place in
the store: ``SeedSequence([store seed, epoch, shard, episode in shard])``. The same store and position
give the same pixels, so a resumed reader sees what the first one saw, and the next pass over the split
(the next epoch) sees new draws. The reader applies it to the train split only.

The operations follow torchvision.transforms.v2 (RandomResizedCrop's scale and log-uniform aspect
ratio, RandomHorizontalFlip, ColorJitter's factors and its clamping after each step) but run batched
over every image of a batch at once, with each image's own parameters: torchvision draws one set of
parameters per call, and a call per image cost about 2-5 ms, more than the meta-gradient of the episode.
The crop resamples with torchvision.ops.roi_align (bilinear, averaging over each output pixel); it draws
once and clamps the box to the image where torchvision retries up to 10 times.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.ops import roi_align

from tasks.family import Augment

GRAY = (0.2989, 0.587, 0.114)
"""torchvision's rgb_to_grayscale weights."""


def episode_seeds(seed: int, epoch: np.ndarray, shard: np.ndarray, row: np.ndarray) -> list[int]:
    """One 63-bit seed per episode from the store seed and the episode's epoch, shard and row in the shard."""
    return [
        int(np.random.SeedSequence([seed, int(e), int(s), int(r)]).generate_state(2, np.uint64)[0] >> np.uint64(1))
        for e, s, r in zip(epoch, shard, row)
    ]


def _draws(seeds: list[int], images: int, count: int) -> torch.Tensor:
    """float64 [len(seeds) * images, count] uniforms in [0, 1); the rows of episode b come from ``seeds[b]``."""
    return torch.cat([torch.rand(images, count, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in seeds])


def _gray(x: torch.Tensor) -> torch.Tensor:
    """float [N, C, H, W] -> [N, 1, H, W]: the luminance (C = 3) or the image itself (C = 1)."""
    if x.shape[1] == 1:
        return x
    return (x * torch.tensor(GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


def apply(augment: Augment, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """uint8 ``[B, M, C, H, W]`` -> augmented uint8 of the same shape; episode ``b`` draws from ``seeds[b]``.

    Each image gets its own crop, flip and jitter factors (columns of one uniform draw per image, so
    adding an operation to the config does not change the draws of the others).
    """
    b, m, c, h, w = images.shape
    u = _draws(seeds, m, 9).to(images.device)
    x = images.reshape(b * m, c, h, w).float()
    if augment.crop is not None:
        (s0, s1), (r0, r1) = augment.crop.scale, augment.crop.ratio
        area = h * w * (s0 + (s1 - s0) * u[:, 0])
        ratio = torch.exp(math.log(r0) + (math.log(r1) - math.log(r0)) * u[:, 1])
        cw = torch.sqrt(area * ratio).clamp(1, w)
        ch = torch.sqrt(area / ratio).clamp(1, h)
        x0, y0 = (w - cw) * u[:, 2], (h - ch) * u[:, 3]
        boxes = torch.stack([torch.arange(b * m, dtype=torch.float64, device=x.device), x0, y0, x0 + cw, y0 + ch], 1)
        x = roi_align(x, boxes.float(), (h, w), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if augment.flip:
        x = torch.where((u[:, 4] < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
    if augment.color_jitter is not None:
        jitter = augment.color_jitter

        def factor(column: int, spread: float) -> torch.Tensor:
            return (1 - spread + 2 * spread * u[:, column]).clamp(min=0).float().view(-1, 1, 1, 1)

        x = (x * factor(5, jitter.brightness)).clamp(0, 255)
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * factor(6, jitter.contrast) + mean).clamp(0, 255)
        if c == 3:
            gray = _gray(x)
            x = ((x - gray) * factor(7, jitter.saturation) + gray).clamp(0, 255)
    return x.round_().clamp_(0, 255).to(torch.uint8).reshape(b, m, c, h, w)
