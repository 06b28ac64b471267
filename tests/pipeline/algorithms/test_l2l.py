"""The L2L LSTM optimizer: preprocessing, coordinate-wise sharing, truncated BPTT against a hand-written unroll."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.algorithms.l2l import (
    L2L,
    MLPClassifier,
    Quadratic,
    TruncatedL2L,
    episode_generator,
    init_lstm,
    init_state,
    lstm_update,
)
from pipeline.build import build_learner
from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.nets.lstm import preprocess
from pipeline.types import Truncated
from tasks.episodes import Episodes
from tasks.families import quadratic
from tasks.families.quadratic import QuadraticTask


def quadratics(count: int, seed: int, dim: int = 10, dtype: torch.dtype = torch.float64) -> Episodes:
    task = QuadraticTask(dim=dim)
    fields = quadratic.sample(task, np.random.default_rng(seed), count)
    return quadratic.decode(task, {k: torch.from_numpy(v) for k, v in fields.items()}).to("cpu", dtype)


def test_preprocess_large_gradients_give_log_and_sign() -> None:
    g = torch.tensor([0.5, -3.0, 1e-4], dtype=torch.float64)
    out = preprocess(g, p=10.0)
    expected = torch.tensor([[math.log(0.5) / 10, 1.0], [math.log(3.0) / 10, -1.0], [math.log(1e-4) / 10, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


def test_preprocess_small_gradients_give_minus_one_and_scaled_value() -> None:
    g = torch.tensor([1e-6, -2e-5, 0.0], dtype=torch.float64)  # all below e^-10 ~ 4.5e-5
    out = preprocess(g, p=10.0)
    expected = torch.tensor([[-1.0, 1e-6 * math.exp(10)], [-1.0, -2e-5 * math.exp(10)], [-1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(out, expected)


def test_preprocess_threshold_follows_p() -> None:
    g = torch.tensor([0.01])  # above e^-5 ~ 0.0067 but below e^-4 ~ 0.018
    assert preprocess(g, p=5.0)[0, 1].item() == 1.0
    assert preprocess(g, p=4.0)[0, 0].item() == -1.0


def test_parameter_count_is_independent_of_optimizee_size() -> None:
    params = init_lstm(0, hidden=20, layers=2)
    count = sum(v.numel() for v in params.values())
    assert count == 4 * 20 * (2 + 20 + 1) + 4 * 20 * (20 + 20 + 1) + 20 + 1
    for size in (3, 1000):
        grad = torch.randn(size, generator=torch.Generator().manual_seed(size))
        step, state = lstm_update(params, grad, init_state(params, size))
        assert step.shape == grad.shape and all(s.shape == (size, 20) for s in state)


def test_update_is_coordinate_wise() -> None:
    """Each coordinate's step depends only on its own gradient and state: permuting the inputs permutes the steps."""
    params = init_lstm(1)
    grad = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(21, generator=torch.Generator().manual_seed(1))
    state = init_state(params, 21)
    step, state = lstm_update(params, grad, state)
    step2, state2 = lstm_update(params, grad, state)
    pstate = init_state(params, 21)
    pstep, pstate = lstm_update(params, grad.reshape(-1)[perm], pstate)
    pstep2, _ = lstm_update(params, grad.reshape(-1)[perm], pstate)
    torch.testing.assert_close(pstep, step.reshape(-1)[perm])
    torch.testing.assert_close(pstep2, step2.reshape(-1)[perm])


def test_lstm_matches_torch_nn_lstm() -> None:
    params = init_lstm(2, hidden=5, layers=2, dtype=torch.float64)
    reference = torch.nn.LSTM(2, 5, num_layers=2, dtype=torch.float64)
    with torch.no_grad():
        for k in range(2):
            getattr(reference, f"weight_ih_l{k}").copy_(params[f"lstm{k}.weight_ih"])
            getattr(reference, f"weight_hh_l{k}").copy_(params[f"lstm{k}.weight_hh"])
            getattr(reference, f"bias_ih_l{k}").copy_(params[f"lstm{k}.bias"])
            getattr(reference, f"bias_hh_l{k}").zero_()
    grads = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)  # 4 steps, 6 coordinates
    hidden, _ = reference(preprocess(grads))
    expected = (hidden @ params["out.weight"].T + params["out.bias"]).squeeze(-1) * 0.1
    state = init_state(params, 6)
    for t in range(4):
        step, state = lstm_update(params, grads[t], state)
        torch.testing.assert_close(step, expected[t])


