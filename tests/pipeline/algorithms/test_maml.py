"""MAML against a hand-written unroll (float64): losses, fast weights and meta-gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.algorithms.maml import LR_PREFIX, MAML, adapt_tasks, task_losses
from pipeline.nets.conv4 import Conv4
from pipeline.nets.mlp import MLP
from pipeline.optim.sgd import sgd
from tasks.episodes import Episodes

DT = torch.float64
BATCHINGS = ["loop", "stacked", "vmap"]


def sinusoids(tasks: int, shots: int, seed: int, dtype: torch.dtype = DT) -> Episodes:
    """Sinusoid regression episodes of the MAML paper: y = A sin(x - phase)."""
    gen = torch.Generator().manual_seed(seed)
    amp = torch.rand(tasks, 1, 1, generator=gen, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(tasks, 1, 1, generator=gen, dtype=dtype) * math.pi
    x = torch.rand(tasks, 2 * shots, 1, generator=gen, dtype=dtype) * 10 - 5
    y = amp * torch.sin(x - phase)
    return Episodes(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])


def tiny_images(tasks: int, seed: int) -> Episodes:
    gen = torch.Generator().manual_seed(seed)
    return Episodes(
        torch.rand(tasks, 4, 1, 8, 8, generator=gen, dtype=DT),
        torch.tensor([0, 1, 0, 1]).repeat(tasks, 1),
        torch.rand(tasks, 6, 1, 8, 8, generator=gen, dtype=DT),
        torch.randint(0, 2, (tasks, 6), generator=gen),
    )


def hand_mlp(p: dict, x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ p["layer0.weight"].T + p["layer0.bias"])
    h = torch.relu(h @ p["layer1.weight"].T + p["layer1.bias"])
    return h @ p["layer2.weight"].T + p["layer2.bias"]


def hand_conv4(p: dict, x: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
    """Conv4 by hand; with ``support``, x is normalized with the support pass's statistics (support norm mode)."""
    for i in range(4):
        x = F.conv2d(x, p[f"conv{i}.weight"], stride=2, padding=1)
        ref = x if support is None else F.conv2d(support, p[f"conv{i}.weight"], stride=2, padding=1)
        mean = ref.mean(dim=(0, 2, 3), keepdim=True)
        std = torch.sqrt(((ref - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True) + 1e-5)
        gamma, beta = p[f"bn{i}.weight"][:, None, None], p[f"bn{i}.bias"][:, None, None]
        x = torch.relu((x - mean) / std * gamma + beta)
        if support is not None:
            support = torch.relu((ref - mean) / std * gamma + beta)
    return x.mean(dim=(2, 3)) @ p["head.weight"].T + p["head.bias"]


def transductive(forward):
    """The query pass of a network in transductive mode: the queries alone."""
    return lambda p, support_x, query_x: forward(p, query_x)


CASES = {
    "mlp": (MLP((1, 40, 40, 1)), "mse", hand_mlp, lambda: sinusoids(3, 5, seed=0),
            lambda out, y: ((out - y) ** 2).mean(), transductive(hand_mlp)),
    "conv4": (Conv4(1, 8, 2, filters=3), "cross_entropy", hand_conv4, lambda: tiny_images(3, seed=0),
              lambda out, y: F.cross_entropy(out, y), transductive(hand_conv4)),
    "conv4-support-norm": (Conv4(1, 8, 2, filters=3, norm="support"), "cross_entropy", hand_conv4,
                           lambda: tiny_images(3, seed=0), lambda out, y: F.cross_entropy(out, y),
                           lambda p, support_x, query_x: hand_conv4(p, query_x, support_x)),
}


def hand_unroll(case: str, params: dict, episodes: Episodes, lr, steps: int, first_order: bool = False, adapt=None):
    """SGD written out by hand, one task at a time (as higher's test_higher.py): query losses and fast weights.

    ``adapt``: the names SGD updates (ANIL); the others stay as they are. None: all.
    """
    _, _, forward, _, loss_fn, query = CASES[case]
    net = {k: v for k, v in params.items() if not k.startswith(LR_PREFIX)}
    adapt = list(net) if adapt is None else adapt
    rates = {k: params[LR_PREFIX + k] if LR_PREFIX + k in params else lr for k in adapt}
    losses, fasts = [], []
    for t in range(len(episodes)):
        fast = dict(net)
        for _ in range(steps):
            loss = loss_fn(forward(fast, episodes.support_x[t]), episodes.support_y[t])
            grads = torch.autograd.grad(loss, [fast[k] for k in adapt], create_graph=not first_order)
            fast = fast | {k: fast[k] - rates[k] * g for k, g in zip(adapt, grads)}
        losses.append(loss_fn(query(fast, episodes.support_x[t], episodes.query_x[t]), episodes.query_y[t]))
        fasts.append(fast)
    return torch.stack(losses), fasts


def learner(case: str, batching: str, steps: int, **kw) -> MAML:
    net, loss, *_ = CASES[case]
    return MAML(net, loss, inner_lr=0.1, inner_steps=steps, batching=batching, **kw)


def leaf(params: dict) -> dict:
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("batching", BATCHINGS)
@pytest.mark.parametrize("case", list(CASES))
def test_second_order_equals_the_hand_written_unroll(case, batching, steps):
    maml = learner(case, batching, steps, task_chunk=2)
    params = leaf(maml.init(0, DT))
    episodes = CASES[case][3]()
    ref_losses, ref_fast = hand_unroll(case, params, episodes, 0.1, steps)
    ref_grads = torch.autograd.grad(ref_losses.mean(), list(params.values()))

    loss, metrics = maml.meta_loss(params, episodes)
    assert torch.allclose(loss, ref_losses.mean(), atol=1e-10)
    assert metrics["loss"] == pytest.approx(ref_losses.mean().item(), abs=1e-10)
    grads, _ = maml.meta_grad(params, episodes)
    assert list(grads) == list(params)
    for (k, g), r in zip(grads.items(), ref_grads):
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-5), k
    assert any(g.abs().max() > 1e-6 for g in ref_grads)

    fast, _ = adapt_tasks(maml.network, maml.loss, sgd(0.1), params, episodes.support_x, episodes.support_y, steps, True)
    for t, ref in enumerate(ref_fast):
        for k in ref:
            assert torch.allclose(fast[k][t], ref[k], atol=1e-10), (t, k)


