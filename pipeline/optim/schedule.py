"""Learning-rate schedules: functions of the 0-based step count, passed as an optimizer's ``lr``."""
from __future__ import annotations

import math
from typing import Callable

Schedule = Callable[[int], float]
"""The learning rate at a 0-based step."""


def cosine(lr: float, total_steps: int) -> Schedule:
    """``lr`` decayed to 0 over ``total_steps`` on a half cosine, 0 afterwards.

    Raises ValueError for ``lr <= 0`` or ``total_steps < 1``.
    """
    if not lr > 0 or total_steps < 1:
        raise ValueError(f"cosine: need lr > 0 and total_steps >= 1, got {lr!r} and {total_steps!r}")

    def rate(step: int) -> float:
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return rate


def linear(lr: float, final: float, total_steps: int) -> Schedule:
    """``lr`` at step 0 moving linearly to ``final`` at ``total_steps``, ``final`` afterwards.

    openai/supervised-reptile ``train.py``: ``frac_done = i / meta_iters``; ``frac_done * meta_step_size_final
    + (1 - frac_done) * meta_step_size``. Raises ValueError for ``lr <= 0``, ``final < 0`` or ``total_steps < 1``.
    """
    if not lr > 0 or not final >= 0 or total_steps < 1:
        raise ValueError(f"linear: need lr > 0, final >= 0 and total_steps >= 1, got {lr!r}, {final!r} and {total_steps!r}")

    def rate(step: int) -> float:
        done = min(step, total_steps) / total_steps
        return done * final + (1 - done) * lr

    return rate
