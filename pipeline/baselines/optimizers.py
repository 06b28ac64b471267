"""Hand-designed optimizers with tuned learning rates, against the learned L2L optimizer.

The paper's evaluation: loss curves over 100 steps on held-out optimizees for
SGD, RMSprop, Adam and Nesterov momentum (torch.optim itself, so the baselines
are the real thing), each with the learning rate that gives the lowest mean
final loss on a separate set of tuning problems; the learned optimizer runs
on the same held-out problems (same initializations and mini-batches).

``python -m pipeline baseline optimizers --config configs/l2l_quadratic.yaml`` meta-trains
L2L in process (``--meta-steps``; or ``--export DIR`` to evaluate a trained one)
and prints the table; ``--hidden``, ``--layers``, ``--activation`` change the
evaluation MLP only (the paper's generalization checks).
"""
from __future__ import annotations

import argparse
import json
import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.algorithms.l2l import L2L, MLPClassifier, Problem, episode_generator
from pipeline.build import build_learner
from pipeline.config import RunConfig, load_config
from pipeline.errors import ConfigError
from pipeline.types import Params
from tasks.distribution import TaskDistribution
from tasks.episodes import Episodes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OPTIMIZERS: dict[str, Callable[[list[torch.Tensor], float], torch.optim.Optimizer]] = {
    "sgd": lambda params, lr: torch.optim.SGD(params, lr=lr),
    "rmsprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr),
    "adam": lambda params, lr: torch.optim.Adam(params, lr=lr),
    "nag": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True),
}
"""The paper's hand-designed baselines, by name."""

LR_GRID = tuple(10.0 ** (e / 2) for e in range(-8, 3))
"""Learning rates tried for each baseline: 1e-4 ... 10 in half-decades."""