@pytest.mark.parametrize("batching", BATCHINGS)
@pytest.mark.parametrize("case", list(CASES))
def test_first_order_gradient_is_the_query_gradient_at_the_adapted_parameters(case, batching):
    maml = learner(case, batching, 2, first_order=True)
    params = leaf(maml.init(1, DT))
    episodes = CASES[case][3]()
    _, fasts = hand_unroll(case, params, episodes, 0.1, 2, first_order=True)
    _, _, _, _, loss_fn, query = CASES[case]
    expected = {k: torch.zeros_like(v) for k, v in params.items()}
    for t, fast in enumerate(fasts):
        at = leaf(fast)
        out = query(at, episodes.support_x[t], episodes.query_x[t])
        grads = torch.autograd.grad(loss_fn(out, episodes.query_y[t]), list(at.values()))
        for k, g in zip(at, grads):
            expected[k] += g / len(episodes)
    grads, _ = maml.meta_grad(params, episodes)
    for k in params:
        assert torch.allclose(grads[k], expected[k], atol=1e-10), k
    second, _ = learner(case, batching, 2).meta_grad(params, episodes)
    assert any(not torch.allclose(second[k], grads[k], atol=1e-8) for k in params)


@pytest.mark.parametrize("batching", BATCHINGS)
def test_meta_sgd_rates_get_the_gradient_of_the_hand_unroll(batching):
    maml = learner("mlp", batching, 2, learn_inner_lr=True)
    params = leaf(maml.init(0, DT))
    assert {k for k in params if k.startswith(LR_PREFIX)} == {LR_PREFIX + k for k in maml.network.init(0)}
    assert torch.equal(params[LR_PREFIX + "layer0.weight"], torch.full((40, 1), 0.1, dtype=DT))
    episodes = sinusoids(3, 5, seed=2)
    ref_losses, _ = hand_unroll("mlp", params, episodes, None, 2)
    ref = dict(zip(params, torch.autograd.grad(ref_losses.mean(), list(params.values()))))
    grads, _ = maml.meta_grad(params, episodes)
    for k in params:
        assert torch.allclose(grads[k], ref[k], atol=1e-8), k
    assert all(grads[k].abs().sum() > 0 for k in params if k.startswith(LR_PREFIX))


