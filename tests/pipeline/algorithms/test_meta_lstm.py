"""The Meta-learner LSTM: the gradient-descent identity, gates at initialization, per-episode BatchNorm,
and the authors' code's settings (gate fed back before the sigmoid, gradient over the batch, running statistics)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.algorithms.meta_lstm import INIT, MetaLSTM, plot_gates
from pipeline.build import build_learner
from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.nets import lstm
from pipeline.nets.conv4 import Conv4
from pipeline.nets.module import ModuleNet
from tasks.episodes import Episodes
from tests.pipeline.algorithms.adapted_alone import adapted_alone

NET = Conv4(in_channels=1, image_size=8, ways=3, filters=4)


def episodes(count: int, seed: int, dtype: torch.dtype = torch.float64) -> Episodes:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(2).expand(count, -1)
    return Episodes(
        torch.rand(count, 6, 1, 8, 8, generator=gen, dtype=dtype),
        labels.clone(),
        torch.rand(count, 6, 1, 8, 8, generator=gen, dtype=dtype),
        labels.clone(),
    )


def gradient_descent_gates(params: dict[str, torch.Tensor], lr: float) -> dict[str, torch.Tensor]:
    """f = sigmoid(40) == 1.0 exactly in float64, i = sigmoid(logit(lr)) == lr (to one ulp)."""
    params = dict(params)
    params["metalstm.WF"] = torch.zeros_like(params["metalstm.WF"])
    params["metalstm.WI"] = torch.zeros_like(params["metalstm.WI"])
    params["metalstm.bF"] = torch.full_like(params["metalstm.bF"], 40.0)
    params["metalstm.bI"] = torch.full_like(params["metalstm.bI"], math.log(lr / (1 - lr)))
    return params


@pytest.mark.parametrize("grad_over_batch", [True, False], ids=["over-batch", "mean-loss"])
def test_forget_one_and_input_lr_is_exactly_gradient_descent(grad_over_batch: bool) -> None:
    learner = MetaLSTM(NET, inner_steps=3, grad_over_batch=grad_over_batch, eval_norm="batch", dtype=torch.float64)
    lr = 0.1
    params = gradient_descent_gates(learner.init(0), lr)
    batch = episodes(1, seed=1)
    fast, trace, _ = learner.learn(params, batch.support_x, batch.support_y, 3)
    assert torch.all(trace.forget == 1.0)
    torch.testing.assert_close(trace.input, torch.full_like(trace.input, lr), rtol=1e-15, atol=0)

    # the authors' feval: gradient of the size-averaged loss, divided by the batch size (6 here) once more
    step = lr / 6 if grad_over_batch else lr
    theta = {k[len(INIT) :]: v.clone().requires_grad_() for k, v in params.items() if k.startswith(INIT)}
    for _ in range(3):
        loss = F.cross_entropy(NET.apply(theta, batch.support_x[0]), batch.support_y[0])
        grads = torch.autograd.grad(loss, list(theta.values()))
        theta = {k: (v - step * g).detach().requires_grad_() for (k, v), g in zip(theta.items(), grads)}
    for key, value in theta.items():
        torch.testing.assert_close(fast[key][0], value.detach(), rtol=1e-12, atol=1e-14)

    # inputs are detached, so d theta_T / d theta_0 = I: the init's meta-gradient is first-order MAML's
    meta, _ = learner.meta_grad(params, batch)
    query_loss = F.cross_entropy(NET.apply(theta, batch.query_x[0]), batch.query_y[0])
    expected = torch.autograd.grad(query_loss, list(theta.values()))
    for key, g in zip(theta, expected):
        torch.testing.assert_close(meta[INIT + key], g, rtol=1e-10, atol=1e-13)


def test_training_starts_like_gradient_descent_with_a_small_step() -> None:
    learner = MetaLSTM(NET, inner_steps=4)
    _, metrics = learner.meta_loss(learner.init(0), episodes(2, seed=0, dtype=torch.float32))
    assert metrics["forget_gate"] > 0.98
    assert metrics["input_gate"] < 0.02


def test_meta_gradient_is_finite_and_reaches_every_parameter() -> None:
    learner = MetaLSTM(NET, inner_steps=3)
    params = learner.init(1)
    grads, metrics = learner.meta_grad(params, episodes(2, seed=3, dtype=torch.float32))
    assert set(grads) == set(params)
    for key, g in grads.items():
        assert g.shape == params[key].shape
        assert torch.isfinite(g).all(), key
        assert g.abs().sum() > 0, key
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_each_episode_uses_its_own_batch_statistics() -> None:
    learner = MetaLSTM(NET, inner_steps=2, dtype=torch.float64)
    params = learner.init(2)
    batch = episodes(3, seed=4)
    together, _, _ = learner.learn(params, batch.support_x, batch.support_y, 2)
    alone, _, _ = learner.learn(params, batch.support_x[1:2], batch.support_y[1:2], 2)
    for key in alone:
        torch.testing.assert_close(together[key][1], alone[key][0])


def test_adapt_predicts_with_the_learned_parameters() -> None:
    learner = MetaLSTM(NET, inner_steps=2, eval_inner_steps=3, eval_norm="batch", dtype=torch.float64)
    params = learner.init(0)
    batch = episodes(1, seed=5)
    logits = learner.adapt(params, batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    fast, _, _ = learner.learn(params, batch.support_x, batch.support_y, 3)
    torch.testing.assert_close(logits, NET.apply({k: v[0] for k, v in fast.items()}, batch.query_x[0]))
    trace = learner.gate_trace(params, batch.support_x[0], batch.support_y[0])
    assert trace.forget.shape == trace.input.shape == (3, sum(v.numel() for k, v in params.items() if k.startswith(INIT)))
    figure = plot_gates(trace)
    assert [ax.get_title() for ax in figure.axes] == ["forget gate", "input gate"]


def reference_gate_unroll(
    params: dict[str, torch.Tensor], batch: Episodes, steps: int, pre_sigmoid: bool
) -> dict[str, torch.Tensor]:
    """twitter/meta-learning-lstm's loop written out for one episode: feval's gradient (mean loss, divided by the
    batch size), preprocess, the first LSTM, then lstm-helper.lua's cell with fP = fS[s-1] (the pre-sigmoid value)."""
    keys = [k[len(INIT) :] for k in params if k.startswith(INIT)]
    theta = torch.cat([params[INIT + k].reshape(-1) for k in keys])
    h = theta.new_zeros(theta.numel(), 20)
    c = torch.zeros_like(h)
    f_prev = i_prev = theta.new_zeros(theta.numel())
    for _ in range(steps):
        leaf = theta.detach().requires_grad_()
        split = dict(zip(keys, (p.reshape(params[INIT + k].shape) for k, p in zip(keys, leaf.split([params[INIT + k].numel() for k in keys])))))
        loss = F.cross_entropy(NET.apply(split, batch.support_x[0]), batch.support_y[0])
        (grad,) = torch.autograd.grad(loss, leaf)
        grad = grad / batch.support_y.shape[1]
        x = torch.cat([lstm.preprocess(loss.detach().expand_as(grad), 10.0), lstm.preprocess(grad, 10.0)], dim=1)
        h, c = lstm.cell(x, h, c, params["lstm.weight_ih"], params["lstm.weight_hh"], params["lstm.bias"])
        a_f = h @ params["metalstm.WF"][:20] + theta * params["metalstm.WF"][20] + f_prev * params["metalstm.WF"][21] + params["metalstm.bF"]
        a_i = h @ params["metalstm.WI"][:20] + theta * params["metalstm.WI"][20] + i_prev * params["metalstm.WI"][21] + params["metalstm.bI"]
        theta = torch.sigmoid(a_f) * theta - torch.sigmoid(a_i) * grad
        f_prev, i_prev = (a_f, a_i) if pre_sigmoid else (torch.sigmoid(a_f), torch.sigmoid(a_i))
    return dict(zip(keys, theta.split([params[INIT + k].numel() for k in keys])))


