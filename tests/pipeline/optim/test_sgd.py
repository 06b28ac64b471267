"""SGD against torch.optim, and Meta-SGD's per-parameter rates."""
from __future__ import annotations

import pytest
import torch

from pipeline.optim.sgd import sgd
from tests.helpers import assert_steps_match_torch_optim, named_gradients

DT = torch.float64


def test_matches_torch_optim_step_by_step():
    assert_steps_match_torch_optim(sgd(0.1), torch.optim.SGD, lr=0.1)


def test_one_rate_per_parameter_is_differentiable_in_the_rates():
    rates = {"a": torch.full((3, 4), 0.1, dtype=DT, requires_grad=True), "b": torch.full((5,), 0.2, dtype=DT)}
    grads = named_gradients(0)
    updates, _ = sgd(rates).update(grads, ())
    assert torch.allclose(updates["b"], -0.2 * grads["b"])
    (d_rate,) = torch.autograd.grad(updates["a"].sum(), rates["a"])
    assert torch.allclose(d_rate, -grads["a"])


def test_bad_rate_fails_at_construction_naming_the_value():
    with pytest.raises(ValueError, match="got 0.0"):
        sgd(0.0)
