"""Reptile with its inner Adam carried from task to task (openai/supervised-reptile), against Adam written out by hand."""
from __future__ import annotations

import pytest
import torch

from pipeline.algorithms.reptile import CarriedReptile, Reptile
from pipeline.nets.mlp import MLP
from pipeline.optim.adam import AdamState
from pipeline.runtime import checkpoint
from pipeline.runtime.server import ServerState
from pipeline.types import Truncated
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

