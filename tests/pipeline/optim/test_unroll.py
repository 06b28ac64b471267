"""The differentiable inner loop."""
from __future__ import annotations

import torch

from pipeline.optim.sgd import sgd
from pipeline.optim.unroll import unroll

DT = torch.float64


def test_unroll_takes_sgd_steps_and_reports_the_first_losses():
    target = torch.tensor([[1.0, -2.0], [3.0, 0.5]], dtype=DT)
    theta = torch.zeros(2, 2, dtype=DT, requires_grad=True)

    def losses(p):
        return ((p["w"] - target) ** 2).sum(-1)

    fast, first = unroll(losses, {"w": theta}, sgd(0.25), steps=2, create_graph=True)
    # each step halves the distance to the target: w_k = target * (1 - 0.5**k)
    assert torch.allclose(fast["w"], target * 0.75)
    assert torch.allclose(first, (target**2).sum(-1))
    (d_theta,) = torch.autograd.grad(fast["w"].sum(), theta)
    assert torch.allclose(d_theta, torch.full_like(theta, 0.25))


def test_without_create_graph_only_the_update_path_is_differentiated():
    theta = torch.tensor([2.0], dtype=DT, requires_grad=True)
    fast, _ = unroll(lambda p: p["w"].square().sum(), {"w": theta}, sgd(0.25), steps=1, create_graph=False)
    (d_theta,) = torch.autograd.grad(fast["w"].sum(), theta)
    assert d_theta.item() == 1.0  # second order would give 1 - 0.25 * 2 = 0.5
