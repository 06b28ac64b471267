"""Typed, validated configuration of task distributions and episode stores.

A config is frozen after validation and refuses unknown keys; every error names
the key and the bad value.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    """Base of every config section: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SinusoidTask(Strict):
    """Sinusoid regression of the MAML paper: y = A sin(x - phase)."""

    name: Literal["sinusoid"] = "sinusoid"
    shots: int = Field(10, ge=1, description="K support points per task")
    queries: int = Field(10, ge=1, description="query points per task")
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)

    @model_validator(mode="after")
    def _ranges(self) -> SinusoidTask:
        for key in ("amplitude", "phase", "x_range"):
            low, high = getattr(self, key)
            if not low < high:
                raise ValueError(f"task.{key}: low must be below high, got {[low, high]}")
        return self


class QuadraticTask(Strict):
    """Quadratic optimizees of Andrychowicz et al. 2016: f(theta) = ||W theta - y||^2."""

    name: Literal["quadratic"] = "quadratic"
    dim: int = Field(10, ge=1)


class ImageTask(Strict):
    """N-way K-shot classification over an image data set."""

    ways: int = Field(5, ge=2)
    shots: int = Field(1, ge=1)
    queries: int = Field(15, ge=1)
    data_root: str | None = Field(None, description="folder holding the data set; default $METAPIPE_DATA or ../shared/data")


class OmniglotTask(ImageTask):
    """Omniglot: 1200 training characters (the last 100 of them for validation), 423 test."""

    name: Literal["omniglot"] = "omniglot"
    image_size: int = Field(28, ge=8)
    rotations: bool = Field(True, description="0/90/180/270 degree rotations as extra classes (MAML paper)")
    split_seed: int = Field(1, description="seed of the fixed permutation of the 1623 characters")
    train_characters: int = Field(1100, ge=1)
    val_characters: int = Field(100, ge=1)
    characters: int = Field(1623, ge=3, description="character folders the data set must hold (1623 in Omniglot)")
    drawings: int = Field(20, ge=1, description="drawings each character folder must hold (20 in Omniglot)")

    @model_validator(mode="after")
    def _split(self) -> OmniglotTask:
        if self.train_characters + self.val_characters >= self.characters:
            raise ValueError(
                f"task.train_characters + task.val_characters ({self.train_characters} + {self.val_characters})"
                f" must leave test characters out of task.characters ({self.characters})"
            )
        turns = 4 if self.rotations else 1
        splits = {
            "train": self.train_characters,
            "val": self.val_characters,
            "test": self.characters - self.train_characters - self.val_characters,
        }
        for split, characters in splits.items():
            if self.ways > characters * turns:
                raise ValueError(f"task.ways={self.ways}: the {split} split has only {characters * turns} classes")
        if self.shots + self.queries > self.drawings:
            raise ValueError(
                f"task.shots + task.queries = {self.shots} + {self.queries}: a character has only {self.drawings} drawings"
            )
        return self


class MiniImageNetTask(ImageTask):
    """Mini-ImageNet in the layout of Ravi & Larochelle: images/ plus train/val/test.csv."""

    name: Literal["miniimagenet"] = "miniimagenet"
    image_size: int = Field(84, ge=8)


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
    split_seed: int = 1
    data_root: str | None = Field(None, description="mnist: folder holding MNIST/raw (torchvision layout)")


TaskConfig = Annotated[
    Union[SinusoidTask, QuadraticTask, OmniglotTask, MiniImageNetTask, DigitsTask], Field(discriminator="name")
]


class StoreConfig(Strict):
    """Where and how many episodes to precompute."""

    path: str = Field(..., description="local folder or s3://bucket/prefix")
    seed: int = Field(0, ge=0)
    train_episodes: int = Field(100_000, ge=1)
    val_episodes: int = Field(200, ge=0)
    test_episodes: int = Field(600, ge=0)
    shard_episodes: int = Field(10_000, ge=1, description="episodes per Parquet shard")
    eval_pixels: bool = Field(True, description="store val/test episodes with pixels rather than indices")


class EpisodeConfig(Strict):
    """The part of a run config that defines the episode store."""

    task: TaskConfig
    store: StoreConfig
