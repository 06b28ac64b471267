"""SGD against torch.optim, and Meta-SGD's per-parameter rates."""
from __future__ import annotations

import pytest
import torch

from pipeline.optim.base import apply_updates
from pipeline.optim.sgd import sgd

DT = torch.float64


def gradients(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return {"a": torch.randn(3, 4, generator=gen, dtype=DT), "b": torch.randn(5, generator=gen, dtype=DT)}


def test_matches_torch_optim_step_by_step():
    start = {k: torch.zeros_like(v) + 0.5 for k, v in gradients(0).items()}
    reference = {k: v.clone().requires_grad_() for k, v in start.items()}
    torch_opt = torch.optim.SGD(list(reference.values()), lr=0.1)
    opt = sgd(0.1)
    params, state = start, opt.init(start)
    for step in range(5):
        grads = gradients(step)
        updates, state = opt.update(grads, state)
        params = apply_updates(params, updates)
        for k, g in grads.items():
            reference[k].grad = g.clone()
        torch_opt.step()
        for k in params:
            assert torch.allclose(params[k], reference[k].detach(), atol=1e-14, rtol=0), (step, k)


def test_one_rate_per_parameter_is_differentiable_in_the_rates():
    rates = {"a": torch.full((3, 4), 0.1, dtype=DT, requires_grad=True), "b": torch.full((5,), 0.2, dtype=DT)}
    grads = gradients(0)
    updates, _ = sgd(rates).update(grads, ())
    assert torch.allclose(updates["b"], -0.2 * grads["b"])
    (d_rate,) = torch.autograd.grad(updates["a"].sum(), rates["a"])
    assert torch.allclose(d_rate, -grads["a"])


def test_bad_rate_fails_at_construction_naming_the_value():
    with pytest.raises(ValueError, match="got 0.0"):
        sgd(0.0)