def test_metrics_evaluate_and_adapt_agree():
    maml = learner("conv4", "stacked", 2)
    params = maml.init(0, DT)
    episodes = tiny_images(3, seed=5)
    _, metrics = maml.meta_loss(leaf(params), episodes)
    assert set(metrics) == {"loss", "accuracy", "support_loss"}
    per_task = maml.evaluate(params, episodes, steps=2, chunk=2)
    assert set(per_task) == {"loss", "accuracy", "pre_loss", "pre_accuracy"}
    assert per_task["loss"].shape == (3,)
    assert per_task["loss"].mean().item() == pytest.approx(metrics["loss"], abs=1e-10)
    assert per_task["accuracy"].mean().item() == pytest.approx(metrics["accuracy"], abs=1e-10)
    pre = task_losses("cross_entropy", maml.network.apply_tasks(params, episodes.query_x), episodes.query_y)
    assert torch.allclose(per_task["pre_loss"], pre)
    for t in range(3):
        logits = maml.adapt(params, episodes.support_x[t], episodes.support_y[t])(episodes.query_x[t])
        expected = task_losses("cross_entropy", logits, episodes.query_y[t])
        assert logits.shape == (6, 2) and not logits.requires_grad
        assert expected.item() == pytest.approx(per_task["loss"][t].item(), abs=1e-10)


def test_adapt_uses_eval_inner_steps():
    episodes = sinusoids(1, 10, seed=3)
    params = learner("mlp", "stacked", 1).init(0, DT)
    one = learner("mlp", "stacked", 1).adapt(params, episodes.support_x[0], episodes.support_y[0])
    five = learner("mlp", "stacked", 1, eval_inner_steps=5).adapt(params, episodes.support_x[0], episodes.support_y[0])
    _, fasts = hand_unroll("mlp", leaf(params), episodes, 0.1, 5)
    assert torch.allclose(five(episodes.query_x[0]), hand_mlp(fasts[0], episodes.query_x[0]), atol=1e-10)
    assert not torch.allclose(one(episodes.query_x[0]), five(episodes.query_x[0]))


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="'bogus'"):
        MAML(MLP(), "mse", 0.1, batching="bogus")
    with pytest.raises(ValueError, match="got 0"):
        MAML(MLP(), "mse", 0.1, task_chunk=0)


def test_a_short_meta_training_run_lowers_the_post_adaptation_loss():
    torch.manual_seed(0)
    maml = MAML(MLP((1, 40, 40, 1)), "mse", inner_lr=0.01, inner_steps=1)
    params = leaf(maml.init(0))
    held_out = sinusoids(100, 10, seed=999, dtype=torch.float32)
    before = maml.evaluate(params, held_out)["loss"].mean().item()
    optimizer = torch.optim.Adam(params.values(), lr=0.01)
    for step in range(150):
        grads, _ = maml.meta_grad(params, sinusoids(25, 10, seed=step, dtype=torch.float32))
        for k, p in params.items():
            p.grad = grads[k]
        optimizer.step()
    after = maml.evaluate(params, held_out)["loss"].mean().item()
    assert after < 0.5 * before, (before, after)


HEAD = ["head.weight", "head.bias"]


