"""A trained L2L LSTM optimizer as a ``torch.optim.Optimizer`` for ordinary training loops.

The class only wraps the pure ``lstm_update`` of pipeline/algorithms/l2l.py:
each parameter's per-coordinate LSTM state lives in ``self.state[param]``
(so ``state_dict()`` / ``load_state_dict()`` work as for any optimizer).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from pipeline.algorithms.l2l import init_state, lstm_layers, lstm_update


class LearnedOptimizer(torch.optim.Optimizer):
    """``LearnedOptimizer(model.parameters(), weights)``, then zero_grad / backward / step.

    ``weights`` are the trained LSTM weights (``lstm{k}.*``, ``out.*``). Keyword
    arguments: ``output_scale`` (0.1, as in training) and ``preprocess_p`` (10);
    both may differ per parameter group.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        weights: dict[str, torch.Tensor],
        output_scale: float = 0.1,
        preprocess_p: float = 10.0,
    ) -> None:
        if not output_scale > 0:
            raise ValueError(f"LearnedOptimizer: output_scale must be positive, got {output_scale!r}")
        if not preprocess_p > 0:
            raise ValueError(f"LearnedOptimizer: preprocess_p must be positive, got {preprocess_p!r}")
        layers = lstm_layers(weights)
        expected = {f"lstm{k}.{n}" for k in range(layers) for n in ("weight_ih", "weight_hh", "bias")} | {"out.weight", "out.bias"}
        if set(weights) != expected:
            raise ValueError(
                f"LearnedOptimizer: weights keys {sorted(weights)} are not those of a {layers}-layer LSTM optimizer "
                f"(missing {sorted(expected - set(weights))}, unexpected {sorted(set(weights) - expected)})"
            )
        self.weights = {k: v.detach().clone() for k, v in weights.items()}
        super().__init__(params, {"output_scale": output_scale, "preprocess_p": preprocess_p})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One learned update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                weights = {k: v.to(device=param.device, dtype=param.dtype) for k, v in self.weights.items()}
                state = self.state[param]
                if not state:
                    lstm = init_state(weights, param.numel())
                    state.update({f"lstm_state{i}": s for i, s in enumerate(lstm)})
                lstm = tuple(state[f"lstm_state{i}"] for i in range(2 * lstm_layers(weights)))
                delta, lstm = lstm_update(
                    weights, param.grad, lstm, p=group["preprocess_p"], output_scale=group["output_scale"]
                )
                param.add_(delta)
                state.update({f"lstm_state{i}": s for i, s in enumerate(lstm)})
        return loss
