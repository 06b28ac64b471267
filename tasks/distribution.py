"""A task distribution by config: sample episode fields as numpy arrays and decode them to Episodes.

The store writes the fields of ``sample`` and hands what it reads back to
``decode``; on-the-fly sampling is the two in a row. Field layouts:
``arrays`` (sinusoid, quadratic, digits: what their modules sample), ``indices`` (image
sets: class ids, rotations and image positions into the image table) and
``pixels`` (the indices plus the uint8 images they decode to, for fixed
evaluation sets).
"""
from __future__ import annotations

import numpy as np
import torch

from tasks import fewshot
from tasks.episodes import Episodes
from tasks.families import TaskConfig, family
from tasks.family import ArrayFamily, ImageFamily
from tasks.images import ImageTable

SPLITS = ("train", "val", "test")


class TaskDistribution:
    """The episodes of one task config.

    Image sets hold their table in memory as a torch uint8 tensor, with rotations
    as four turned copies (Omniglot: 4 x 25 MB) so that decoding a batch is one gather.
    """

    def __init__(self, task: TaskConfig, table: ImageTable | None = None) -> None:
        self.task = task
        self.table = table
        self.family = family(task)
        if isinstance(self.family, ImageFamily):
            if table is None:
                raise ValueError(f"task {task.name} needs its image table")
            self.splits = self.family.split_classes(task, table)
            pixels = torch.from_numpy(table.pixels)
            self.pixels = fewshot.turned(pixels) if getattr(task, "rotations", False) else pixels.unsqueeze(0)
            self.starts = torch.from_numpy(table.starts)
            self._sizes = table.sizes

    @classmethod
    def load(cls, task: TaskConfig) -> TaskDistribution:
        """Read the data set the task needs (image sets decode every image once)."""
        task_family = family(task)
        return cls(task, task_family.load(task) if isinstance(task_family, ImageFamily) else None)

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
            rotations=getattr(task, "rotations", False),
        )
        if layout == "pixels":
            tensors = {k: torch.from_numpy(v) for k, v in fields.items()}
            support, query = fewshot.gather(tensors, self.pixels, self.starts, task.shots)
            fields |= {"support_x": support.numpy(), "query_x": query.numpy()}
        return fields

    def decode(self, fields: dict[str, torch.Tensor], layout: str) -> Episodes:
        """Stacked episodes from stored fields (a batch dimension first)."""
        if isinstance(self.family, ArrayFamily):
            return self.family.decode(self.task, fields)
        if layout == "pixels":
            support, query = fields["support_x"], fields["query_x"]
        else:
            support, query = fewshot.gather(fields, self.pixels, self.starts, self.task.shots)
        return fewshot.to_episodes(support, query, self.task.ways)

    def episodes(self, split: str, rng: np.random.Generator, count: int) -> Episodes:
        """``count`` fresh episodes, sampled and decoded in process (no store)."""
        fields = self.sample(split, rng, count)
        return self.decode({k: torch.from_numpy(v) for k, v in fields.items()}, self.layout(split, eval_pixels=False))
