"""``algorithm.inner_loss: sum_over_shots`` against cbfinn/maml's inner step written out by hand (float64).

cbfinn/maml ``utils.py``: ``xent = softmax_cross_entropy_with_logits(pred, label) / update_batch_size`` (one value
per support example) and ``maml.py``: ``tf.gradients(task_lossa, weights)``, which sums over the N*K examples.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.algorithms.maml import MAML
from pipeline.build import build_learner
from pipeline.config import validate
from tests.pipeline.algorithms.test_maml import CASES, hand_conv4, leaf, tiny_images

SHOTS = 2  # tiny_images: labels [0, 1, 0, 1], 2-way 2-shot


def cbfinn_unroll(params: dict, episodes, lr: float, steps: int) -> torch.Tensor:
    """Mean query loss after ``steps`` of cbfinn's inner step, differentiable (second order)."""
    losses = []
    for t in range(len(episodes)):
        fast = dict(params)
        for _ in range(steps):
            xent = F.cross_entropy(hand_conv4(fast, episodes.support_x[t]), episodes.support_y[t], reduction="none") / SHOTS
            grads = torch.autograd.grad(xent.sum(), list(fast.values()), create_graph=True)  # tf.gradients sums
            fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads)}
        losses.append(F.cross_entropy(hand_conv4(fast, episodes.query_x[t]), episodes.query_y[t]))
    return torch.stack(losses).mean()


def assert_matches_reference(maml: MAML, params: dict, episodes, expected: torch.Tensor) -> dict:
    """``maml``'s meta-loss and meta-gradient equal ``expected`` (a reference's loss, differentiable in ``params``)
    and its gradient, in float64; returns the meta-gradient."""
    expected_grads = torch.autograd.grad(expected, list(params.values()), retain_graph=True)
    loss, _ = maml.meta_loss(params, episodes)
    grads, _ = maml.meta_grad(params, episodes)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-12)
    for (k, g), e in zip(grads.items(), expected_grads):
        assert torch.allclose(g, e, atol=1e-10), k
    return grads


@pytest.mark.parametrize("batching", ["loop", "stacked", "vmap"])
def test_sum_over_shots_matches_cbfinn_inner_step(batching):
    net = CASES["conv4"][0]
    maml = MAML(net, "cross_entropy", inner_lr=0.3, inner_steps=2, batching=batching, inner_loss_scale=2.0)
    params = leaf(maml.init(1, torch.float64))
    episodes = tiny_images(3, seed=5)
    expected = cbfinn_unroll(params, episodes, 0.3, 2)
    assert_matches_reference(maml, params, episodes, expected)
    mean = MAML(net, "cross_entropy", inner_lr=0.3, inner_steps=2, batching=batching)
    assert mean.meta_loss(params, episodes)[0].item() != pytest.approx(expected.item(), abs=1e-6)


def run(task: dict, **algorithm) -> dict:
    return {"task": task, "store": {"path": "unused"}, "algorithm": {"name": "maml", **algorithm}}


@pytest.mark.parametrize(
    ("raw", "scale"),
    [
        (run({"name": "omniglot", "ways": 5}), 5.0),  # the default: cbfinn's
        (run({"name": "omniglot", "ways": 20}, inner_loss="sum_over_shots"), 20.0),
        (run({"name": "omniglot", "ways": 20}, inner_loss="mean"), 1.0),
        (run({"name": "sinusoid"}, inner_loss="sum_over_shots"), 1.0),  # cbfinn's mse is the mean
    ],
    ids=["omniglot-5w-default", "omniglot-20w", "mean", "sinusoid"],
)
def test_the_setting_reaches_the_learner(raw, scale):
    assert build_learner(validate(raw)).inner_loss_scale == scale


def test_bad_values_are_refused():
    with pytest.raises(Exception, match="algorithm.inner_loss"):
        validate(run({"name": "sinusoid"}, inner_loss="sum"))
    with pytest.raises(ValueError, match="inner_loss_scale must be positive, got 0"):
        MAML(CASES["conv4"][0], "cross_entropy", inner_lr=0.1, inner_loss_scale=0.0)
