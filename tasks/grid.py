"""A PNG contact sheet of image episodes: one row per episode, support images, a gap, then queries."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tasks.episodes import Episodes


def _uint8(images: torch.Tensor) -> np.ndarray:
    """float [..., C, H, W] in [0, 1] -> uint8 [..., H, W, C]."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).movedim(-3, -1).numpy()


def episode_grid(episodes: Episodes, max_queries: int = 10, gap: int = 2) -> Image.Image:
    """One row per episode: its support images in label order, a blank cell, then up to ``max_queries``
    queries taken one class after the other (label 0, 1, ..., N-1, 0, ...)."""
    ways = int(episodes.support_y.max()) + 1
    per_class = episodes.query_x.shape[1] // ways
    round_robin = torch.arange(ways * per_class).reshape(ways, per_class).T.reshape(-1)[:max_queries]
    support, query = _uint8(episodes.support_x), _uint8(episodes.query_x[:, round_robin])
    b, s, h, w, c = support.shape
    cells = s + 1 + query.shape[1]
    sheet = np.full((b * (h + gap), cells * (w + gap), c), 128, dtype=np.uint8)
    for i in range(b):
        for j, image in enumerate([*support[i], None, *query[i]]):
            if image is not None:
                sheet[i * (h + gap) : i * (h + gap) + h, j * (w + gap) : j * (w + gap) + w] = image
    return Image.fromarray(sheet[..., 0] if c == 1 else sheet)
