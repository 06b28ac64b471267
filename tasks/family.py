"""What a task family is: its config section, the properties it declares once, and how its episodes are made.

A family is one module under tasks/families/ with a ``FAMILY`` entry in the registry
(tasks/families/__init__.py). It declares its ``TaskSpec`` (regression, classification or
optimizee; input shape; outputs; loss) so that no code outside tasks/ ever tests a task's
name: networks, algorithms and the config's cross-section rules read the spec instead.
Two shapes of family exist:

- ``ArrayFamily``: episodes sampled as numpy arrays and stored as they are (sinusoid,
  quadratic, digits): ``sample(task, rng, count) -> fields`` and ``decode(task, fields)``.
- ``ImageFamily``: an image data set decoded once into an ``ImageTable``, episodes stored
  as indices into it (Omniglot, Mini-ImageNet): ``load(task, out)``, ``split_classes(task, table)``
  and ``to_array(image, task)``, the one transform from a PIL image to a table row.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.episodes import Episodes

if TYPE_CHECKING:
    from pathlib import Path

    from PIL import Image

    from tasks.images import ImageTable


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class RandomCrop(Strict):
    """RandomResizedCrop back to the table's image size: ranges of the area fraction and the aspect ratio."""

    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @model_validator(mode="after")
    def _ranges(self) -> RandomCrop:
        if not (0 < self.scale[0] <= self.scale[1] <= 1 and 0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"crop: need 0 < scale low <= high <= 1 and 0 < ratio low <= high, got {self.scale}, {self.ratio}")
        return self


class ColorJitter(Strict):
    """torchvision's ColorJitter: brightness, contrast and saturation factors drawn from [1 - x, 1 + x]
    (saturation only changes RGB images)."""

    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.4, ge=0)


class Augment(Strict):
    """Augmentation of training episodes at read time (never validation or test), seeded by episode."""

    crop: RandomCrop | None = None
    flip: bool = Field(False, description="horizontal flip with probability 1/2")
    color_jitter: ColorJitter | None = None


class ImageTask(Strict):
    """Fields every N-way K-shot image family shares."""

    ways: int = Field(5, ge=2)
    shots: int = Field(1, ge=1)
    queries: int = Field(15, ge=1)
    data_root: str | None = Field(None, description="folder holding the data set; default $METAPIPE_DATA or ../shared/data")
    augment: Augment | None = Field(None, description="training-time augmentation; not part of the episode store")


Kind = Literal["regression", "classification", "optimizee"]
Loss = Literal["mse", "cross_entropy", "quadratic"]


@dataclass(frozen=True)
class TaskSpec:
    """The properties of a task config that the rest of metapipe may depend on.

    ``input_shape`` is one example's shape (``(1,)`` for sinusoid x, ``(C, H, W)`` for
    images, ``(D, D)`` for a quadratic's W); ``outputs`` the width of a prediction
    (regression targets, classes per episode, or a quadratic's dimension D).
    ``batch_size`` is an optimizee's mini-batch (None when it takes whole sets).
    """

    kind: Kind
    input_shape: tuple[int, ...]
    outputs: int
    loss: Loss
    batch_size: int | None = None
    family: str = ""
    """The family's registry name, as a label for messages and exports (set by the registry)."""

    @property
    def is_image(self) -> bool:
        """Whether one example is an image ``[C, H, W]``."""
        return len(self.input_shape) == 3

    @property
    def is_flat(self) -> bool:
        """Whether one example is a feature vector ``[F]``."""
        return len(self.input_shape) == 1


@dataclass(frozen=True)
class ArrayFamily:
    """A family whose episodes are sampled as arrays and stored as they are."""

    config: type[Strict]
    spec: Callable[[Any], TaskSpec]
    sample: Callable[[Any, np.random.Generator, int], dict[str, np.ndarray]]
    """``sample(task, rng, count)``: the fields of ``count`` episodes, each array with a leading episode axis."""
    decode: Callable[[Any, dict[str, torch.Tensor]], Episodes]
    """``decode(task, fields)``: stored fields (a leading batch axis) as an episode batch."""


@dataclass(frozen=True)
class ImageFamily:
    """A family over an image data set decoded once into an image table."""

    config: type[ImageTask]
    spec: Callable[[Any], TaskSpec]
    load: Callable[[Any, Path | None], ImageTable]
    """``load(task, out)``: the decoded data set; with a path ``out`` (precompute), written to that ``.npy``
    file a chunk at a time and mapped, never whole in memory (``build_table`` does it); raises DatasetError
    naming the file when it cannot be read."""
    split_classes: Callable[[Any, ImageTable], dict[str, np.ndarray]]
    """``split_classes(task, table)``: class ids of the train, val and test splits."""
    to_array: Callable[[Image.Image, Any], np.ndarray]
    """``to_array(image, task)``: one PIL image as a uint8 ``[C, H, W]`` table row."""
    normalization: Callable[[Any], Normalization | None] = lambda task: None
    """``normalization(task)``: per-channel (mean, std) applied to pixels in [0, 1] when decoding, or None."""

    def preprocess(self, images: list[Image.Image], task: Any) -> torch.Tensor:
        """A user's images as model inputs: float32 ``[N, C, H, W]``, the transform of the table scaled to
        [0, 1] (then normalized, when the task normalizes).

        Raises ValueError on an empty list.
        """
        if not images:
            raise ValueError("preprocess needs at least one image")
        return to_inputs(torch.from_numpy(np.stack([self.to_array(im, task) for im in images])), self.normalization(task))


Normalization = tuple[tuple[float, ...], tuple[float, ...]]
"""Per-channel (mean, std) of pixels in [0, 1]."""


def to_inputs(pixels: torch.Tensor, normalization: Normalization | None) -> torch.Tensor:
    """uint8 images ``[..., C, H, W]`` as a learner gets them: float32 ``x / 255`` in [0, 1], then
    ``(x - mean) / std`` per channel when the task normalizes. The one transform from table pixels to
    model inputs: episodes (``TaskDistribution.decode``), the fine-tuning baseline's pretraining images
    and ``ImageFamily.preprocess`` (exports) all go through it.

    The 256 values a pixel can take are computed on the CPU and looked up on the pixels' device
    (``input_table``), so a GPU worker's inputs equal a CPU's bit for bit (CUDA divides by a Python number
    as a multiplication by its reciprocal, which differs from ``x / 255`` in the last bit for some pixels).
    """
    table = input_table(normalization, pixels.device)
    channels = torch.arange(table.shape[0], device=pixels.device).view(-1, 1, 1)  # broadcast over [..., C, H, W]
    return table[channels, pixels.int()]


@functools.lru_cache(maxsize=16)
def input_table(normalization: Normalization | None, device: torch.device) -> torch.Tensor:
    """float32 ``[C, 256]`` (``[1, 256]`` without normalization): each channel's input for each pixel value,
    computed on the CPU and held on ``device``, once per process (a decode on a GPU then copies nothing)."""
    values = torch.arange(256, dtype=torch.float32).div_(255.0).unsqueeze(0)
    if normalization is not None:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(-1, 1) for v in normalization)
        values = values.sub(mean).div_(std)
    return values.to(device)


Family = ArrayFamily | ImageFamily