def torch_lstm(params: dict[str, torch.Tensor]) -> tuple[torch.nn.LSTM, torch.nn.Linear]:
    """``params`` copied into torch.nn.LSTM (2 layers, 20 hidden, float64) and its linear head."""
    lstm = torch.nn.LSTM(2, 20, num_layers=2, dtype=torch.float64)
    head = torch.nn.Linear(20, 1, dtype=torch.float64)
    with torch.no_grad():
        for k in range(2):
            getattr(lstm, f"weight_ih_l{k}").copy_(params[f"lstm{k}.weight_ih"])
            getattr(lstm, f"weight_hh_l{k}").copy_(params[f"lstm{k}.weight_hh"])
            getattr(lstm, f"bias_ih_l{k}").copy_(params[f"lstm{k}.bias"])
            getattr(lstm, f"bias_hh_l{k}").zero_().requires_grad_(False)  # one bias, as in params
        head.weight.copy_(params["out.weight"])
        head.bias.copy_(params["out.bias"])
    return lstm, head


def torch_lstm_grads(lstm: torch.nn.LSTM, head: torch.nn.Linear) -> dict[str, torch.Tensor]:
    grads = {}
    for k in range(2):
        grads[f"lstm{k}.weight_ih"] = getattr(lstm, f"weight_ih_l{k}").grad
        grads[f"lstm{k}.weight_hh"] = getattr(lstm, f"weight_hh_l{k}").grad
        grads[f"lstm{k}.bias"] = getattr(lstm, f"bias_ih_l{k}").grad
    grads["out.weight"], grads["out.bias"] = head.weight.grad, head.bias.grad
    return grads


def reference_meta_grad(params: dict[str, torch.Tensor], w: torch.Tensor, y: torch.Tensor, theta0: torch.Tensor, steps: int, truncation: int):
    """Hand-written truncated BPTT with torch.nn.LSTM and the analytic quadratic gradient 2 W^T (W theta - y)."""
    lstm, head = torch_lstm(params)
    n = theta0.numel()
    hc = (torch.zeros(2, n, 20, dtype=torch.float64), torch.zeros(2, n, 20, dtype=torch.float64))
    theta = theta0.clone()
    segment, total = 0.0, 0.0
    for t in range(steps):
        grad = 2 * torch.einsum("bji,bj->bi", w, torch.einsum("bij,bj->bi", w, theta) - y).detach()
        out, hc = lstm(preprocess(grad.reshape(1, -1)), hc)
        theta = theta + 0.1 * head(out[0]).reshape(theta.shape)
        segment = segment + (torch.einsum("bij,bj->bi", w, theta) - y).square().sum(-1).mean() / steps
        if (t + 1) % truncation == 0 or t + 1 == steps:
            segment.backward()
            total += segment.item()
            segment = 0.0
            theta = theta.detach()
            hc = (hc[0].detach(), hc[1].detach())
    return total, torch_lstm_grads(lstm, head)


def reference_per_truncation(params, w, y, theta0, steps: int, truncation: int, lr: float):
    """deepmind/learning-to-learn's loop written out: after each truncation's backward pass, an SGD step on the LSTM
    (``lr``); the next truncation goes on from the detached theta and LSTM state under the new weights. Returns each
    truncation's (mean loss, gradient)."""
    lstm, head = torch_lstm(params)
    n = theta0.numel()
    hc = (torch.zeros(2, n, 20, dtype=torch.float64), torch.zeros(2, n, 20, dtype=torch.float64))
    theta, out_ = theta0.clone(), []
    for start in range(0, steps, truncation):
        stop = min(start + truncation, steps)
        segment = 0.0
        for _ in range(start, stop):
            grad = 2 * torch.einsum("bji,bj->bi", w, torch.einsum("bij,bj->bi", w, theta) - y).detach()
            out, hc = lstm(preprocess(grad.reshape(1, -1)), hc)
            theta = theta + 0.1 * head(out[0]).reshape(theta.shape)
            segment = segment + (torch.einsum("bij,bj->bi", w, theta) - y).square().sum(-1).mean() / (stop - start)
        lstm.zero_grad()
        head.zero_grad()
        segment.backward()
        grads = {k: g.clone() for k, g in torch_lstm_grads(lstm, head).items()}
        out_.append((segment.item(), grads))
        with torch.no_grad():
            for parameter in [*lstm.parameters(), *head.parameters()]:
                if parameter.grad is not None:
                    parameter -= lr * parameter.grad
        theta, hc = theta.detach(), (hc[0].detach(), hc[1].detach())
    return out_


