"""Any ``init``/``update`` pair as a ``torch.optim.Optimizer``, for ordinary training loops (TorchOpt's ``optim/``).

``TorchOptimizer(model.parameters(), adam(1e-3))``, then zero_grad / backward /
step. Each parameter is its own tree (one tensor): its state is
``transformation.init(param)``, kept in ``self.state[param]`` as ``state0``,
``state1``, ... so ``state_dict()`` and ``load_state_dict()`` work as for any
optimizer. A learned optimizer comes in the same way, through its ``opt_fn``.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from pipeline.optim.base import GradientTransformation, State


class TorchOptimizer(torch.optim.Optimizer):
    """Steps every parameter that has a gradient by ``transformation``'s update, in place.

    The transformation's state for one tensor must be a flat tuple (or
    NamedTuple) of tensors and numbers; ``step`` raises TypeError otherwise, and
    RuntimeError for a sparse gradient.
    """

    def __init__(
        self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], transformation: GradientTransformation
    ) -> None:
        self.transformation = transformation
        self._kinds: dict[torch.Tensor, type] = {}
        super().__init__(params, {})

    def _state(self, param: torch.Tensor) -> State:
        stored = self.state[param]
        if not stored or param not in self._kinds:
            fresh = self.transformation.init(param)
            if not isinstance(fresh, tuple) or any(isinstance(v, (tuple, list, dict)) for v in fresh):
                raise TypeError(f"TorchOptimizer needs a flat tuple state per tensor, got {type(fresh).__name__}: {fresh!r:.200}")
            self._kinds[param] = type(fresh)
            if not stored:
                return fresh
        leaves = [stored[f"state{i}"] for i in range(len(stored))]
        kind = self._kinds[param]
        return kind._make(leaves) if hasattr(kind, "_make") else kind(leaves)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("TorchOptimizer does not support sparse gradients")
                updates, state = self.transformation.update(param.grad, self._state(param))
                param.add_(updates)
                self.state[param].update({f"state{i}": v for i, v in enumerate(state)})
        return loss
