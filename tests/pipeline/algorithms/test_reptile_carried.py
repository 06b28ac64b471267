"""Reptile with its inner Adam carried from task to task (openai/supervised-reptile), against Adam written out by hand:
in meta-training, and in evaluation from the carried state (openai's ``Reptile.evaluate``)."""
from __future__ import annotations

import copy

import pytest
import torch

from pipeline.algorithms.reptile import CarriedReptile, Reptile
from pipeline.nets.mlp import MLP
from pipeline.optim.adam import AdamState
from pipeline.runtime import checkpoint
from pipeline.runtime.server import ServerState
from pipeline.types import CarriedEvaluation, Truncated
from tests.pipeline.algorithms.test_maml import CASES, sinusoids, tiny_images

DT = torch.float64
LR, BETA2, EPS = 0.01, 0.999, 1e-8
EPS_ROOT = 1e-16  # pipeline.optim.adam's, inside the root (moves an update by at most ~1e-9 here)


class HandAdam:
    """openai's inner loop by hand: one Adam (beta1 = 0, as models.py's) whose moments and step count persist
    while the model's weights are reset to theta for every task (reptile.py ``train_step``)."""

    def __init__(self, params: dict) -> None:
        self.step = 0
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}

    def adapt(self, theta: dict, batches: list[tuple[torch.Tensor, torch.Tensor]], forward, loss_fn) -> dict:
        fast = {k: v.detach().clone() for k, v in theta.items()}
        for x, y in batches:
            fast = {k: v.requires_grad_() for k, v in fast.items()}
            grads = dict(zip(fast, torch.autograd.grad(loss_fn(forward(fast, x), y), list(fast.values()))))
            self.step += 1
            new = {}
            for k, g in grads.items():
                self.m[k] = 0.0 * self.m[k] + (1 - 0.0) * g
                self.v[k] = BETA2 * self.v[k] + (1 - BETA2) * g * g
                m_hat = self.m[k] / (1 - 0.0**self.step)
                v_hat = self.v[k] / (1 - BETA2**self.step)
                new[k] = fast[k].detach() - LR * m_hat / ((v_hat + EPS_ROOT).sqrt() + EPS)
            fast = new
        return fast


def learner(case: str, **kwargs) -> CarriedReptile:
    net, loss, *_ = CASES[case]
    return CarriedReptile(net, loss, inner_lr=LR, inner_steps=3, inner_optimizer="adam", **kwargs)


@pytest.mark.parametrize("case, inner_batch", [("mlp", None), ("mlp", 2), ("conv4", None)], ids=["mlp", "mlp-minibatches", "conv4"])
def test_two_server_steps_carry_the_inner_adam_through_every_task_in_order(case, inner_batch):
    """Three tasks per server step, two steps: the hand-written Adam runs through all six tasks; each step's direction,
    and the carry after it, equal it."""
    _, _, forward, episodes_of, loss_fn, _ = CASES[case]
    reptile = learner(case, inner_batch=inner_batch)
    theta = reptile.init(0, DT)
    steps = [episodes_of(), sinusoids(3, 5, seed=1) if case == "mlp" else tiny_images(3, seed=1)]
    hand = HandAdam(theta)
    carry = reptile.begin(steps[0])
    for episodes in steps:
        order = reptile.minibatches(episodes, episodes.support_x.shape[1])
        fasts = []
        for t in range(len(episodes)):
            x, y = episodes.support_x[t], episodes.support_y[t]
            batches = [(x, y)] * 3 if order is None else [(x[i], y[i]) for i in order[:, t]]
            fasts.append(hand.adapt(theta, batches, forward, loss_fn))
        grads, metrics, carry = reptile.truncation_grad(theta, episodes, carry)
        for k in theta:
            assert torch.allclose(grads[k], theta[k] - torch.stack([f[k] for f in fasts]).mean(0), atol=1e-12, rtol=0), k
        assert int(carry["step"]) == hand.step and metrics["loss"] > 0
        for k in theta:
            assert torch.allclose(carry[f"exp_avg.{k}"], hand.m[k], atol=1e-14, rtol=0), k
            assert torch.allclose(carry[f"exp_avg_sq.{k}"], hand.v[k], atol=1e-14, rtol=0), k
        theta = {k: v - 0.5 * grads[k] for k, v in theta.items()}
    assert hand.step == 18