@pytest.mark.parametrize("truncation", [3, 4], ids=["trunc3-even", "trunc4-uneven"])
def test_truncations_with_the_carry_match_a_hand_written_per_truncation_unroll(truncation: int) -> None:
    """Two truncations of a 6-step trajectory, an SGD step on the LSTM between them, in float64."""
    learner = TruncatedL2L(Quadratic(), unroll=6, truncation=truncation, dtype=torch.float64)
    params = learner.init(3)
    episodes = quadratics(3, seed=4, dim=4)
    theta0 = learner.problem(episodes).theta0
    expected = reference_per_truncation(params, episodes.support_x, episodes.support_y, theta0, 6, truncation, lr=0.05)
    carry = learner.begin(episodes)
    assert int(carry["step"]) == 0 and not any(t.requires_grad for t in carry.values())
    for i, (loss, reference) in enumerate(expected):
        grads, metrics, carry = learner.truncation_grad(params, episodes, carry)
        assert metrics["loss"] == pytest.approx(loss, rel=1e-10), i
        for key in params:
            torch.testing.assert_close(grads[key], reference[key], rtol=1e-9, atol=1e-12)
        params = {k: v - 0.05 * grads[k] for k, v in params.items()}
        assert (carry is None) == (i == len(expected) - 1)
        if carry is not None:
            assert int(carry["step"]) == truncation and not any(t.requires_grad for t in carry.values())


def mlp_episodes() -> Episodes:
    x = torch.rand(2, 10, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 3, (2, 10), generator=torch.Generator().manual_seed(1))
    return Episodes(x, y, x, y)


@pytest.mark.parametrize(
    "optimizee, episodes",
    [(Quadratic(), lambda: quadratics(2, seed=5, dim=3)), (MLPClassifier(6, 3, (4,), batch_size=4), mlp_episodes)],
    ids=["quadratic", "mlp-minibatches"],
)
def test_truncations_under_fixed_weights_sum_to_the_trajectory_gradient(optimizee, episodes) -> None:
    """With no update between them, the truncations' gradients (each a segment mean) add up to meta_grad's; the
    MLP's mini-batch order, rebuilt from the episodes at every truncation, goes on where it stopped."""
    learner = TruncatedL2L(optimizee, unroll=7, truncation=3, dtype=torch.float64)
    params = learner.init(1)
    episodes = episodes()
    whole, metrics = L2L(optimizee, unroll=7, truncation=3, dtype=torch.float64).meta_grad(params, episodes)
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    carry, losses, lengths = learner.begin(episodes), [], [3, 3, 1]
    for length in lengths:
        grads, m, carry = learner.truncation_grad(params, episodes, carry)
        losses.append(m["loss"] * length / 7)
        total = {k: total[k] + grads[k] * length / 7 for k in total}
    assert carry is None and sum(losses) == pytest.approx(metrics["loss"], rel=1e-12)
    for key in params:
        torch.testing.assert_close(total[key], whole[key], rtol=1e-10, atol=1e-13)


def test_a_carry_outside_the_trajectory_is_refused() -> None:
    learner = TruncatedL2L(Quadratic(), unroll=4, truncation=2, dtype=torch.float64)
    episodes = quadratics(1, seed=0, dim=3)
    carry = learner.begin(episodes) | {"step": torch.tensor(4)}
    with pytest.raises(ValueError, match="carry at step 4, outside a trajectory of unroll=4"):
        learner.truncation_grad(learner.init(0), episodes, carry)