@pytest.mark.parametrize("gate_input", ["pre_sigmoid", "post_sigmoid"])
def test_the_previous_gate_is_fed_back_as_the_setting_says(gate_input: str) -> None:
    learner = MetaLSTM(NET, inner_steps=3, gate_input=gate_input, dtype=torch.float64)
    params = learner.init(3)
    # gate weights large enough for the fed-back gate to matter
    params["metalstm.WF"] = params["metalstm.WF"] * 100
    params["metalstm.WI"] = params["metalstm.WI"] * 100
    batch = episodes(1, seed=7)
    fast, _, _ = learner.learn(params, batch.support_x, batch.support_y, 3)
    for pre_sigmoid in (True, False):
        expected = reference_gate_unroll(params, batch, 3, pre_sigmoid)
        matches = all(torch.allclose(fast[k][0].reshape(-1), v, rtol=1e-10, atol=1e-13) for k, v in expected.items())
        assert matches == (pre_sigmoid == (gate_input == "pre_sigmoid"))


def reference_running_logits(params: dict[str, torch.Tensor], fast_by_step: list[dict[str, torch.Tensor]],
                             batch: Episodes, momentum: float) -> torch.Tensor:
    """torch7's BatchNorm through torch's own F.batch_norm: buffers reset to 0 and 1, one training pass on the
    support set per learner step (new = (1 - m) old + m batch, unbiased variance), then evaluate mode on the queries."""
    buffers = [(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)) for _ in range(4)]

    def forward(theta: dict[str, torch.Tensor], x: torch.Tensor, training: bool) -> torch.Tensor:
        for i in range(4):
            x = F.conv2d(x, theta[f"conv{i}.weight"], stride=2, padding=1)
            x = F.batch_norm(x, *buffers[i], theta[f"bn{i}.weight"], theta[f"bn{i}.bias"], training, momentum, NET.eps)
            x = F.relu(x)
        return F.linear(x.mean(dim=(2, 3)), theta["head.weight"], theta["head.bias"])

    for theta in fast_by_step[:-1]:
        forward(theta, batch.support_x[0], True)
    return forward(fast_by_step[-1], batch.query_x[0], False)