def test_the_carry_changes_the_direction_and_meta_grad_takes_each_task_fresh():
    """Task 2 starts from task 1's moments: the carried direction differs from the per-task one, which meta_grad gives."""
    episodes = sinusoids(3, 5, seed=0)
    carried, fresh = learner("mlp"), Reptile(MLP((1, 40, 40, 1)), "mse", inner_lr=LR, inner_steps=3, inner_optimizer="adam")
    theta = carried.init(0, DT)
    begun = carried.begin(episodes)
    assert int(begun["step"]) == 0 and all(not v.any() for v in begun.values())
    per_task, _ = fresh.meta_grad(theta, episodes)
    same, _ = carried.meta_grad(theta, episodes)
    one, _, _ = carried.truncation_grad(theta, episodes[:1], begun)
    along, _, _ = carried.truncation_grad(theta, episodes, begun)
    for k in theta:
        assert torch.equal(same[k], per_task[k])
    assert torch.allclose(one["layer0.weight"], fresh.meta_grad(theta, episodes[:1])[0]["layer0.weight"], atol=1e-14)
    assert not torch.allclose(along["layer0.weight"], per_task["layer0.weight"], atol=1e-6)
    assert isinstance(carried, Truncated) and not carried.keeps_episodes and not isinstance(fresh, Truncated)


def test_anil_carries_the_state_of_the_adapted_parameters_only():
    reptile = learner("conv4", adapt_params=("head.*",))
    episodes = tiny_images(3, seed=0)
    _, _, carry = reptile.truncation_grad(reptile.init(0, DT), episodes, reptile.begin(episodes))
    assert set(carry) == {"step", "exp_avg.head.weight", "exp_avg.head.bias", "exp_avg_sq.head.weight", "exp_avg_sq.head.bias"}
    assert int(carry["step"]) == 9


def test_a_foreign_carry_and_sgd_are_refused_naming_what_is_wrong():
    reptile = learner("mlp")
    episodes = sinusoids(2, 5, seed=0)
    carry = reptile.begin(episodes)
    del carry["exp_avg.layer2.bias"]
    with pytest.raises(ValueError, match=r"missing \['exp_avg\.layer2\.bias'\], unexpected \['exp_avg\.head\.bias'\]"):
        reptile.truncation_grad(reptile.init(0, DT), episodes, carry | {"exp_avg.head.bias": torch.zeros(1)})
    with pytest.raises(ValueError, match="inner_optimizer 'adam'.*'sgd'"):
        CarriedReptile(MLP(), "mse", 0.1)


def test_a_carry_through_a_checkpoint_gives_the_same_next_step(tmp_path):
    """The carry after one step, saved in a worker's position and loaded, continues exactly as the one in memory."""
    reptile = learner("conv4")
    first, second = tiny_images(3, seed=0), tiny_images(3, seed=1)
    theta = reptile.init(0, DT)
    _, _, carry = reptile.truncation_grad(theta, first, reptile.begin(first))
    server = ServerState(torch.zeros(3), AdamState(0, torch.zeros(3), torch.zeros(3)), version=0)
    saved = checkpoint.Checkpoint(server, [{"reader": {"episodes": 3}, "carry": carry}], None, {})
    back = checkpoint.load(checkpoint.save(tmp_path / "c", saved)).positions[0]
    assert back["reader"] == {"episodes": 3} and set(back["carry"]) == set(carry)
    expected, _, after = reptile.truncation_grad(theta, second, carry)
    got, _, after_loaded = reptile.truncation_grad(theta, second, back["carry"])
    for k in theta:
        assert torch.equal(got[k], expected[k]), k
    assert all(torch.equal(after_loaded[k], after[k]) for k in after)



def trained(case: str, **kwargs) -> tuple[CarriedReptile, dict, HandAdam, dict]:
    """A CarriedReptile (4 evaluation steps) after one server step of three tasks, the hand-written Adam carried
    through the same tasks, and the learner's carry: what meta-test starts from."""
    _, _, forward, episodes_of, loss_fn, _ = CASES[case]
    reptile = learner(case, eval_inner_steps=4, **kwargs)
    theta = reptile.init(0, DT)
    episodes = episodes_of()
    hand = HandAdam(theta)
    for t in range(len(episodes)):
        hand.adapt(theta, [(episodes.support_x[t], episodes.support_y[t])] * 3, forward, loss_fn)
    _, _, carry = reptile.truncation_grad(theta, episodes, reptile.begin(episodes))
    return reptile, theta, hand, carry


