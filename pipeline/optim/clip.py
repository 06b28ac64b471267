"""Clipping by global L2 norm."""
from __future__ import annotations

import torch

from pipeline.optim.base import Tree, tree_map


def clip_by_global_norm(grads: Tree, max_norm: float | None) -> tuple[Tree, float]:
    """``grads`` scaled to at most ``max_norm`` in L2 norm over all their entries, and that norm before clipping.

    ``max_norm=None`` only measures. The scale is ``max_norm / (norm + 1e-6)``.
    """
    leaves = [grads] if isinstance(grads, torch.Tensor) else list(grads.values())
    norm = float(torch.cat([g.reshape(-1) for g in leaves]).norm())
    if max_norm is not None and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        grads = tree_map(lambda g: g * scale, grads)
    return grads, norm
