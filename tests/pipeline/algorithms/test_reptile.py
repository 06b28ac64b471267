"""Reptile's direction: theta minus the mean adapted theta, against SGD/Adam written out by hand."""
from __future__ import annotations

import pytest
import torch

from pipeline.algorithms.reptile import Reptile
from pipeline.nets.conv4 import Conv4
from pipeline.nets.mlp import MLP
from tests.pipeline.algorithms.test_maml import (
    CASES,
    HEAD,
    hand_conv4,
    hand_unroll,
    leaf,
    sinusoids,
)

DT = torch.float64


@pytest.mark.parametrize("batching", ["loop", "stacked"])
@pytest.mark.parametrize("case", list(CASES))
def test_direction_is_theta_minus_the_mean_adapted_theta(case, batching):
    net, loss, _, episodes_of, *_ = CASES[case]
    reptile = Reptile(net, loss, inner_lr=0.1, inner_steps=3, batching=batching)
    params = reptile.init(0, DT)
    episodes = episodes_of()
    _, fasts = hand_unroll(case, leaf(params), episodes, 0.1, 3, first_order=True)
    grads, metrics = reptile.meta_grad(params, episodes)
    for k in params:
        mean_adapted = torch.stack([f[k] for f in fasts]).mean(0)
        assert torch.allclose(grads[k], params[k] - mean_adapted, atol=1e-10), k
    assert metrics["loss"] > 0 and metrics["support_loss"] > 0


def test_one_sgd_step_gives_lr_times_the_mean_support_gradient():
    net = MLP((1, 40, 40, 1))
    reptile = Reptile(net, "mse", inner_lr=0.05, inner_steps=1)
    params = leaf(reptile.init(0, DT))
    episodes = sinusoids(4, 10, seed=1)
    losses = [((net.apply(params, episodes.support_x[t]) - episodes.support_y[t]) ** 2).mean() for t in range(4)]
    expected = torch.autograd.grad(torch.stack(losses).mean(), list(params.values()))
    grads, _ = reptile.meta_grad(params, episodes)
    for (k, g), e in zip(grads.items(), expected):
        assert torch.allclose(g, 0.05 * e, atol=1e-12), k


def test_adam_inner_loop_matches_torch_optim_adam_per_task():
    net = Conv4(1, 8, 2, filters=3)
    reptile = Reptile(net, "cross_entropy", inner_lr=0.01, inner_steps=3, inner_optimizer="adam", batching="stacked")
    params = reptile.init(2, DT)
    episodes = CASES["conv4"][3]()
    grads, _ = reptile.meta_grad(params, episodes)
    adapted = []
    for t in range(len(episodes)):
        fast = leaf(params)
        opt = torch.optim.Adam(fast.values(), lr=0.01, betas=(0.0, 0.999))
        for _ in range(3):
            opt.zero_grad()
            out = net.apply(fast, episodes.support_x[t])
            torch.nn.functional.cross_entropy(out, episodes.support_y[t]).backward()
            opt.step()
        adapted.append(fast)
    for k in params:
        expected = params[k] - torch.stack([a[k].detach() for a in adapted]).mean(0)
        assert torch.allclose(grads[k], expected, atol=1e-10), k


def test_adapt_and_evaluate_use_the_inner_optimizer():
    net = MLP((1, 40, 40, 1))
    reptile = Reptile(net, "mse", inner_lr=0.02, inner_steps=2, eval_inner_steps=4)
    params = reptile.init(0, DT)
    episodes = sinusoids(2, 10, seed=4)
    _, fasts = hand_unroll("mlp", leaf(params), episodes, 0.02, 4, first_order=True)
    predict = reptile.adapt(params, episodes.support_x[1], episodes.support_y[1])
    assert torch.allclose(predict(episodes.query_x[1]), net.apply(fasts[1], episodes.query_x[1]).detach(), atol=1e-10)
    metrics = reptile.evaluate(params, episodes)
    assert set(metrics) == {"loss", "pre_loss"}
    post = ((predict(episodes.query_x[1]) - episodes.query_y[1]) ** 2).mean()
    pre = ((net.apply(params, episodes.query_x[1]) - episodes.query_y[1]) ** 2).mean()
    assert metrics["loss"][1].item() == pytest.approx(post.item(), abs=1e-10)
    assert metrics["pre_loss"][1].item() == pytest.approx(pre.item(), abs=1e-10)


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="'rmsprop'"):
        Reptile(MLP(), "mse", 0.1, inner_optimizer="rmsprop")
    with pytest.raises(ValueError, match="'vmap'"):
        Reptile(MLP(), "mse", 0.1, batching="vmap")


@pytest.mark.parametrize("batching", ["loop", "stacked"])
def test_anil_reptile_moves_the_head_only_and_gives_the_body_the_first_order_gradient(batching):
    net = Conv4(1, 8, 2, filters=3)
    reptile = Reptile(net, "cross_entropy", inner_lr=0.1, inner_steps=2, batching=batching, adapt_params=("head.*",))
    params = reptile.init(0, DT)
    episodes = CASES["conv4"][3]()
    _, fasts = hand_unroll("conv4", leaf(params), episodes, 0.1, 2, first_order=True, adapt=HEAD)
    fast, _ = reptile.adapt_tasks(params, episodes)
    assert all(fast[k] is params[k] for k in params if k not in HEAD)  # the body stays out of the inner loop
    grads, _ = reptile.meta_grad(params, episodes)
    body = [k for k in params if k not in HEAD]
    expected = dict.fromkeys(body, 0.0)
    for t, adapted in enumerate(fasts):
        at = {k: v.detach() if k in HEAD else params[k].clone().requires_grad_() for k, v in adapted.items()}
        loss = torch.nn.functional.cross_entropy(hand_conv4(at, episodes.query_x[t]), episodes.query_y[t]) / len(episodes)
        for k, g in zip(body, torch.autograd.grad(loss, [at[k] for k in body])):
            expected[k] = expected[k] + g
    for k in params:
        want = params[k] - torch.stack([f[k] for f in fasts]).mean(0) if k in HEAD else expected[k]
        assert torch.allclose(grads[k], want.detach(), atol=1e-10), k
    assert all(grads[k].abs().max() > 1e-8 for k in params)
