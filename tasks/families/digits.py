"""Image-classification data for the L2L MLP optimizee: scikit-learn's 8x8 digits, or MNIST.

The digits set (1797 images, bundled with scikit-learn, no download) stands in
for the paper's MNIST. MNIST is read from torchvision's on-disk layout
(``<data_root>/MNIST/raw``) when a user has it; nothing is ever downloaded.
One episode is one optimization problem: ``shots`` training images (the
support set the optimizee's mini-batches come from) and ``queries`` held-out
images (the query set it is measured on). Images are flattened, in [0, 1].
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from tasks.datasets import data_root
from tasks.episodes import Episodes
from tasks.errors import DatasetError
from tasks.family import ArrayFamily, Strict, TaskSpec


class DigitsTask(Strict):
    """Optimizee data for the L2L MLP: scikit-learn's bundled 8x8 digits, or MNIST if a user has it.

    An episode is one training problem: ``shots`` labelled images (the support
    set, drawn from the training split) that the optimizee's mini-batches come
    from, and ``queries`` held-out images to measure it on.
    """

    name: Literal["digits"] = "digits"
    source: Literal["sklearn", "mnist"] = "sklearn"
    shots: int = Field(1000, ge=1, description="training images per episode (the optimizee's data)")
    queries: int = Field(200, ge=1, description="held-out images per episode")
    batch_size: int = Field(128, ge=1, description="the optimizee's mini-batch")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="share of the images held out for queries")
    split_seed: int = Field(1, ge=0, lt=2**63)
    data_root: str | None = Field(None, description="mnist: folder holding MNIST/raw (torchvision layout)")

    @model_validator(mode="after")
    def _fits(self) -> DigitsTask:
        held_out = held_out_count(IMAGES[self.source], self.test_fraction)
        training = IMAGES[self.source] - held_out
        if self.shots > training or self.queries > held_out:
            raise ValueError(
                f"task.shots={self.shots} and task.queries={self.queries} exceed the {training} training and "
                f"{held_out} held-out images of source={self.source!r} (test_fraction={self.test_fraction})"
            )
        return self


_FEATURES = {"sklearn": 64, "mnist": 784}
IMAGES = {"sklearn": 1797, "mnist": 70_000}
"""Images of each source (scikit-learn's digits; MNIST's training and test sets together)."""


def held_out_count(images: int, test_fraction: float) -> int:
    """Images of the fixed held-out split (at least one)."""
    return max(1, round(images * test_fraction))


def feature_count(task: DigitsTask) -> int:
    """Input width of the optimizee: 64 (8x8 digits) or 784 (28x28 MNIST)."""
    return _FEATURES[task.source]


def load_images(task: DigitsTask) -> tuple[torch.Tensor, torch.Tensor]:
    """All images ``[N, features]`` float32 in [0, 1] and labels ``[N]`` int64 (0..9)."""
    if task.source == "sklearn":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
        return x, torch.as_tensor(bunch.target, dtype=torch.int64)
    return _load_mnist(data_root(task.data_root))


def _load_mnist(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST

    raw = root / "MNIST" / "raw"
    if not raw.is_dir():
        raise DatasetError(f"task.data_root: MNIST not found at {raw} (torchvision layout; nothing is downloaded)")
    xs, ys = [], []
    for train in (True, False):
        try:
            data = MNIST(str(root), train=train, download=False)
        except RuntimeError as e:
            raise DatasetError(f"task.data_root: cannot read MNIST under {raw}: {e}") from None
        xs.append(data.data.reshape(len(data.data), -1).float() / 255.0)
        ys.append(data.targets.long())
    return torch.cat(xs), torch.cat(ys)


@lru_cache(maxsize=4)
def split(task: DigitsTask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed split (``split_seed``) into training and held-out images: ``(x_train, y_train, x_test, y_test)``.

    Cached per task config: episodes decode by index into it.
    """
    x, y = load_images(task)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(task.split_seed))
    n_test = held_out_count(len(x), task.test_fraction)
    test, train = order[:n_test], order[n_test:]
    if len(x) != IMAGES[task.source]:
        raise DatasetError(f"task.source={task.source!r}: expected {IMAGES[task.source]} images, found {len(x)}")
    return x[train], y[train], x[test], y[test]


def sample(task: DigitsTask, rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """``count`` episodes as indices: ``support_index [count, shots]`` into the training images,
    ``query_index [count, queries]`` into the held-out ones (each row without repeats)."""
    x_train, _, x_test, _ = split(task)
    support = np.argsort(rng.random((count, len(x_train))), axis=1)[:, : task.shots]
    query = np.argsort(rng.random((count, len(x_test))), axis=1)[:, : task.queries]
    return {"support_index": support.astype(np.int32), "query_index": query.astype(np.int32)}


def decode(task: DigitsTask, fields: dict[str, torch.Tensor]) -> Episodes:
    """Episodes from stored indices: support ``[B, shots, F]`` / ``[B, shots]``, query likewise."""
    x_train, y_train, x_test, y_test = split(task)
    support, query = fields["support_index"].long(), fields["query_index"].long()
    for name, index, limit in (("support_index", support, len(x_train)), ("query_index", query, len(x_test))):
        if index.numel() and not 0 <= int(index.min()) <= int(index.max()) < limit:
            raise ValueError(f"digits field {name}: indices must lie in [0, {limit}), got {int(index.min())}..{int(index.max())}")
    return Episodes(x_train[support], y_train[support], x_test[query], y_test[query])


def spec(task: DigitsTask) -> TaskSpec:
    """An optimizee: a classifier of flat images into 10 digits, trained in mini-batches of ``batch_size``."""
    return TaskSpec(kind="optimizee", input_shape=(feature_count(task),), outputs=10, loss="cross_entropy", batch_size=task.batch_size)


FAMILY = ArrayFamily(config=DigitsTask, spec=spec, sample=sample, decode=decode)
