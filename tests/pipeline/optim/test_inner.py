"""Inner-loop optimizers step for step against torch.optim, and the unroll."""
from __future__ import annotations

import pytest
import torch

from pipeline.optim.inner import adam, apply_updates, sgd, unroll

DT = torch.float64


def gradients(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    return {"a": torch.randn(3, 4, generator=gen, dtype=DT), "b": torch.randn(5, generator=gen, dtype=DT)}


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (lambda: sgd(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (lambda: adam(0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
        (lambda: adam(0.03, betas=(0.0, 0.99), eps=1e-6), lambda p: torch.optim.Adam(p, lr=0.03, betas=(0.0, 0.99), eps=1e-6)),
    ],
    ids=["sgd", "adam", "adam-beta1-0"],
)
def test_matches_torch_optim_step_by_step(ours, theirs):
    start = {k: torch.zeros_like(v) + 0.5 for k, v in gradients(0).items()}
    reference = {k: v.clone().requires_grad_() for k, v in start.items()}
    torch_opt = theirs(list(reference.values()))
    opt = ours()
    params, state = start, opt.init(start)
    for step in range(5):
        grads = gradients(step)
        deltas, state = opt.update(grads, state)
        params = apply_updates(params, deltas)
        for k, g in grads.items():
            reference[k].grad = g.clone()
        torch_opt.step()
        for k in params:
            assert torch.allclose(params[k], reference[k].detach(), atol=1e-14, rtol=0), (step, k)


def test_sgd_with_one_rate_per_parameter_is_differentiable_in_the_rates():
    rates = {"a": torch.full((3, 4), 0.1, dtype=DT, requires_grad=True), "b": torch.full((5,), 0.2, dtype=DT)}
    grads = gradients(0)
    deltas, _ = sgd(rates).update(grads, ())
    assert torch.allclose(deltas["b"], -0.2 * grads["b"])
    (d_rate,) = torch.autograd.grad(deltas["a"].sum(), rates["a"])
    assert torch.allclose(d_rate, -grads["a"])


@pytest.mark.parametrize("make", [lambda: sgd(0.0), lambda: adam(-1.0), lambda: adam(0.1, betas=(1.0, 0.9))])
def test_bad_hyperparameters_fail_at_construction_naming_the_value(make):
    with pytest.raises(ValueError, match="got"):
        make()


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
