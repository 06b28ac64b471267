"""Quadratic optimizees of Andrychowicz et al. 2016: f(theta) = ||W theta - y||^2, W and y i.i.d. N(0, 1)."""
from __future__ import annotations

import numpy as np
import torch

from tasks.config import QuadraticTask
from tasks.episodes import Episodes


def sample(task: QuadraticTask, rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """``count`` tasks (W [D, D], y [D])."""
    return {
        "W": rng.standard_normal((count, task.dim, task.dim), dtype=np.float32),
        "y": rng.standard_normal((count, task.dim), dtype=np.float32),
    }


def decode(task: QuadraticTask, fields: dict[str, torch.Tensor]) -> Episodes:
    """W as ``support_x`` and y as ``support_y``; the query fields repeat them (a task has no held-out data)."""
    return Episodes(fields["W"], fields["y"], fields["W"], fields["y"])
