"""The server's functional Adam equals torch.optim.Adam step by step."""
import pytest
import torch

from pipeline.config import OptimizerConfig
from pipeline.optim import adam


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.9)], ids=["default-betas", "low-betas"])
def test_adam_matches_torch_optim(betas):
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(50, generator=gen, dtype=torch.float64)
    grads = [torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(20)]
    ref = start.clone().requires_grad_()
    opt = torch.optim.Adam([ref], lr=0.01, betas=betas, eps=1e-8)
    ours, state = start.clone(), adam.init(start)
    for g in grads:
        ref.grad = g.clone()
        opt.step()
        delta, state = adam.update(g, state, 0.01, betas, 1e-8)
        ours = ours + delta
        torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-12)
    assert state.step == 20


def test_cosine_schedule_decays_to_zero():
    cfg = OptimizerConfig(lr=0.1, schedule="cosine")
    assert adam.learning_rate(cfg, 0, 100) == pytest.approx(0.1)
    assert adam.learning_rate(cfg, 50, 100) == pytest.approx(0.05)
    assert adam.learning_rate(cfg, 100, 100) == pytest.approx(0.0)
    assert adam.learning_rate(OptimizerConfig(lr=0.1), 99, 100) == 0.1


def test_clip_bounds_the_norm():
    g = torch.full((4,), 3.0)
    clipped, norm = adam.clip(g, 1.0)
    assert norm == pytest.approx(6.0)
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-5)
    same, _ = adam.clip(g, None)
    assert torch.equal(same, g)