def test_meta_test_queries_use_the_running_statistics_of_the_support_passes() -> None:
    learner = MetaLSTM(NET, inner_steps=3, dtype=torch.float64)
    params = learner.init(4)
    batch = episodes(1, seed=8)
    logits = learner.adapt(params, batch.support_x[0], batch.support_y[0])(batch.query_x[0])
    start = {k[len(INIT) :]: v for k, v in params.items() if k.startswith(INIT)}
    by_step = [start] + [{k: v[0] for k, v in learner.learn(params, batch.support_x, batch.support_y, s)[0].items()}
                         for s in (1, 2, 3)]
    torch.testing.assert_close(logits, reference_running_logits(params, by_step, batch, 0.9), rtol=1e-10, atol=1e-12)
    # each query alone gets the logits it gets in the batch; with eval_norm="batch" it does not
    predict = learner.adapt(params, batch.support_x[0], batch.support_y[0])
    torch.testing.assert_close(predict(batch.query_x[0, :1]), logits[:1])
    transductive = MetaLSTM(NET, inner_steps=3, eval_norm="batch", dtype=torch.float64).adapt(
        params, batch.support_x[0], batch.support_y[0])
    assert not torch.allclose(transductive(batch.query_x[0, :1]), transductive(batch.query_x[0])[:1])


