"""Sinusoid regression of the MAML paper: y = A sin(x - phase), A ~ U[0.1, 5], phase ~ U[0, pi], x ~ U[-5, 5]."""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from tasks.episodes import Episodes
from tasks.family import ArrayFamily, Strict, TaskSpec


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


def sample(task: SinusoidTask, rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """``count`` tasks, each with K support and Q query points, plus the amplitude and phase that made them."""
    amplitude = rng.uniform(*task.amplitude, size=(count, 1, 1))
    phase = rng.uniform(*task.phase, size=(count, 1, 1))
    x = rng.uniform(*task.x_range, size=(count, task.shots + task.queries, 1))
    y = amplitude * np.sin(x - phase)
    k = task.shots
    return {
        "support_x": x[:, :k].astype(np.float32),
        "support_y": y[:, :k].astype(np.float32),
        "query_x": x[:, k:].astype(np.float32),
        "query_y": y[:, k:].astype(np.float32),
        "amplitude": amplitude.reshape(count).astype(np.float32),
        "phase": phase.reshape(count).astype(np.float32),
    }


def decode(task: SinusoidTask, fields: dict[str, torch.Tensor]) -> Episodes:
    """The stored fields as an episode batch (amplitude and phase are kept for audit only)."""
    return Episodes(fields["support_x"], fields["support_y"], fields["query_x"], fields["query_y"])


def spec(task: SinusoidTask) -> TaskSpec:
    """Regression from one input to one output, mean squared error."""
    return TaskSpec(kind="regression", input_shape=(1,), outputs=1, loss="mse")


FAMILY = ArrayFamily(config=SinusoidTask, spec=spec, sample=sample, decode=decode)