def hand_curve(name: str, lr: float, problem: Problem, steps: int) -> torch.Tensor:
    """Loss curve ``[steps + 1, B]`` of a torch.optim baseline on a batch of problems.

    All of the batch's parameters are one tensor; these optimizers act
    elementwise, so the problems stay independent.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown baseline {name!r}; choose from {sorted(OPTIMIZERS)}")
    theta = problem.theta0.detach().clone().requires_grad_()
    optimizer = OPTIMIZERS[name]([theta], lr)
    curve = []
    for t in range(steps + 1):
        loss = problem.loss(theta, t)
        curve.append(loss.detach())
        if t < steps:
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
    return torch.stack(curve)


def final_score(curve: torch.Tensor) -> float:
    """Mean final loss; a diverged run (non-finite) scores infinity."""
    value = curve[-1].mean().item()
    return value if math.isfinite(value) else math.inf


def tune(name: str, problem: Problem, steps: int, grid: tuple[float, ...] = LR_GRID) -> float:
    """The grid learning rate with the lowest mean final loss on the tuning problems."""
    scores = {lr: final_score(hand_curve(name, lr, problem, steps)) for lr in grid}
    return min(scores, key=scores.get)


def compare(
    learner: L2L, params: Params, tuning: Problem, held_out: Problem, steps: int, grid: tuple[float, ...] = LR_GRID
) -> dict[str, tuple[float | None, torch.Tensor]]:
    """``{name: (tuned lr or None, curve [steps + 1, B])}`` on ``held_out`` for L2L and each baseline."""
    results: dict[str, tuple[float | None, torch.Tensor]] = {"l2l": (None, learner.curve(params, held_out, steps))}
    for name in OPTIMIZERS:
        lr = tune(name, tuning, steps, grid)
        results[name] = (lr, hand_curve(name, lr, held_out, steps))
    return results


def problems(learner: L2L, episodes: Episodes, steps: int, seed: int) -> Problem:
    """The optimizee problems of ``episodes`` (initializations and mini-batches fixed by content and seed)."""
    return learner.optimizee.problem(episodes.support_x, episodes.support_y, steps, episode_generator(episodes, seed))


def meta_train(config: RunConfig) -> Params:
    """Meta-train the config's L2L with the pipeline's own run in this process and return its best weights.

    The driver's ``run`` on ``LocalPool``: the same server (Adam), workers, store,
    validation and export as ``python -m pipeline train``, without Ray; tracked in
    the config's MLflow (``tracking``), which prints the run id.
    """
    from pipeline.export.directory import load
    from pipeline.runtime.driver import run
    from pipeline.runtime.local import LocalPool
    from pipeline.tracking.mlflow_tracker import MlflowTracker
    from tasks.store.parquet import precompute

    tracker = MlflowTracker(config.tracking, config.name)
    result = run(config, precompute(config), tracker, lambda state, positions, _: LocalPool(config, state, positions))
    return load(result.export_dir).params


def _table(results: dict[str, tuple[float | None, torch.Tensor]], steps: int) -> str:
    lines = [f"| optimizer | tuned lr | mean loss at step {steps} | median | mean over steps |", "|---|---|---|---|---|"]
    for name, (lr, curve) in results.items():
        shown = "learned" if lr is None else f"{lr:.3g}"
        lines.append(
            f"| {name} | {shown} | {curve[-1].mean().item():.4g} | {curve[-1].median().item():.4g} | {curve.mean().item():.4g} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI: meta-train (or load) L2L, tune the baselines, print the comparison table."""
    parser = argparse.ArgumentParser(prog="python -m pipeline baseline optimizers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="l2l run config YAML (its task, store and algorithm sections)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--meta-steps", type=int, default=300,
                        help="in-process meta-training steps: train.steps of the run it makes, server steps (truncations with"
                        " algorithm.update_per: truncation, 5 per trajectory of the shipped configs; ignored with --export/--weights)")
    parser.add_argument("--export", help="evaluate the L2L weights of this export directory instead of training")
    parser.add_argument("--weights", help="evaluate these L2L weights (safetensors) instead of training")
    parser.add_argument("--save-weights", help="write the meta-trained L2L weights here (safetensors)")
    parser.add_argument("--problems", type=int, default=100, help="held-out problems")
    parser.add_argument("--tuning-problems", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per curve")
    parser.add_argument("--hidden", type=int, nargs="+", help="evaluation MLP hidden sizes (generalization)")
    parser.add_argument("--activation", choices=("sigmoid", "relu"), help="evaluation MLP activation (generalization)")
    parser.add_argument("--json", help="write the curves' means here")
    parser.add_argument("--plot", help="write the loss curves as a PNG here")
    parser.add_argument("--mlflow-run", metavar="RUN_ID",
                        help="also log the curves (plots/, baselines.json) and final losses to this run ($MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    config = load_config(args.config, [*args.set, f"train.steps={args.meta_steps}"])
    learner = build_learner(config)
    if not isinstance(learner, L2L):
        raise ConfigError(f"--config {args.config}: baselines compare a learned l2l optimizer, got algorithm.name={config.algorithm.name!r}")
    if args.export:
        from pipeline.export.directory import load

        params = load(args.export).params
    elif args.weights:
        params = load_file(args.weights)
    else:
        params = meta_train(config)
        if args.save_weights:
            save_file({k: v.contiguous() for k, v in params.items()}, args.save_weights)
    evaluator = learner
    if args.hidden or args.activation:
        base = learner.optimizee
        if not isinstance(base, MLPClassifier):
            raise SystemExit("--hidden/--activation need the digits MLP optimizee")
        evaluator = L2L(
            MLPClassifier(base.in_features, base.classes, tuple(args.hidden or base.hidden), args.activation or base.activation, base.batch_size),
            learner.hidden, learner.layers, learner.unroll, learner.truncation, learner.output_scale, learner.preprocess_p,
        )
    dist = TaskDistribution.load(config.task)
    tuning = dist.episodes("val", np.random.default_rng(10_000 + config.seed), args.tuning_problems)
    held_out = dist.episodes("test", np.random.default_rng(20_000 + config.seed), args.problems)
    results = compare(
        evaluator, params, problems(evaluator, tuning, args.steps, 1), problems(evaluator, held_out, args.steps, 2), args.steps
    )
    print(_table(results, args.steps))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary(results), f, indent=1)
    if args.plot:
        plot_curves(results).savefig(args.plot, dpi=100)
    if args.mlflow_run:
        log_to_run(args.mlflow_run, results, suffix="_".join(filter(None, [*map(str, args.hidden or []), args.activation])))


def summary(results: dict[str, tuple[float | None, torch.Tensor]]) -> dict[str, dict]:
    """Each optimizer's tuned learning rate (None for L2L) and mean loss per step."""
    return {n: {"lr": lr, "mean_curve": c.mean(1).tolist()} for n, (lr, c) in results.items()}


def log_to_run(run_id: str, results: dict[str, tuple[float | None, torch.Tensor]], suffix: str = "") -> None:
    """The curves as plots/baselines[_suffix].png and baselines[_suffix].json, final losses as metrics."""
    import tempfile
    from pathlib import Path

    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    from pipeline.config import TrackingConfig
    from pipeline.tracking.mlflow_tracker import tracking_uri

    name = f"baselines_{suffix}" if suffix else "baselines"
    client = MlflowClient(tracking_uri(TrackingConfig()))
    with tempfile.TemporaryDirectory() as folder:
        figure = plot_curves(results)
        figure.savefig(Path(folder) / f"{name}.png", dpi=100)
        plt.close(figure)
        (Path(folder) / f"{name}.json").write_text(json.dumps(summary(results), indent=1))
        client.log_artifact(run_id, str(Path(folder) / f"{name}.png"), "plots")
        client.log_artifact(run_id, str(Path(folder) / f"{name}.json"))
    for optimizer, (_, curve) in results.items():
        client.log_metric(run_id, f"{name}/{optimizer}_final_loss", float(curve.mean(1)[-1]))


def plot_curves(results: dict[str, tuple[float | None, torch.Tensor]]) -> Figure:
    """Mean loss per step, log scale, one line per optimizer (the paper's figures)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5))
    for name, (lr, curve) in results.items():
        axes.plot(curve.mean(1).numpy(), label=name if lr is None else f"{name} (lr {lr:.3g})")
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("mean loss")
    axes.legend()
    figure.tight_layout()
    return figure

