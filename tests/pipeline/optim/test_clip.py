"""Clipping by global norm."""
import pytest
import torch

from pipeline.optim.clip import clip_by_global_norm


def test_clip_bounds_the_norm_of_a_flat_buffer():
    g = torch.full((4,), 3.0)
    clipped, norm = clip_by_global_norm(g, 1.0)
    assert norm == pytest.approx(6.0)
    assert float(clipped.norm()) == pytest.approx(1.0, rel=1e-5)
    same, _ = clip_by_global_norm(g, None)
    assert torch.equal(same, g)


def test_the_norm_of_named_tensors_is_global():
    grads = {"a": torch.full((2, 2), 3.0), "b": torch.tensor([0.0, 0.0, 0.0, 6.0])}
    clipped, norm = clip_by_global_norm(grads, 3.0)
    assert norm == pytest.approx((36.0 + 36.0) ** 0.5)
    assert torch.allclose(clipped["a"], grads["a"] * 3.0 / (norm + 1e-6))
    assert torch.allclose(clipped["b"], grads["b"] * 3.0 / (norm + 1e-6))
