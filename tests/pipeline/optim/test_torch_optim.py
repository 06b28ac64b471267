"""Any init/update pair as a torch.optim.Optimizer: Adam equals torch's; the learned optimizer trains a fresh model."""
from __future__ import annotations

import pytest
import torch

from pipeline.algorithms.l2l import L2L, Quadratic, init_lstm, init_state, lstm_update
from pipeline.optim.adam import adam
from pipeline.optim.torch_optim import TorchOptimizer
from tasks.episodes import Episodes


def test_wrapped_adam_equals_torch_optim_adam_and_resumes_from_its_state_dict() -> None:
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(4, 2).double(), torch.nn.Linear(4, 2).double()
    theirs.load_state_dict(ours.state_dict())
    opt_ours, opt_theirs = TorchOptimizer(ours.parameters(), adam(0.01)), torch.optim.Adam(theirs.parameters(), lr=0.01)
    x = torch.randn(8, 4, dtype=torch.float64)
    for step in range(4):
        if step == 2:  # a fresh wrapper continues from the saved state
            saved = opt_ours.state_dict()
            opt_ours = TorchOptimizer(ours.parameters(), adam(0.01))
            opt_ours.load_state_dict(saved)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_learned_steps_match_the_functional_update_for_every_parameter_shape() -> None:
    weights = init_lstm(0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True), torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)]
    expected = [p.detach().clone() for p in params]
    states = [init_state(weights, p.numel()) for p in params]
    optimizer = TorchOptimizer(params, L2L(Quadratic()).opt_fn(weights, output_scale=0.2))
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        optimizer.zero_grad()
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        for i, g in enumerate(grads):
            delta, states[i] = lstm_update(weights, g, states[i], output_scale=0.2)
            expected[i] = expected[i] + delta
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.detach(), e)
    assert set(optimizer.state[params[0]]) == {f"state{i}" for i in range(4)}


def test_opt_fn_over_named_tensors_equals_one_tensor_at_a_time() -> None:
    weights = init_lstm(1, dtype=torch.float64)
    pair = L2L(Quadratic()).opt_fn(weights)
    grads = {"a": torch.randn(2, 3, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    updates, _ = pair.update(grads, pair.init(grads))
    for k, g in grads.items():
        alone, _ = pair.update(g, pair.init(g))
        torch.testing.assert_close(updates[k], alone, rtol=0, atol=0)


def test_trained_optimizer_trains_a_fresh_model_in_a_plain_loop(one_thread: None) -> None:
    """Meta-trained on quadratics, then a plain loop on an nn.Linear least-squares model (the same family)."""
    learner = L2L(Quadratic(), unroll=20, truncation=5)
    leaves = {k: v.requires_grad_() for k, v in learner.init(0).items()}
    meta_opt = torch.optim.Adam(leaves.values(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(40):
        w, y = torch.randn(8, 10, 10, generator=gen), torch.randn(8, 10, generator=gen)
        grads, _ = learner.meta_grad({k: v.detach() for k, v in leaves.items()}, Episodes(w, y, w, y))
        for k, v in leaves.items():
            v.grad = grads[k]
        meta_opt.step()
    weights = {k: v.detach() for k, v in leaves.items()}

    torch.manual_seed(1)  # the model's initialization and data, as in any user loop
    model = torch.nn.Linear(10, 3)
    x = torch.randn(64, 10)
    y = x @ torch.randn(10, 3)
    optimizer = TorchOptimizer(model.parameters(), learner.opt_fn(weights))
    losses = []
    for _ in range(100):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-10:]) < 0.05 * losses[0]


def test_state_dict_round_trip_continues_identically() -> None:
    pair = L2L(Quadratic()).opt_fn(init_lstm(3))
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    opt_a = TorchOptimizer(a.parameters(), pair)
    x = torch.randn(5, 3)
    for _ in range(2):
        opt_a.zero_grad()
        a(x).square().sum().backward()
        opt_a.step()
    b.load_state_dict(a.state_dict())
    opt_b = TorchOptimizer(b.parameters(), pair)
    opt_b.load_state_dict(opt_a.state_dict())
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    torch.testing.assert_close(a.weight, b.weight)


def test_rejects_weights_of_something_else() -> None:
    weights = init_lstm(0)
    del weights["out.bias"]
    with pytest.raises(ValueError, match=r"missing \['out.bias'\]"):
        L2L(Quadratic()).opt_fn(weights)
    with pytest.raises(ValueError, match="output_scale and preprocess_p must be positive"):
        L2L(Quadratic()).opt_fn(init_lstm(0), output_scale=0.0)