@pytest.mark.parametrize("truncation", [2, 3, 6], ids=["trunc2", "trunc3-uneven", "trunc6-full"])
def test_meta_grad_matches_hand_written_truncated_unroll(truncation: int) -> None:
    learner = L2L(Quadratic(), unroll=6, truncation=truncation, dtype=torch.float64)
    params = learner.init(3)
    episodes = quadratics(3, seed=4, dim=4)
    grads, metrics = learner.meta_grad(params, episodes)
    theta0 = Quadratic().problem(episodes.support_x, episodes.support_y, 6, episode_generator(episodes)).theta0
    total, expected = reference_meta_grad(params, episodes.support_x, episodes.support_y, theta0, 6, truncation)
    assert metrics["loss"] == pytest.approx(total, rel=1e-10)
    for key in params:
        torch.testing.assert_close(grads[key], expected[key], rtol=1e-9, atol=1e-12)


def test_truncation_at_least_unroll_equals_full_unroll_gradient() -> None:
    learner = L2L(Quadratic(), unroll=8, truncation=8, dtype=torch.float64)
    params = {k: v.requires_grad_() for k, v in learner.init(0).items()}
    episodes = quadratics(2, seed=1, dim=3)
    loss, _ = learner.meta_loss(params, episodes)
    full = torch.autograd.grad(loss, list(params.values()))
    truncated, _ = learner.meta_grad(params, episodes)
    longer, _ = L2L(Quadratic(), unroll=8, truncation=50, dtype=torch.float64).meta_grad(params, episodes)
    shorter, _ = L2L(Quadratic(), unroll=8, truncation=2, dtype=torch.float64).meta_grad(params, episodes)
    for key, g in zip(params, full):
        torch.testing.assert_close(truncated[key], g)
        torch.testing.assert_close(longer[key], g)
    assert any(not torch.allclose(shorter[k], g) for k, g in zip(params, full))


def test_checkpointing_gives_the_same_meta_gradient() -> None:
    episodes = quadratics(2, seed=2, dim=5)
    plain = L2L(Quadratic(), unroll=10, truncation=4, dtype=torch.float64)
    params = plain.init(5)
    expected, m1 = plain.meta_grad(params, episodes)
    got, m2 = L2L(Quadratic(), unroll=10, truncation=4, checkpoint=True, dtype=torch.float64).meta_grad(params, episodes)
    assert m1 == m2
    for key in params:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-14)


def test_meta_gradient_is_finite_and_reaches_every_parameter() -> None:
    learner = L2L(Quadratic(), unroll=20, truncation=5)
    params = learner.init(0)
    grads, metrics = learner.meta_grad(params, quadratics(4, seed=0, dtype=torch.float32))
    assert set(grads) == set(params)
    for key, g in grads.items():
        assert g.shape == params[key].shape and g.dtype == params[key].dtype
        assert torch.isfinite(g).all(), key
        assert g.abs().sum() > 0, key
    assert all(math.isfinite(v) for v in metrics.values())


def test_meta_loss_and_adapt_work_under_no_grad() -> None:
    learner = L2L(Quadratic(), unroll=4, truncation=2)
    params = learner.init(0)
    episode = quadratics(1, seed=0, dtype=torch.float32)
    with torch.no_grad():
        loss, metrics = learner.meta_loss(params, episode)
        prediction = learner.adapt(params, episode.support_x[0], episode.support_y[0])(episode.query_x[0])
    assert math.isfinite(loss.item()) and metrics["loss"] == loss.item()
    assert prediction.shape == (10,) and torch.isfinite(prediction).all()


def test_meta_loss_is_deterministic_in_the_episodes() -> None:
    learner = L2L(Quadratic(), unroll=5, truncation=5)
    params = learner.init(0)
    a, _ = learner.meta_loss(params, quadratics(2, seed=0, dtype=torch.float32))
    b, _ = learner.meta_loss(params, quadratics(2, seed=0, dtype=torch.float32))
    c, _ = learner.meta_loss(params, quadratics(2, seed=1, dtype=torch.float32))
    assert a.item() == b.item() and a.item() != c.item()


