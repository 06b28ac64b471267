"""Tuned hand-designed baselines: torch.optim curves on batched problems, grid tuning, the comparison table."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.algorithms.l2l import L2L, MLPClassifier, Quadratic
from pipeline.baselines import optimizers as baselines
from tasks.families import quadratic
from tasks.families.quadratic import QuadraticTask


def problem(count: int, seed: int, steps: int = 30):
    task = QuadraticTask(dim=5)
    fields = quadratic.sample(task, np.random.default_rng(seed), count)
    episodes = quadratic.decode(task, {k: torch.from_numpy(v) for k, v in fields.items()}).to("cpu", torch.float64)
    return baselines.problems(L2L(Quadratic()), episodes, steps, seed=0)


@pytest.mark.parametrize("name", sorted(baselines.OPTIMIZERS))
def test_batched_curve_equals_separate_runs(name: str) -> None:
    """The problems of a batch share one tensor; elementwise optimizers must keep them independent."""
    batch = problem(3, seed=0)
    together = baselines.hand_curve(name, 0.01, batch, 10)
    for i in range(3):
        single = baselines.Problem(batch.theta0[i : i + 1], lambda theta, t, i=i: batch.loss(
            torch.cat([batch.theta0[:i], theta, batch.theta0[i + 1 :]]), t)[i : i + 1], batch.predict)
        torch.testing.assert_close(baselines.hand_curve(name, 0.01, single, 10)[:, 0], together[:, i])


def test_sgd_curve_is_hand_written_gradient_descent() -> None:
    batch = problem(2, seed=1)
    curve = baselines.hand_curve("sgd", 0.02, batch, 5)
    theta = batch.theta0.clone()
    for t in range(6):
        theta.requires_grad_()
        loss = batch.loss(theta, t)
        torch.testing.assert_close(curve[t], loss.detach())
        (grad,) = torch.autograd.grad(loss.sum(), theta)
        theta = (theta - 0.02 * grad).detach()


def test_tuning_picks_the_grid_point_with_the_lowest_final_loss() -> None:
    batch = problem(4, seed=2)
    grid = (1e-4, 1e-2, 10.0)  # too small, reasonable, divergent
    scores = {lr: baselines.final_score(baselines.hand_curve("sgd", lr, batch, 30)) for lr in grid}
    assert scores[10.0] == math.inf or scores[10.0] > scores[1e-2]
    assert baselines.tune("sgd", batch, 30, grid) == min(scores, key=scores.get) == 1e-2


def test_compare_runs_every_optimizer_on_the_held_out_problems() -> None:
    learner = L2L(Quadratic(), unroll=30, dtype=torch.float64)
    results = baselines.compare(learner, learner.init(0), problem(3, seed=3), problem(5, seed=4), 30, grid=(1e-3, 1e-2))
    assert set(results) == {"l2l", *baselines.OPTIMIZERS}
    assert results["l2l"][0] is None
    for name, (lr, curve) in results.items():
        assert curve.shape == (31, 5)
        assert lr is None or lr in (1e-3, 1e-2)
    # every optimizer starts from the same held-out initializations
    assert all(torch.equal(curve[0], results["l2l"][1][0]) for _, curve in results.values())


def test_mlp_problems_give_every_optimizer_the_same_mini_batches() -> None:
    mlp = MLPClassifier(in_features=4, classes=3, hidden=(5,), batch_size=4)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 12, 4, generator=gen), torch.randint(0, 3, (2, 12), generator=gen)
    prob = mlp.problem(x, y, 5, torch.Generator().manual_seed(1))
    a = baselines.hand_curve("adam", 0.01, prob, 5)
    b = baselines.hand_curve("adam", 0.01, prob, 5)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_unknown_baseline_is_named() -> None:
    with pytest.raises(ValueError, match="unknown baseline 'adagrad'"):
        baselines.hand_curve("adagrad", 0.1, problem(1, seed=0), 1)


def test_curves_and_final_losses_are_logged_to_an_mlflow_run(tmp_path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.baselines.optimizers import log_to_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("b")).info.run_id
    results = {"l2l": (None, torch.tensor([[2.0, 4.0], [1.0, 2.0]])), "adam": (0.1, torch.tensor([[3.0], [1.0]]).expand(2, 2))}
    log_to_run(run_id, results, suffix="relu")
    metrics = client.get_run(run_id).data.metrics
    assert metrics == {"baselines_relu/l2l_final_loss": 1.5, "baselines_relu/adam_final_loss": 1.0}  # [steps, problems]
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/baselines_relu.png"}
    saved = json.loads(open(client.download_artifacts(run_id, "baselines_relu.json", str(tmp_path))).read())
    assert saved["adam"] == {"lr": 0.1, "mean_curve": [3.0, 1.0]} and saved["l2l"]["lr"] is None
