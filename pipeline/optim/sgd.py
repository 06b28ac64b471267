"""Plain SGD, with one learning rate or one per parameter (Meta-SGD, Li et al. 2017)."""
from __future__ import annotations

from pipeline.optim.base import GradientTransformation, State, Tree, tree_map


def sgd(lr: float | Tree) -> GradientTransformation:
    """``updates = -lr * grads``; stateless.

    ``lr`` is a positive float, or a tree of rates shaped like the params (Meta-SGD's
    learnable rates, differentiable). Raises ValueError for a float ``lr <= 0``.
    """
    if isinstance(lr, (int, float)) and not lr > 0:
        raise ValueError(f"sgd: lr must be positive, got {lr!r}")

    def init(params: Tree) -> State:
        return ()

    def update(grads: Tree, state: State) -> tuple[Tree, State]:
        if isinstance(lr, (int, float)):
            return tree_map(lambda g: -lr * g, grads), state
        return tree_map(lambda g, rate: -rate * g, grads, lr), state

    return GradientTransformation(init, update)
