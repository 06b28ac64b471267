"""Adam equals torch.optim.Adam step by step, on a flat buffer and on named tensors; eps_root keeps it differentiable."""
from __future__ import annotations

import pytest
import torch

from pipeline.optim.adam import AdamState, adam
from pipeline.optim.base import apply_updates
from pipeline.optim.schedule import cosine
from pipeline.optim.unroll import unroll
from tests.helpers import assert_steps_match_torch_optim

DT = torch.float64


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=0.01), dict(lr=0.01, betas=(0.5, 0.9)), dict(lr=0.03, betas=(0.0, 0.99), eps=1e-6)],
    ids=["default-betas", "low-betas", "beta1-0"],
)
def test_named_tensors_match_torch_optim_step_by_step(kwargs):
    state = assert_steps_match_torch_optim(adam(**kwargs), torch.optim.Adam, **kwargs)
    assert state.step == 5


def test_flat_buffer_with_a_schedule_matches_torch_optim_with_lambda_lr():
    """The server's use: one flat tensor, a cosine schedule on the step count."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, generator=gen, dtype=DT)
    ref = start.clone().requires_grad_()
    torch_opt = torch.optim.Adam([ref], lr=0.01)
    decay = torch.optim.lr_scheduler.LambdaLR(torch_opt, lambda step: cosine(0.01, 20)(step) / 0.01)
    opt = adam(cosine(0.01, 20))
    ours, state = start.clone(), opt.init(start)
    for _ in range(20):
        g = torch.randn(50, generator=gen, dtype=DT)
        ref.grad = g.clone()
        torch_opt.step()
        decay.step()
        updates, state = opt.update(g, state)
        ours = apply_updates(ours, updates)
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-12)
    assert isinstance(state, AdamState) and state.step == 20 and state.exp_avg.shape == (50,)


def test_meta_gradient_is_finite_where_a_gradient_coordinate_is_zero():
    """Support loss (w0 - 1)^2 never moves w1: its second moment stays 0, where sqrt has no derivative."""
    w = torch.tensor([0.5, 0.5], dtype=DT, requires_grad=True)

    def support(p):
        return (p["w"] @ torch.tensor([1.0, 0.0], dtype=DT) - 1) ** 2

    def meta_grad(optimizer):
        fast, _ = unroll(support, {"w": w}, optimizer, steps=2, create_graph=True)
        query = (fast["w"] @ torch.tensor([1.0, 1.0], dtype=DT) - 2) ** 2
        (grad,) = torch.autograd.grad(query, w)
        return fast["w"].detach(), grad

    fast, grad = meta_grad(adam(0.1))  # the default: any inner Adam may be differentiated
    assert torch.isfinite(grad).all(), grad
    assert fast[1] == 0.5
    assert grad[1].item() == pytest.approx(2 * (fast[0].item() + 0.5 - 2), rel=1e-12)
    _, without = meta_grad(adam(0.1, eps_root=0.0))
    assert not torch.isfinite(without).all()  # what eps_root is for


@pytest.mark.parametrize(
    "kwargs",
    [dict(lr=-1.0), dict(lr=0.1, betas=(1.0, 0.9)), dict(lr=0.1, eps=0.0), dict(lr=0.1, eps_root=-1.0)],
    ids=["lr", "betas", "eps", "eps_root"],
)
def test_bad_hyperparameters_fail_at_construction_naming_the_value(kwargs):
    with pytest.raises(ValueError, match="got"):
        adam(**kwargs)
