"""sliced_meta_grad: the gradient of a meta-batch's mean loss, any number of episodes per pass."""

import pytest
import torch

from pipeline.algorithms.meta_batch import episodes_per_pass, sliced_meta_grad
from tasks.episodes import Episodes


def regression(batch: int) -> Episodes:
    """``batch`` linear-regression episodes in float64: 4 queries of 3 features each."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 3, generator=g, dtype=torch.float64)
    y = torch.randn(batch, 4, generator=g, dtype=torch.float64)
    return Episodes(x, y, x, y)


def squared_errors(params, part):
    """Per-episode mean squared error ``[B]`` of ``x @ w``; ``unused`` takes no part."""
    losses = ((part.query_x @ params["w"] - part.query_y) ** 2).mean(1)
    return losses, {"loss": losses.mean().item()}


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_any_slice_size_gives_the_hand_derived_gradient_of_the_mean_loss(size):
    episodes = regression(5)
    params = {"w": torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True),
              "unused": torch.ones(2, dtype=torch.float64, requires_grad=True)}
    grads, metrics = sliced_meta_grad(params, episodes, size, lambda part: squared_errors(params, part))
    x, y, w = episodes.query_x, episodes.query_y, params["w"].detach()
    residual = x @ w - y  # [B, Q]
    expected = (2 * residual.unsqueeze(-1) * x).mean(1).mean(0)  # d/dw of mean_b mean_q residual^2
    torch.testing.assert_close(grads["w"], expected, rtol=0, atol=1e-12)
    assert torch.equal(grads["unused"], torch.zeros(2, dtype=torch.float64))
    assert metrics["loss"] == pytest.approx((residual**2).mean().item(), abs=1e-12)


def test_a_slice_size_below_one_is_refused_naming_it():
    params = {"w": torch.zeros(3, dtype=torch.float64, requires_grad=True)}
    with pytest.raises(ValueError, match="episodes per backward pass must be at least 1, got 0"):
        sliced_meta_grad(params, regression(2), 0, lambda part: squared_errors(params, part))


def test_episodes_per_pass_is_the_asked_number_else_the_default_of_the_device_type():
    assert episodes_per_pass(None, torch.device("cpu"), cpu=1, gpu=32) == 1
    assert episodes_per_pass(None, torch.device("meta"), cpu=1, gpu=32) == 32  # any accelerator
    assert episodes_per_pass(5, torch.device("cpu"), cpu=1, gpu=32) == 5
