"""Reptile's training shots and inner mini-batches against openai/supervised-reptile written out by hand (float64).

openai's ``train_step``: each task samples ``train_shots`` examples per class and takes ``inner_iters`` optimizer
steps on ``_mini_batches`` of ``inner_batch_size`` (shuffled, without replacement, reshuffled at each pass).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.algorithms.reptile import Reptile
from pipeline.build import build_learner
from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.nets.conv4 import Conv4
from tasks.episodes import Episodes
from tests.pipeline.algorithms.test_maml import hand_conv4, leaf

DT = torch.float64
WAYS, SHOTS, QUERIES = 2, 1, 3


def episodes(tasks: int, seed: int) -> Episodes:
    """Class-major N-way K-shot episodes with Q queries per class, labels as the store lays them out."""
    gen = torch.Generator().manual_seed(seed)
    return Episodes(
        torch.rand(tasks, WAYS * SHOTS, 1, 8, 8, generator=gen, dtype=DT),
        torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1),
        torch.rand(tasks, WAYS * QUERIES, 1, 8, 8, generator=gen, dtype=DT),
        torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1),
    )


def test_training_set_takes_train_shots_per_class_from_support_then_queries():
    reptile = Reptile(Conv4(1, 8, WAYS, filters=2), "cross_entropy", 0.1, train_shots=3)
    e = episodes(2, seed=0)
    x, y = reptile.training_set(e)
    assert y.tolist() == [[0, 0, 0, 1, 1, 1]] * 2
    for t in range(2):
        expected = [e.support_x[t, 0], e.query_x[t, 0], e.query_x[t, 1], e.support_x[t, 1], e.query_x[t, 3], e.query_x[t, 4]]
        assert torch.equal(x[t], torch.stack(expected))
    with pytest.raises(ValueError, match="have 4 examples per class"):
        Reptile(Conv4(1, 8, WAYS, filters=2), "cross_entropy", 0.1, train_shots=5).training_set(e)


def test_minibatches_are_passes_without_replacement():
    reptile = Reptile(Conv4(1, 8, WAYS, filters=2), "cross_entropy", 0.1, inner_steps=5, inner_batch=3, train_shots=3)
    e = episodes(4, seed=1)
    order = reptile.minibatches(e, 6)
    assert order.shape == (5, 4, 3)
    for t in range(4):
        flat = order[:, t].flatten().tolist()
        assert sorted(flat[:6]) == list(range(6)) and sorted(flat[6:12]) == list(range(6))  # whole passes
    assert torch.equal(order, reptile.minibatches(e, 6))  # a pure function of the episodes
    assert not torch.equal(order, reptile.minibatches(episodes(4, seed=2), 6))
    assert not all(torch.equal(order[:, 0], order[:, t]) for t in range(1, 4))  # each task its own shuffle


@pytest.mark.parametrize("batching", ["loop", "stacked"])
@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_meta_grad_is_theta_minus_the_mean_of_openai_inner_loops(batching, inner_optimizer):
    net = Conv4(1, 8, WAYS, filters=2)
    reptile = Reptile(net, "cross_entropy", 0.05, inner_steps=3, inner_optimizer=inner_optimizer, batching=batching,
                      train_shots=3, inner_batch=4)
    params = reptile.init(0, DT)
    e = episodes(3, seed=3)
    x, y = reptile.training_set(e)
    order = reptile.minibatches(e, x.shape[1])
    adapted = []
    for t in range(3):
        fast = leaf(params)
        opt = (torch.optim.Adam(fast.values(), lr=0.05, betas=(0.0, 0.999)) if inner_optimizer == "adam"
               else torch.optim.SGD(fast.values(), lr=0.05))
        for step in range(3):
            index = order[step, t]
            opt.zero_grad()
            F.cross_entropy(hand_conv4(fast, x[t, index]), y[t, index]).backward()
            opt.step()
        adapted.append({k: v.detach() for k, v in fast.items()})
    grads, metrics = reptile.meta_grad(params, e)
    for k in params:
        assert torch.allclose(grads[k], params[k] - torch.stack([a[k] for a in adapted]).mean(0), atol=1e-10), k
    assert metrics["support_loss"] > 0


def test_settings_reach_the_learner_and_bad_ones_are_refused():
    raw = {"task": {"name": "omniglot", "ways": 5, "shots": 1, "queries": 9}, "store": {"path": "unused"},
           "algorithm": {"name": "reptile", "train_shots": 10, "inner_batch": 10, "inner_steps": 5}}
    learner = build_learner(validate(raw))
    assert (learner.train_shots, learner.inner_batch, learner.inner_steps) == (10, 10, 5)
    with pytest.raises(ConfigError, match="algorithm.train_shots: 11 is more than the task's shots \\+ queries = 10"):
        validate({**raw, "algorithm": {"name": "reptile", "train_shots": 11}})
    with pytest.raises(ConfigError, match="algorithm.train_shots: reptile takes training shots per class from classification"):
        validate({"task": {"name": "sinusoid"}, "store": {"path": "unused"}, "algorithm": {"name": "reptile", "train_shots": 2}})
    with pytest.raises(ValueError, match="inner_batch must be at least 1, got 0"):
        Reptile(Conv4(1, 8, WAYS, filters=2), "cross_entropy", 0.1, inner_batch=0)
