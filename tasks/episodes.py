"""The episode batch: the one data type that flows from the store to a meta-learner."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Episodes:
    """B episodes as stacked tensors, ready for a batched meta-learner.

    Classification: ``support_x`` is ``[B, N*K, C, H, W]`` float32 in [0, 1] and
    ``support_y`` is ``[B, N*K]`` int64 labels in ``0..N-1``; queries likewise.
    Regression (sinusoid): ``*_x`` is ``[B, K, 1]`` and ``*_y`` is ``[B, K, 1]``.
    Quadratic optimizees f(theta) = ||W theta - y||^2: ``support_x`` is W
    ``[B, D, D]`` and ``support_y`` is y ``[B, D]``; the query fields repeat them.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Episodes:
        """Move every field to ``device``; ``dtype`` casts the floating-point fields only."""

        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return Episodes(*(move(t) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))

    def __getitem__(self, index: int | slice) -> Episodes:
        """One episode (keeping a batch dimension of 1) or a slice of the batch."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Episodes(self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index])
