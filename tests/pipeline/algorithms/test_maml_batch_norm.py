"""cbfinn/maml's batch-norm, as settings (float64): no BatchNorm scale (``model.norm_scale: false``) and the BatchNorm
offsets kept out of the inner loop (``algorithm.adapt_norm: false``), against its step written out by hand.

cbfinn/maml ``utils.py``: ``normalize`` is ``tf.contrib.layers.batch_norm(inp, activation_fn, reuse, scope)``, whose
defaults are ``center=True, scale=False`` (an offset ``beta``, no ``gamma``) and batch statistics. Those variables
live in the layer's scope, not in ``maml.py``'s ``weights`` dict, so the inner step
``tf.gradients(task_lossa, list(weights.values()))`` never moves them; the outer Adam trains every variable.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.algorithms.maml import LR_PREFIX, MAML
from pipeline.build import build_learner
from pipeline.config import load_config, validate
from pipeline.errors import ConfigError
from pipeline.nets.conv4 import Conv4
from pipeline.nets.module import ModuleNet
from tests.pipeline.algorithms.test_maml import leaf, tiny_images
from tests.pipeline.algorithms.test_maml_inner_loss import assert_matches_reference

SHOTS = 2  # tiny_images: labels [0, 1, 0, 1], 2-way 2-shot
CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def cbfinn_forward(weights: dict, beta: dict, x: torch.Tensor) -> torch.Tensor:
    """``forward_conv``: 4 x (strided 3x3 conv, batch_norm without scale: normalized + beta, ReLU), spatial mean, head."""
    for i in range(4):
        x = F.conv2d(x, weights[f"conv{i}.weight"], stride=2, padding=1)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        x = torch.relu((x - mean) / torch.sqrt(var + 1e-5) + beta[f"bn{i}.bias"][:, None, None])
    return x.mean(dim=(2, 3)) @ weights["head.weight"].T + weights["head.bias"]


def cbfinn_meta_loss(params: dict, episodes, lr: float, steps: int) -> torch.Tensor:
    """Mean query loss after ``steps`` of cbfinn's inner step (xent / K summed, second order) on ``weights`` only."""
    weights = {k: v for k, v in params.items() if not k.startswith("bn")}
    beta = {k: v for k, v in params.items() if k.startswith("bn")}
    losses = []
    for t in range(len(episodes)):
        fast = dict(weights)
        for _ in range(steps):
            out = cbfinn_forward(fast, beta, episodes.support_x[t])
            xent = F.cross_entropy(out, episodes.support_y[t], reduction="none") / SHOTS
            grads = torch.autograd.grad(xent.sum(), list(fast.values()), create_graph=True)
            fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads)}
        losses.append(F.cross_entropy(cbfinn_forward(fast, beta, episodes.query_x[t]), episodes.query_y[t]))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("batching", ["loop", "stacked", "vmap"])
def test_no_scale_and_no_inner_step_on_batch_norm_match_cbfinn(batching):
    net = Conv4(1, 8, 2, filters=3, norm_scale=False)
    maml = MAML(net, "cross_entropy", inner_lr=0.3, inner_steps=2, batching=batching, inner_loss_scale=2.0, adapt_norm=False)
    params = leaf(maml.init(1, torch.float64))
    assert not any(k.endswith(".weight") and k.startswith("bn") for k in params)  # no gamma
    gen = torch.Generator().manual_seed(0)  # offsets away from zero, so that they matter
    params = {k: (v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype)).detach().requires_grad_()
              if k.startswith("bn") else v for k, v in params.items()}
    episodes = tiny_images(3, seed=5)
    expected = cbfinn_meta_loss(params, episodes, 0.3, 2)
    grads = assert_matches_reference(maml, params, episodes, expected)
    assert all(g.abs().sum() > 0 for g in grads.values())  # the offsets are meta-learned
    adapted = MAML(net, "cross_entropy", inner_lr=0.3, inner_steps=2, batching=batching, inner_loss_scale=2.0)
    assert adapted.meta_loss(params, episodes)[0].item() != pytest.approx(expected.item(), abs=1e-6)


def test_adapt_norm_false_leaves_batch_norm_parameters_unadapted_and_without_meta_sgd_rates():
    maml = MAML(Conv4(1, 8, 2, filters=3), "cross_entropy", inner_lr=0.3, learn_inner_lr=True, adapt_norm=False)
    params = maml.init(0, torch.float64)
    assert {k for k in params if k.startswith(LR_PREFIX)} == {LR_PREFIX + k for k in ("conv0.weight", "conv1.weight",
                                                                                         "conv2.weight", "conv3.weight",
                                                                                         "head.weight", "head.bias")}
    module = ModuleNet("pipeline.nets.conv4_module:Conv4Module", {"in_channels": 1, "ways": 2, "filters": 3})
    assert module.batch_norm_names() == Conv4(1, 8, 2, filters=3).batch_norm_names()
    with pytest.raises(ValueError, match="match only BatchNorm parameters"):
        MAML(Conv4(1, 8, 2, filters=3), "cross_entropy", inner_lr=0.3, adapt_params=("bn*",), adapt_norm=False)


def omniglot(**algorithm) -> dict:
    return {"task": {"name": "omniglot", "ways": 2, "image_size": 16}, "store": {"path": "unused"},
            "model": {"network": "conv4", "filters": 3}, "algorithm": {"name": "maml", **algorithm}}


def test_the_settings_reach_the_learner_with_cbfinns_defaults_and_the_quickstart_pins_the_old_ones():
    default = build_learner(validate(omniglot()))
    assert default.adapt_norm is False and default.network.norm_scale is True
    paper = build_learner(load_config(CONFIGS / "omniglot_maml_5w1s.yaml"))
    assert paper.adapt_norm is False and paper.network.norm_scale is False
    quickstart = build_learner(load_config(CONFIGS / "quickstart.yaml"))
    assert quickstart.adapt_norm is True and quickstart.network.norm_scale is True
    with pytest.raises(ConfigError, match=r"algorithm\.adapt_params: \['bn\*'\] match only BatchNorm parameters, and algorithm\.adapt_norm: false"):
        validate(omniglot(adapt_params=["bn*"]))
    assert validate(omniglot(adapt_params=["bn*"], adapt_norm=True)).algorithm.adapt_norm