@pytest.mark.parametrize("eval_norm, norm", [("running", "transductive"), ("batch", "transductive"), ("batch", "support")])
def test_batched_meta_test_equals_adapting_each_episode_alone(eval_norm: str, norm: str) -> None:
    from pipeline.evaluation import scores
    from pipeline.types import BatchedEvaluation

    learner = MetaLSTM(Conv4(in_channels=1, image_size=8, ways=3, filters=4, norm=norm), inner_steps=2,
                       eval_inner_steps=3, eval_norm=eval_norm, dtype=torch.float64)
    params, batch = learner.init(4), episodes(5, seed=9)
    metrics, alone = learner.evaluate(params, batch, chunk=2), adapted_alone(learner, params, batch)  # chunks 2, 2, 1
    torch.testing.assert_close(metrics["loss"], alone["loss"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["accuracy"], alone["accuracy"])
    assert 0 < metrics["loss"].min() and len(set(metrics["loss"].tolist())) == 5  # five different episodes
    assert isinstance(learner, BatchedEvaluation) and scores(learner, params, batch) == metrics["accuracy"].tolist()


def test_meta_test_takes_one_episode_per_pass_on_a_cpu_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    learner, sizes = MetaLSTM(NET, inner_steps=1, dtype=torch.float64), []
    learned = MetaLSTM._learned

    def recorded(self, params, support_x, support_y):
        sizes.append(len(support_x))
        return learned(self, params, support_x, support_y)

    monkeypatch.setattr(MetaLSTM, "_learned", recorded)
    learner.evaluate(learner.init(0), episodes(3, seed=1))
    learner.evaluate(learner.init(0), episodes(3, seed=1), chunk=2)
    assert sizes == [1, 1, 1, 2, 1]


def test_a_few_meta_steps_lower_the_meta_loss() -> None:
    learner = MetaLSTM(NET, inner_steps=3)
    leaves = {k: v.requires_grad_() for k, v in learner.init(0).items()}
    adam = torch.optim.Adam(leaves.values(), lr=0.01)
    batch = episodes(4, seed=6, dtype=torch.float32)
    first, _ = learner.meta_loss({k: v.detach() for k, v in leaves.items()}, batch)
    for _ in range(15):
        grads, _ = learner.meta_grad({k: v.detach() for k, v in leaves.items()}, batch)
        for k, v in leaves.items():
            v.grad = grads[k]
        adam.step()
    last, _ = learner.meta_loss({k: v.detach() for k, v in leaves.items()}, batch)
    assert last.item() < first.item()


def omniglot_config(**overrides: object) -> dict:
    return {
        "task": {"name": "omniglot", "ways": 5, "shots": 1},
        "store": {"path": "unused"},
        "model": {"network": "conv4", "filters": 8},
        "algorithm": {"name": "meta_lstm", "inner_steps": 5, **overrides},
    }


def test_from_config_builds_the_learner_the_config_names() -> None:
    learner = build_learner(validate(omniglot_config(forget_bias=[3.0, 3.5])))
    assert isinstance(learner, MetaLSTM)
    assert learner.inner_steps == 5 and learner.forget_bias == (3.0, 3.5)
    assert learner.network.filters == 8 and learner.network.ways == 5


def test_config_requires_a_network_it_trains() -> None:
    raw = omniglot_config()
    raw["model"] = {"network": "mlp"}
    with pytest.raises(ConfigError, match="model.network: meta_lstm trains conv4 or module or resnet12, got 'mlp'"):
        validate(raw)


@pytest.mark.parametrize(
    "name, image_size, downsample, steps",
    [
        ("meta_lstm_omniglot_5w1s.yaml", 28, "stride", 12),
        ("meta_lstm_omniglot_5w5s.yaml", 28, "stride", 8),
        ("meta_lstm_miniimagenet_5w1s.yaml", 84, "maxpool", 12),
        ("meta_lstm_miniimagenet_5w5s.yaml", 84, "maxpool", 8),
    ],
)
def test_shipped_configs_build_the_papers_learner(name: str, image_size: int, downsample: str, steps: int) -> None:
    from pathlib import Path

    from pipeline.config import load_config

    learner = build_learner(load_config(Path(__file__).resolve().parents[3] / "configs" / name))
    assert isinstance(learner, MetaLSTM) and learner.inner_steps == steps and learner.hidden == 20
    assert (learner.network.image_size, learner.network.downsample, learner.network.filters) == (image_size, downsample, 32)


def test_config_passes_the_reference_settings_and_names_a_bad_one() -> None:
    learner = build_learner(validate(omniglot_config(gate_input="post_sigmoid", grad_over_batch=False, eval_norm="batch")))
    assert (learner.gate_input, learner.grad_over_batch, learner.eval_norm) == ("post_sigmoid", False, "batch")
    default = build_learner(validate(omniglot_config()))
    assert (default.gate_input, default.grad_over_batch, default.eval_norm, default.norm_momentum) == (
        "pre_sigmoid", True, "running", 0.9)
    with pytest.raises(ConfigError, match="algorithm.eval_norm"):
        validate(omniglot_config(eval_norm="support"))


CONV4_MODULE = "pipeline.nets.conv4_module:Conv4Module"
USER_MODULE = "tests.pipeline.nets.user_module:ResidualGroupNormNet"


@pytest.mark.parametrize("norm", ["transductive", "support"])
def test_a_conv4_module_learner_equals_the_hand_written_conv4(norm: str) -> None:
    """The same weights through functional_call and through the hand-batched Conv4: updates, meta-gradient, predictions."""
    hand, module = (
        MetaLSTM(network, inner_steps=2, hidden=3, eval_norm="batch", dtype=torch.float64)
        for network in (Conv4(1, 8, 3, filters=4, norm=norm), ModuleNet(CONV4_MODULE, {"in_channels": 1, "ways": 3, "filters": 4}, norm))
    )
    params = hand.init(0)
    batch = episodes(2, seed=7)
    fast_hand, trace_hand, _ = hand.learn(params, batch.support_x, batch.support_y, 2)
    fast_module, trace_module, _ = module.learn(params, batch.support_x, batch.support_y, 2)
    torch.testing.assert_close(trace_module.input, trace_hand.input, rtol=0, atol=1e-12)
    for key in fast_hand:
        torch.testing.assert_close(fast_module[key], fast_hand[key], rtol=0, atol=1e-10)
    grads_hand, metrics_hand = hand.meta_grad(params, batch)
    grads_module, metrics_module = module.meta_grad(params, batch)
    assert metrics_module["loss"] == pytest.approx(metrics_hand["loss"], abs=1e-10)
    for key in grads_hand:
        torch.testing.assert_close(grads_module[key], grads_hand[key], rtol=1e-6, atol=1e-10)
    query = batch.query_x[0]
    predict = module.adapt(params, batch.support_x[0], batch.support_y[0])
    torch.testing.assert_close(predict(query), hand.adapt(params, batch.support_x[0], batch.support_y[0])(query), rtol=0, atol=1e-10)
    if norm == "support":  # each query is predicted independently of the others
        single = torch.cat([predict(query[i : i + 1]) for i in range(len(query))])
        torch.testing.assert_close(single, predict(query), rtol=0, atol=1e-10)


def test_a_user_module_learner_takes_gradient_descent_steps_and_meta_trains() -> None:
    """A GroupNorm + residual module: the gradient-descent gates give hand-written SGD on it; a few meta-steps run."""
    network = ModuleNet(USER_MODULE, {"in_channels": 1, "ways": 3, "width": 4})
    learner = MetaLSTM(network, inner_steps=2, hidden=3, grad_over_batch=False, eval_norm="batch", dtype=torch.float64)
    lr = 0.1
    params = gradient_descent_gates(learner.init(0), lr)
    batch = episodes(1, seed=8)
    fast, _, _ = learner.learn(params, batch.support_x, batch.support_y, 2)
    reference = network.module  # the user's module itself, run with the weights loaded in
    theta = {k[len(INIT) :]: v.clone().requires_grad_() for k, v in params.items() if k.startswith(INIT)}
    for _ in range(2):
        loss = F.cross_entropy(torch.func.functional_call(reference, theta, (batch.support_x[0],)), batch.support_y[0])
        grads = torch.autograd.grad(loss, list(theta.values()))
        theta = {k: (v - lr * g).detach().requires_grad_() for (k, v), g in zip(theta.items(), grads)}
    for key, value in theta.items():
        torch.testing.assert_close(fast[key][0], value.detach(), rtol=1e-12, atol=1e-14)

    leaves = {k: v.detach().requires_grad_() for k, v in learner.init(1).items()}
    sgd = torch.optim.SGD(leaves.values(), lr=0.01)
    batch = episodes(2, seed=9)
    for _ in range(2):
        grads, metrics = learner.meta_grad({k: v.detach() for k, v in leaves.items()}, batch)
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
        for k, v in leaves.items():
            v.grad = grads[k]
        sgd.step()
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_running_statistics_are_refused_for_a_module_naming_both_keys() -> None:
    module = {"network": "module", "factory": USER_MODULE, "kwargs": {"in_channels": 1, "ways": 5}}
    with pytest.raises(ConfigError, match=r"algorithm\.eval_norm: running needs model\.network conv4 .* got model\.network 'module'"):
        validate({**omniglot_config(), "model": module})
    with pytest.raises(ValueError, match="eval_norm 'running' needs the hand-written Conv4"):
        MetaLSTM(ModuleNet(USER_MODULE, {"in_channels": 1, "ways": 3}))
    learner = build_learner(validate({**omniglot_config(eval_norm="batch"), "model": module}))
    assert isinstance(learner.network, ModuleNet) and learner.eval_norm == "batch"
