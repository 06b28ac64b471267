"""N-way K-shot episodes over an image table, as indices, and their decoding to pixels.

An episode picks N distinct classes (with rotations, a class is a (character,
rotation) pair, as in the MAML paper) and K+Q distinct images of each: the first
K support, the other Q queries, so no query image is in the support set. Classes
come in random order and the order is the label assignment, so labels are
shuffled per episode.
"""
from __future__ import annotations

import numpy as np
import torch

from tasks.episodes import Episodes


def distinct(rng: np.random.Generator, population: np.ndarray, size: int) -> np.ndarray:
    """One uniform random ordered sample of ``size`` distinct values in ``0..population[i]-1`` per row.

    Floyd's algorithm vectorized over rows (exact, no rejection loop), then a
    random order per row. Returns int64 [len(population), size].
    """
    population = np.asarray(population, dtype=np.int64)
    if np.any(population < size):
        raise ValueError(f"cannot draw {size} distinct items from a population of {int(population.min())}")
    rows = len(population)
    chosen = np.empty((rows, size), dtype=np.int64)
    for i in range(size):
        top = population - size + i
        pick = np.floor(rng.random(rows) * (top + 1)).astype(np.int64)
        taken = (chosen[:, :i] == pick[:, None]).any(axis=1)
        chosen[:, i] = np.where(taken, top, pick)
    order = np.argsort(rng.random((rows, size)), axis=1)
    return np.take_along_axis(chosen, order, axis=1)


def sample(
    rng: np.random.Generator,
    class_ids: np.ndarray,
    class_sizes: np.ndarray,
    count: int,
    ways: int,
    shots: int,
    queries: int,
    rotations: bool,
) -> dict[str, np.ndarray]:
    """``count`` episodes over the classes ``class_ids`` (table class ids, sizes ``class_sizes``).

    Fields: ``classes`` [count, N] table class ids, ``rotation`` [count, N] quarter
    turns, ``images`` [count, N, K+Q] image positions within each class.
    """
    turns = 4 if rotations else 1
    if ways > len(class_ids) * turns:
        raise ValueError(f"{ways}-way episodes need {ways} classes, the split has {len(class_ids) * turns}")
    small = class_sizes < shots + queries
    if np.any(small):
        raise ValueError(
            f"class {int(class_ids[np.argmax(small)])} has {int(class_sizes[small][0])} images,"
            f" fewer than shots + queries = {shots + queries}"
        )
    virtual = distinct(rng, np.full(count, len(class_ids) * turns), ways)
    position = virtual // turns
    classes = class_ids[position]
    images = distinct(rng, class_sizes[position].reshape(-1), shots + queries).reshape(count, ways, shots + queries)
    return {
        "classes": classes.astype(np.uint16 if class_ids.max() < 2**16 else np.int32),
        "rotation": (virtual % turns).astype(np.uint8),
        "images": images.astype(np.uint8 if class_sizes.max() <= 256 else np.int32),
    }


def turned(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [4, n, C, H, W]: the table turned by 0, 1, 2 and 3 quarter turns (a pool of every rotation)."""
    return torch.stack([torch.rot90(pixels, k, dims=(-2, -1)) for k in range(4)])


def gather(
    fields: dict[str, torch.Tensor], pixels: torch.Tensor, starts: torch.Tensor, shots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 support [B, N*K, C, H, W] and query [B, N*Q, C, H, W]: the images the index fields name,
    each class turned by its rotation.

    ``pixels`` is the table [n, C, H, W] (a read-only map is fine: only the gathered rows are copied);
    a class with ``rotation`` k is turned by k quarter turns after the gather.
    """
    rows = starts[fields["classes"].long()].unsqueeze(-1) + fields["images"].long()
    b, ways, per = rows.shape
    images = pixels.reshape(len(pixels), -1).index_select(0, rows.reshape(-1)).reshape(b, ways, per, *pixels.shape[1:])
    rotation = fields["rotation"]
    for k in (1, 2, 3):
        turn = rotation == k
        if turn.any():
            images[turn] = torch.rot90(images[turn], k, dims=(-2, -1))
    return images[:, :, :shots].reshape(b, -1, *pixels.shape[1:]), images[:, :, shots:].reshape(b, -1, *pixels.shape[1:])


def labels(batch: int, ways: int, per_class: int) -> torch.Tensor:
    """int64 [batch, ways*per_class]: 0..N-1, each ``per_class`` times, in the order of the images."""
    return torch.arange(ways).repeat_interleave(per_class).expand(batch, -1).contiguous()


def to_episodes(support: torch.Tensor, query: torch.Tensor, ways: int) -> Episodes:
    """Support/query inputs ``[B, N*K, C, H, W]`` / ``[B, N*Q, C, H, W]`` (float, as the learner gets them:
    ``tasks.family.to_inputs``) as episodes with their labels."""
    b = support.shape[0]
    return Episodes(
        support,
        labels(b, ways, support.shape[1] // ways).to(support.device),
        query,
        labels(b, ways, query.shape[1] // ways).to(query.device),
    )
