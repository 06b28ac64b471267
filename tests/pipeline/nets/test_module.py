"""Any nn.Module through functional_call: the Conv4 module equals the hand-written Conv4 (float64), bad factories are named."""
from __future__ import annotations

import pytest
import torch

from pipeline.algorithms.maml import LR_PREFIX, MAML, adapt_tasks
from pipeline.algorithms.reptile import Reptile
from pipeline.nets.conv4 import Conv4
from pipeline.nets.module import ModuleNet, build_module
from pipeline.optim.sgd import sgd
from tests.pipeline.algorithms.test_maml import tiny_images

DT = torch.float64
CONV4 = "pipeline.nets.conv4_module:Conv4Module"
USER = "tests.pipeline.nets.user_module:ResidualGroupNormNet"


def conv4_pair(norm: str = "transductive") -> tuple[Conv4, ModuleNet]:
    return Conv4(1, 8, 2, filters=3, norm=norm), ModuleNet(CONV4, {"in_channels": 1, "ways": 2, "filters": 3}, norm)


def learners(name: str, steps: int, batching: str) -> tuple:
    """The same algorithm over the hand-written Conv4 (stacked, the fast path) and the Conv4 module (``batching``)."""
    def make(network, how):
        if name == "reptile":
            return Reptile(network, "cross_entropy", inner_lr=0.1, inner_steps=steps, batching="loop" if how == "vmap" else how)
        return MAML(network, "cross_entropy", inner_lr=0.1, inner_steps=steps, batching=how,
                    first_order=name == "fomaml", learn_inner_lr=name == "meta-sgd")
    hand, module = conv4_pair()
    return make(hand, "stacked"), make(module, batching)


def leaf(params: dict) -> dict:
    return {k: v.detach().clone().requires_grad_() for k, v in params.items()}


CASES = [(name, steps, "loop") for name in ("maml", "fomaml", "meta-sgd", "reptile") for steps in (1, 2, 3)]
CASES += [("maml", 2, "vmap"), ("meta-sgd", 2, "vmap"), ("maml", 2, "stacked")]


@pytest.mark.parametrize("name, steps, batching", CASES, ids=[f"{n}-{s}-{b}" for n, s, b in CASES])
def test_the_conv4_module_equals_the_hand_written_conv4(name, steps, batching):
    hand, module = learners(name, steps, batching)
    params = leaf(hand.init(0, DT))
    assert list(module.network.init(0, DT)) == [k for k in params if not k.startswith(LR_PREFIX)]
    episodes = tiny_images(3, seed=0)
    if name == "reptile":
        expected, got = hand.meta_grad(params, episodes)[0], module.meta_grad(params, episodes)[0]
        for k in params:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)
        return
    loss, metrics = hand.meta_loss(params, episodes)
    module_loss, module_metrics = module.meta_loss(params, episodes)
    assert module_loss.item() == pytest.approx(loss.item(), abs=1e-10)
    assert module_metrics["support_loss"] == pytest.approx(metrics["support_loss"], abs=1e-10)
    expected, got = hand.meta_grad(params, episodes)[0], module.meta_grad(params, episodes)[0]
    assert list(got) == list(params)
    for k in params:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)
    assert all(expected[k].abs().max() > 1e-6 for k in ("conv0.weight", "head.weight"))
    net = {k: v for k, v in params.items() if not k.startswith(LR_PREFIX)}
    for network in (hand, module):  # the adapted weights
        fast, _ = adapt_tasks(network.network, "cross_entropy", sgd(0.1), net, episodes.support_x, episodes.support_y, steps, True)
        if network is hand:
            reference = fast
    for k in net:
        torch.testing.assert_close(fast[k], reference[k], rtol=0, atol=1e-10)


def test_support_norm_through_the_module_equals_the_hand_written_one_and_is_per_query():
    hand, module = (MAML(n, "cross_entropy", inner_lr=0.4, inner_steps=2) for n in conv4_pair("support"))
    params = hand.init(0, DT)
    episodes = tiny_images(1, seed=3)
    sx, sy, qx = episodes.support_x[0], episodes.support_y[0], episodes.query_x[0] * 3
    predict = module.adapt(params, sx, sy)
    batched = predict(qx)
    torch.testing.assert_close(batched, hand.adapt(params, sx, sy)(qx), rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat([predict(qx[i : i + 1]) for i in range(len(qx))]), batched, rtol=0, atol=1e-10)


def test_a_user_module_meta_learns_with_every_batching():
    network = ModuleNet(USER, {"in_channels": 1, "ways": 2, "width": 4})
    params = leaf(network.init(0, DT))
    assert any(k.startswith("block.") for k in params)  # names are the module's own
    episodes = tiny_images(2, seed=1)
    grads = {b: MAML(network, "cross_entropy", inner_lr=0.1, inner_steps=2, batching=b).meta_grad(params, episodes)[0]
             for b in ("loop", "vmap", "stacked")}
    for k in params:
        torch.testing.assert_close(grads["vmap"][k], grads["loop"][k], rtol=0, atol=1e-10)
        torch.testing.assert_close(grads["stacked"][k], grads["loop"][k], rtol=0, atol=1e-10)
    assert torch.equal(network.init(5)["classifier.weight"], network.init(5)["classifier.weight"])
    assert not torch.equal(network.init(5)["classifier.weight"], network.init(6)["classifier.weight"])


@pytest.mark.parametrize(
    "factory, kwargs, message",
    [
        ("no_colon", {}, "expected 'package.module:callable'"),
        ("tests.pipeline.nets.missing:Net", {}, "cannot import 'tests.pipeline.nets.missing'"),
        ("tests.pipeline.nets.user_module:Missing", {}, "has no attribute 'Missing'"),
        ("tests.pipeline.nets.user_module:torch", {}, "'torch' is not callable"),
        (USER, {"in_channels": 1}, "raised TypeError"),
        ("builtins:dict", {}, "returned a dict, not a torch.nn.Module"),
        ("torch.nn:ReLU", {}, "returned a module without parameters"),
    ],
    ids=["malformed", "import-fails", "no-attribute", "not-callable", "call-fails", "not-a-module", "no-parameters"],
)
def test_a_bad_factory_is_named(factory, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message) as error:
        build_module(factory, kwargs)
    assert repr(factory) in str(error.value)