def test_meta_training_with_adam_beats_the_initial_lstm(one_thread: None) -> None:
    learner = L2L(Quadratic(), unroll=20, truncation=5)
    leaves = {k: v.requires_grad_() for k, v in learner.init(0).items()}
    adam = torch.optim.Adam(leaves.values(), lr=0.01)
    held_out = quadratics(50, seed=10_000, dtype=torch.float32)
    before, _ = learner.meta_loss({k: v.detach() for k, v in leaves.items()}, held_out)
    for step in range(100):
        grads, _ = learner.meta_grad({k: v.detach() for k, v in leaves.items()}, quadratics(8, seed=step, dtype=torch.float32))
        for k, v in leaves.items():
            v.grad = grads[k]
        adam.step()
    after, metrics = learner.meta_loss({k: v.detach() for k, v in leaves.items()}, held_out)
    assert after.item() < 0.25 * before.item()
    assert metrics["final_loss"] < 0.2 * metrics["initial_loss"]


def test_mlp_optimizee_matches_torch_modules() -> None:
    mlp = MLPClassifier(in_features=6, classes=3, hidden=(4, 5), activation="sigmoid", batch_size=8)
    x = torch.rand(2, 10, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 10))
    problem = mlp.problem(x, y, 3, torch.Generator().manual_seed(0))
    assert problem.theta0.shape == (2, mlp.size())
    theta = problem.theta0
    for task in range(2):
        layers, offset = [], 0
        for o, i in mlp.shapes:
            linear = torch.nn.Linear(i, o, dtype=torch.float64)
            with torch.no_grad():
                linear.weight.copy_(theta[task, offset : offset + o * i].reshape(o, i))
                linear.bias.copy_(theta[task, offset + o * i : offset + o * i + o])
            offset += o * i + o
            layers += [linear, torch.nn.Sigmoid()]
        net = torch.nn.Sequential(*layers[:-1])
        torch.testing.assert_close(mlp.logits(theta, x)[task], net(x[task]))
    losses = problem.loss(theta, 1)
    assert losses.shape == (2,) and torch.isfinite(losses).all()


def test_adapt_returns_a_predictor_of_the_optimized_problem() -> None:
    learner = L2L(Quadratic(), unroll=10, truncation=10, dtype=torch.float64)
    episode = quadratics(1, seed=3, dim=4)
    predict = learner.adapt(learner.init(0), episode.support_x[0], episode.support_y[0])
    assert predict(episode.support_x[0]).shape == (4,)


def run_config(**algorithm: object) -> dict:
    return {
        "task": {"name": "quadratic", "dim": 10},
        "store": {"path": "unused"},
        "algorithm": {"name": "l2l", **algorithm},
    }


def test_from_config_builds_the_learner_the_config_names() -> None:
    learner = build_learner(validate(run_config(unroll=40, truncation=10, checkpoint=True)))
    assert isinstance(learner, TruncatedL2L) and isinstance(learner, Truncated) and isinstance(learner.optimizee, Quadratic)
    assert (learner.unroll, learner.truncation, learner.checkpoint) == (40, 10, True)
    whole = build_learner(validate(run_config(update_per="trajectory")))
    assert type(whole) is L2L and not isinstance(whole, Truncated)
    with pytest.raises(ConfigError, match="update_per"):
        validate(run_config(update_per="epoch"))


def test_config_rejects_l2l_on_an_image_task() -> None:
    raw = run_config()
    raw["task"] = {"name": "omniglot"}
    with pytest.raises(ConfigError, match="algorithm.name: l2l meta-learns optimizee tasks; task.name='omniglot' is classification"):
        validate(raw)


@pytest.mark.parametrize("optimizee", [Quadratic(), MLPClassifier(in_features=4, classes=3, hidden=(5,), batch_size=2)])
def test_an_optimizees_problem_lives_on_its_episodes_device(optimizee) -> None:
    """The optimizee's start and mini-batch order are drawn on the CPU (the same on any device) and moved to the
    episodes' device, so a GPU worker's problem does not mix devices ("meta" stands in for the GPU here)."""
    if isinstance(optimizee, Quadratic):
        x, y = torch.randn(2, 3, 3), torch.randn(2, 3)
    else:
        x, y = torch.randn(2, 6, 4), torch.randint(0, 3, (2, 6))
    problem = optimizee.problem(x.to("meta"), y.to("meta"), steps=2, generator=torch.Generator().manual_seed(0))
    assert problem.theta0.device.type == "meta"
    assert problem.loss(problem.theta0, 1).device.type == "meta"
