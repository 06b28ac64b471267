"""The optimizer type: a pair of pure functions ``init(params) -> state`` and ``update(grads, state)``.

As in TorchOpt (``torchopt/base.py``): ``update`` returns the additive updates
and the new state, and ``apply_updates(params, updates)`` makes the new
parameters. Nothing is updated in place, so an unrolled loop stays
differentiable (MAML backpropagates through it). ``params`` is a tree: one
tensor (the parameter server's flat buffer) or a dict of named tensors
(torch.func style); every state field that holds tensors has the same tree
shape, and every tensor may carry a leading task dimension.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch

from pipeline.types import Params

Tree = Union[torch.Tensor, Params]
"""One tensor, or named tensors: what an optimizer's ``init`` and ``update`` take."""

State = tuple
"""An optimizer's state: an immutable tuple (often a NamedTuple) of trees and counters."""


class GradientTransformation(NamedTuple):
    """An ``init``/``update`` pair; ``update(grads, state) -> (updates, state)`` with ``grads`` shaped like params."""

    init: Callable[[Tree], State]
    update: Callable[[Tree, State], tuple[Tree, State]]


def tree_map(fn: Callable[..., torch.Tensor], tree: Tree, *rest: Tree) -> Tree:
    """``fn`` applied leaf by leaf: ``fn(tree, *rest)`` for tensors, key by key (the keys of ``tree``) for dicts.

    Raises KeyError when a dict in ``rest`` lacks one of ``tree``'s keys.
    """
    if isinstance(tree, torch.Tensor):
        return fn(tree, *rest)
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def apply_updates(params: Tree, updates: Tree) -> Tree:
    """``params + updates``; for dicts key by key, keys of ``params`` absent from ``updates`` staying as they are."""
    if isinstance(params, torch.Tensor):
        return params + updates
    return {k: v + updates[k] if k in updates else v for k, v in params.items()}
