"""Quadratic optimizees of Andrychowicz et al. 2016: f(theta) = ||W theta - y||^2, W and y i.i.d. N(0, 1)."""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from tasks.episodes import Episodes
from tasks.family import ArrayFamily, Strict, TaskSpec


class QuadraticTask(Strict):
    """Quadratic optimizees of Andrychowicz et al. 2016: f(theta) = ||W theta - y||^2."""

    name: Literal["quadratic"] = "quadratic"
    dim: int = Field(10, ge=1)


def sample(task: QuadraticTask, rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """``count`` tasks (W [D, D], y [D])."""
    return {
        "W": rng.standard_normal((count, task.dim, task.dim), dtype=np.float32),
        "y": rng.standard_normal((count, task.dim), dtype=np.float32),
    }


def decode(task: QuadraticTask, fields: dict[str, torch.Tensor]) -> Episodes:
    """W as ``support_x`` and y as ``support_y``; the query fields repeat them (a task has no held-out data)."""
    return Episodes(fields["W"], fields["y"], fields["W"], fields["y"])


def spec(task: QuadraticTask) -> TaskSpec:
    """An optimizee: theta [D] minimizing ||W theta - y||^2 (W [D, D] as the support inputs)."""
    return TaskSpec(kind="optimizee", input_shape=(task.dim, task.dim), outputs=task.dim, loss="quadratic")


FAMILY = ArrayFamily(config=QuadraticTask, spec=spec, sample=sample, decode=decode)