@pytest.mark.parametrize("first_order", [False, True], ids=["second-order", "first-order"])
@pytest.mark.parametrize("batching", BATCHINGS)
def test_anil_adapts_only_the_matched_parameters(batching, first_order, steps=2):
    maml = learner("conv4", batching, steps, first_order=first_order, adapt_params=("head.*",))
    params = leaf(maml.init(0, DT))
    episodes = tiny_images(3, seed=0)
    ref_losses, ref_fast = hand_unroll("conv4", params, episodes, 0.1, steps, first_order, adapt=HEAD)
    if first_order:  # the query gradient at the adapted parameters, the adapted ones taken as leaves
        ref_grads = [torch.zeros_like(v) for v in params.values()]
        for t, fast in enumerate(ref_fast):
            at = {k: v.detach().requires_grad_() if k in HEAD else v for k, v in fast.items()}
            loss = F.cross_entropy(hand_conv4(at, episodes.query_x[t]), episodes.query_y[t]) / len(episodes)
            grads = torch.autograd.grad(loss, [at[k] if k in HEAD else params[k] for k in params])
            ref_grads = [r + g for r, g in zip(ref_grads, grads)]
    else:
        ref_grads = torch.autograd.grad(ref_losses.mean(), list(params.values()))
    grads, metrics = maml.meta_grad(params, episodes)
    assert metrics["loss"] == pytest.approx(ref_losses.mean().item(), abs=1e-10)
    for (k, g), r in zip(grads.items(), ref_grads):
        assert torch.allclose(g, r, atol=1e-8, rtol=1e-6), k
    assert all(grads[k].abs().max() > 1e-8 for k in ("conv0.weight", "head.weight"))  # the body is meta-learned

    fast, _ = adapt_tasks(maml.network, maml.loss, sgd(0.1), params, episodes.support_x, episodes.support_y, steps, True,
                          frozenset(HEAD))
    for k in params:
        if k in HEAD:
            for t, ref in enumerate(ref_fast):
                assert torch.allclose(fast[k][t], ref[k], atol=1e-10), (t, k)
        else:  # left out of the inner loop: the very meta-parameter, no task dimension
            assert fast[k] is params[k], k


def test_anil_meta_sgd_learns_rates_for_the_adapted_parameters_only():
    maml = learner("conv4", "stacked", 2, learn_inner_lr=True, adapt_params=("head.*",))
    params = leaf(maml.init(0, DT))
    assert sorted(k for k in params if k.startswith(LR_PREFIX)) == sorted(LR_PREFIX + k for k in HEAD)
    episodes = tiny_images(3, seed=1)
    ref_losses, _ = hand_unroll("conv4", params, episodes, None, 2, adapt=HEAD)
    ref = dict(zip(params, torch.autograd.grad(ref_losses.mean(), list(params.values()))))
    grads, _ = maml.meta_grad(params, episodes)
    for k in params:
        assert torch.allclose(grads[k], ref[k], atol=1e-8, rtol=1e-6), k


def test_an_adapt_params_glob_matching_nothing_is_named():
    with pytest.raises(ValueError, match=r"\['heads\.\*'\] match no parameter"):
        learner("conv4", "stacked", 1, adapt_params=("head.*", "heads.*"))


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("batching", ["loop", "stacked"])
def test_checkpointed_inner_steps_give_the_same_meta_gradient(batching, steps):
    episodes = tiny_images(3, seed=4)
    for kw in ({}, {"learn_inner_lr": True}, {"adapt_params": ("head.*", "bn3.*")}):
        plain = learner("conv4", batching, steps, task_chunk=2, **kw)
        params = leaf(plain.init(0, DT))
        expected, metrics = plain.meta_grad(params, episodes)
        got, checkpointed_metrics = learner("conv4", batching, steps, task_chunk=2, checkpoint=True, **kw).meta_grad(params, episodes)
        assert checkpointed_metrics == pytest.approx(metrics, abs=1e-12)
        for k in params:
            assert torch.allclose(got[k], expected[k], atol=1e-6, rtol=0), (kw, k)


def test_checkpoint_with_vmap_is_refused():
    with pytest.raises(ValueError, match="not vmap"):
        learner("conv4", "vmap", 1, checkpoint=True)