@pytest.mark.parametrize("case", ["mlp", "conv4", "conv4-support-norm"])
def test_evaluation_from_the_carried_state_matches_an_adam_restored_before_every_test_task(case):
    """openai's evaluate by hand: the carried Adam copied before each test task (so every task starts from the
    training's moments and step count), 4 full-batch steps on its support set, then its queries."""
    _, loss_kind, forward, _, loss_fn, query = CASES[case]
    reptile, theta, hand, carry = trained(case)
    test = sinusoids(3, 5, seed=7) if case == "mlp" else tiny_images(3, seed=7)
    kept = {k: v.clone() for k, v in carry.items()}
    start = reptile.eval_start(carry)
    got = reptile.evaluate(theta, test, state=start)
    for t in range(len(test)):
        sx, sy, qx, qy = test.support_x[t], test.support_y[t], test.query_x[t], test.query_y[t]
        restored = copy.deepcopy(hand)
        fast = restored.adapt(theta, [(sx, sy)] * 4, forward, loss_fn)
        assert restored.step == hand.step + 4
        out = query(fast, sx, qx)
        assert torch.allclose(got["loss"][t], loss_fn(out, qy), atol=1e-12, rtol=0), t
        if loss_kind == "cross_entropy":
            assert got["accuracy"][t] == (out.argmax(-1) == qy).double().mean()
        predicted = reptile.adapt(theta, sx, sy, state=start)(qx)
        assert torch.allclose(predicted, out, atol=1e-12, rtol=0), t
    assert all(torch.equal(carry[k], kept[k]) for k in kept)  # no test task changed the state


def test_test_tasks_leave_the_state_alone_so_their_order_does_not_matter():
    reptile, theta, _, carry = trained("conv4")
    test = tiny_images(4, seed=3)
    forward = reptile.evaluate(theta, test, state=carry)
    backward = reptile.evaluate(theta, test[[3, 2, 1, 0]], state=carry)
    one_by_one = [reptile.evaluate(theta, test[t : t + 1], state=carry)["loss"] for t in range(4)]
    assert torch.allclose(backward["loss"].flip(0), forward["loss"], atol=1e-12, rtol=0)
    assert torch.allclose(torch.cat(one_by_one), forward["loss"], atol=1e-12, rtol=0)


def test_fresh_and_carried_evaluation_differ_and_the_setting_says_which_start():
    reptile, theta, _, carry = trained("mlp")
    test = sinusoids(3, 5, seed=7)
    fresh = reptile.evaluate(theta, test)
    assert (reptile.evaluate(theta, test, state=carry)["loss"] - fresh["loss"]).abs().min() > 1e-6
    assert reptile.eval_start(carry) is carry and reptile.eval_start(None) is None  # no step taken yet: fresh
    assert learner("mlp", eval_state="fresh").eval_start(carry) is None
    assert isinstance(reptile, CarriedEvaluation) and not isinstance(Reptile(MLP(), "mse", 0.1), CarriedEvaluation)


def test_a_foreign_start_state_and_a_state_without_adam_are_refused():
    reptile, _, _, carry = trained("mlp")
    with pytest.raises(ValueError, match=r"missing \['exp_avg.layer0.weight'\]"):
        reptile.eval_start({k: v for k, v in carry.items() if k != "exp_avg.layer0.weight"})
    sgd = Reptile(MLP((1, 40, 40, 1)), "mse", 0.1)
    with pytest.raises(ValueError, match="inner_optimizer is 'sgd'"):
        sgd.evaluate(sgd.init(0, DT), sinusoids(2, 5, seed=0), state=carry)
    with pytest.raises(ValueError, match="eval_state must be 'fresh' or 'carried'"):
        learner("mlp", eval_state="copied")


def test_a_state_of_other_layer_sizes_is_refused_naming_the_shapes():
    """An MLP of other hidden sizes has the same parameter names: the shapes tell its state apart, at ``eval_start``
    (before any task) and in ``evaluate``, ``adapt`` and ``truncation_grad``."""
    reptile, theta, _, _ = trained("mlp")
    other = CarriedReptile(MLP((1, 8, 8, 1)), "mse", inner_lr=LR, inner_steps=3, inner_optimizer="adam")
    episodes = sinusoids(2, 5, seed=0)
    theirs = other.begin(episodes)
    assert set(theirs) == set(reptile.begin(episodes))  # the same names
    shapes = r"the carry's shapes differ .*exp_avg.layer0.weight \(8, 1\) \(expected \(40, 1\)\)"
    with pytest.raises(ValueError, match=shapes):
        reptile.eval_start(theirs)
    with pytest.raises(ValueError, match=shapes):
        reptile.evaluate(theta, episodes, state=theirs)
    with pytest.raises(ValueError, match=shapes):
        reptile.adapt(theta, episodes.support_x[0], episodes.support_y[0], theirs)
    with pytest.raises(ValueError, match=shapes):
        reptile.truncation_grad(theta, episodes, theirs)
