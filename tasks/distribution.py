"""A task distribution by config: sample episode fields as numpy arrays and decode them to Episodes.

The store writes the fields of ``sample`` and hands what it reads back to
``decode``; on-the-fly sampling is the two in a row. Field layouts:
``arrays`` (sinusoid, quadratic, digits: what their modules sample), ``indices`` (image
sets: class ids, rotations and image positions into the image table) and
``pixels`` (the indices plus the uint8 images they decode to, for fixed
evaluation sets).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tasks import fewshot
from tasks.episodes import Episodes
from tasks.families import TaskConfig, family
from tasks.family import ArrayFamily, ImageFamily, to_inputs
from tasks.images import ImageTable

SPLITS = ("train", "val", "test")


class TaskDistribution:
    """The episodes of one task config.

    Image sets hold their table as a torch uint8 tensor over the table's array (a read-only
    memory map when it comes from a store, shared by every process of the node); decoding a
    batch gathers its rows, then turns the classes drawn with a rotation.
    """

    def __init__(self, task: TaskConfig, table: ImageTable | None = None) -> None:
        self.task = task
        self.table = table
        self.family = family(task)
        if isinstance(self.family, ImageFamily):
            if table is None:
                raise ValueError(f"task {task.name} needs its image table")
            self.splits = self.family.split_classes(task, table)
            self.turns = 4 if getattr(task, "rotations", False) else 1
            with warnings.catch_warnings():  # a read-only map: nothing here writes to the table
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                self.pixels = torch.from_numpy(table.pixels)
            self.starts = torch.from_numpy(table.starts)
            self._sizes = table.sizes
            self._normalization = self.family.normalization(task)

    def to(self, device: torch.device | str) -> None:
        """Hold the image table on ``device`` (a GPU worker's, ``store.device_table: auto``): decoding then
        gathers there and returns episodes there. Image sets only."""
        if not self.is_image:
            raise ValueError(f"task {self.task.name} has no image table to move")
        self.pixels, self.starts = self.pixels.to(device), self.starts.to(device)

    @classmethod
    def load(cls, task: TaskConfig, out: Path | None = None) -> TaskDistribution:
        """Read the data set the task needs (image sets decode every image once: in memory, or with ``out``
        into that ``.npy`` file a chunk at a time, then mapped; array families ignore ``out``)."""
        task_family = family(task)
        return cls(task, task_family.load(task, out) if isinstance(task_family, ImageFamily) else None)

    @property
    def is_image(self) -> bool:
        """Whether episodes are image classification over a table (Omniglot, Mini-ImageNet)."""
        return self.table is not None

    def layout(self, split: str, eval_pixels: bool) -> str:
        """How ``split`` is stored: training image episodes as indices, evaluation ones as pixels if asked."""
        if not self.is_image:
            return "arrays"
        return "pixels" if eval_pixels and split != "train" else "indices"

    def sample(self, split: str, rng: np.random.Generator, count: int, layout: str = "indices") -> dict[str, np.ndarray]:
        """Fields of ``count`` episodes of ``split`` drawn with ``rng``."""
        task = self.task
        if isinstance(self.family, ArrayFamily):
            return self.family.sample(task, rng, count)
        classes = self.splits[split]
        fields = fewshot.sample(
            rng, classes, self._sizes[classes], count, task.ways, task.shots, task.queries,
            rotations=self.turns == 4,
        )
        if layout == "pixels":
            tensors = {k: torch.from_numpy(v) for k, v in fields.items()}
            support, query = fewshot.gather(tensors, self.pixels, self.starts, task.shots)
            fields |= {"support_x": support.numpy(), "query_x": query.numpy()}
        return fields

    def decode(
        self, fields: dict[str, torch.Tensor], layout: str, augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> Episodes:
        """Stacked episodes from stored fields (a batch dimension first).

        ``augment`` (image sets): maps the uint8 images of each episode ``[B, N*(K+Q), C, H, W]`` to
        augmented ones of the same shape, before scaling and normalization (the reader's training
        augmentation, seeded by episode).
        """
        if isinstance(self.family, ArrayFamily):
            return self.family.decode(self.task, fields)
        if layout == "pixels":
            support, query = fields["support_x"], fields["query_x"]
        else:
            fields = {k: v.to(self.pixels.device) for k, v in fields.items()}
            support, query = fewshot.gather(fields, self.pixels, self.starts, self.task.shots)
        if augment is not None:
            support, query = augment(torch.cat([support, query], dim=1)).split([support.shape[1], query.shape[1]], dim=1)
        return fewshot.to_episodes(self.inputs(support), self.inputs(query), self.task.ways)

    def inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images ``[..., C, H, W]`` of the table as the learner gets them (image sets): float32 in
        [0, 1], normalized when the task normalizes (``tasks.family.to_inputs``; what ``decode`` does)."""
        return to_inputs(pixels, self._normalization)

    def episodes(self, split: str, rng: np.random.Generator, count: int) -> Episodes:
        """``count`` fresh episodes, sampled and decoded in process (no store)."""
        fields = self.sample(split, rng, count)
        return self.decode({k: torch.from_numpy(v) for k, v in fields.items()}, self.layout(split, eval_pixels=False))
