"""One flat float32 buffer per parameter exchange: params dict <-> contiguous vector."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.types import Params


@dataclass(frozen=True)
class Layout:
    """Names, shapes and offsets of the tensors packed into a flat buffer (sorted by name)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @staticmethod
    def of(params: Params) -> Layout:
        names = tuple(sorted(params))
        return Layout(names, tuple(tuple(params[n].shape) for n in names))

    @property
    def sizes(self) -> list[int]:
        return [int(np.prod(s)) for s in self.shapes]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def flatten(self, params: Params) -> torch.Tensor:
        """Concatenate ``params`` (float32, detached, on CPU) in layout order."""
        missing = set(self.names) ^ set(params)
        if missing:
            raise KeyError(f"parameter names differ from the layout: {sorted(missing)}")
        return torch.cat([params[n].detach().reshape(-1).to("cpu", torch.float32) for n in self.names])

    def unflatten(self, flat: torch.Tensor | np.ndarray) -> Params:
        """Views of ``flat`` with the layout's names and shapes (no copy)."""
        flat = torch.as_tensor(flat)
        if flat.numel() != self.numel:
            raise ValueError(f"flat buffer has {flat.numel()} values, layout needs {self.numel}")
        parts = torch.split(flat, self.sizes)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}
