"""Augmentation of training episodes at read time (``task.augment``), seeded by episode.

Random resized crop, horizontal flip and color jitter from torchvision.transforms.v2, applied to each
uint8 image of an episode (support and queries alike) with torch's generator seeded from the episode's
place in the store: ``SeedSequence([store seed, epoch, shard, episode in shard])``. The same store and
position give the same pixels, so a resumed reader sees what the first one saw, and a second pass over
the split (the next epoch) sees new crops. The reader applies it to the train split only.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

from tasks.family import Augment


def transform(augment: Augment, size: int) -> v2.Compose:
    """The torchvision pipeline of ``augment`` for ``size`` x ``size`` uint8 images ``[C, H, W]``."""
    steps: list[v2.Transform] = []
    if augment.crop is not None:
        steps.append(v2.RandomResizedCrop(size, scale=augment.crop.scale, ratio=augment.crop.ratio, antialias=True))
    if augment.flip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.color_jitter is not None:
        jitter = augment.color_jitter
        steps.append(v2.ColorJitter(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue))
    return v2.Compose(steps)


def episode_seeds(seed: int, epoch: np.ndarray, shard: np.ndarray, row: np.ndarray) -> list[int]:
    """One 63-bit seed per episode from the store seed and the episode's epoch, shard and row in the shard."""
    return [
        int(np.random.SeedSequence([seed, int(e), int(s), int(r)]).generate_state(2, np.uint64)[0] >> np.uint64(1))
        for e, s, r in zip(epoch, shard, row)
    ]


def apply(pipeline: v2.Compose, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """uint8 ``[B, M, C, H, W]`` -> augmented uint8 of the same shape; episode ``b`` draws from ``seeds[b]``.

    Each image gets its own draw; torch's global generator is restored afterwards.
    """
    out = torch.empty_like(images)
    with torch.random.fork_rng(devices=[]):
        for b, seed in enumerate(seeds):
            torch.manual_seed(seed)
            for m in range(images.shape[1]):
                out[b, m] = pipeline(images[b, m])
    return out
