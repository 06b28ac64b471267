"""Baseline-finetune of Ravi & Larochelle 2017: pretrain a Conv4 on every training class, fine-tune per episode.

Pretraining: the run config's Conv4 with a linear head over ALL classes of the
task's train split (Omniglot with rotations: every (character, rotation) pair,
1100 x 4 = 4400), trained with mini-batch cross-entropy and Adam. Fine-tuning:
for each held-out episode, a fresh zero N-way head on the pretrained trunk,
``steps`` Adam steps at ``lr`` on the support set (the head only, or the whole
network), then the queries are classified. BatchNorm uses each batch's own
statistics, as in the learners: a pretraining mini-batch, an episode's support
set, an episode's query set. Pretraining images get the episodes' transform
(scaled to [0, 1], then ``task.normalize`` when set: ``TaskDistribution.inputs``).
As in the paper, the fine-tuning hyperparameters are picked on the store's val
episodes from a small grid, and test accuracy is reported on the same test
episodes as the meta-learners.

``python -m pipeline baseline finetune CONFIG`` runs it all and prints the table;
``--mlflow-run RUN_ID`` adds it to a training run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.build import build_network
from pipeline.config import Conv4Model, RunConfig, TrackingConfig, load_config
from pipeline.errors import ConfigError
from pipeline.evaluation import EvalResult, mean_ci95
from pipeline.nets.conv4 import Conv4
from pipeline.optim.adam import adam
from pipeline.optim.base import apply_updates
from pipeline.optim.unroll import unroll
from pipeline.types import Params
from tasks import fewshot
from tasks.distribution import TaskDistribution
from tasks.episodes import Episodes

Mode = Literal["head", "all"]
MODES: tuple[Mode, ...] = ("head", "all")
HEAD = ("head.weight", "head.bias")


@dataclass(frozen=True)
class Finetune:
    """Fine-tuning hyperparameters: ``steps`` Adam steps at ``lr`` on the support set, of the head or all weights."""

    lr: float
    steps: int
    mode: Mode

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"Finetune.lr must be positive, got {self.lr!r}")
        if self.steps < 1:
            raise ValueError(f"Finetune.steps must be >= 1, got {self.steps!r}")
        if self.mode not in MODES:
            raise ValueError(f"Finetune.mode must be one of {MODES}, got {self.mode!r}")

    def __str__(self) -> str:
        return f"mode {self.mode}, lr {self.lr:g}, {self.steps} steps"


GRID = tuple(Finetune(lr, steps, mode) for mode in MODES for steps in (10, 50) for lr in (1e-3, 1e-2, 1e-1))
"""The settings tried on the val episodes; on a tie the first (cheapest) wins."""


@dataclass(frozen=True)
class TrainingSet:
    """The train split's images as one labelled pool; with rotations, a class is a (character, rotation) pair."""

    pixels: torch.Tensor
    """uint8 [turns * table images, C, H, W]: the table turned by each rotation, one after the other"""
    rows: torch.Tensor
    """int64 [M]: the rows of ``pixels`` that belong to the train split"""
    labels: torch.Tensor
    """int64 [M]: class of each row, ``character position * turns + rotation``"""
    classes: int
    inputs: Callable[[torch.Tensor], torch.Tensor]
    """uint8 images to model inputs: the distribution's own (``TaskDistribution.inputs``, what episodes get)"""

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``[len(index), C, H, W]`` as the episodes' (float32 in [0, 1], normalized when the task
        normalizes) and labels ``[len(index)]`` of the pool entries ``index``."""
        return self.inputs(self.pixels[self.rows[index]]), self.labels[index]


def progress(line: str) -> None:
    """Print a progress line at once (stdout may be a file or a pipe)."""
    print(line, flush=True)


@dataclass(frozen=True)
class Pretrained:
    """Pretraining's result: the network's parameters (trunk and all-class head) and its loss per step."""

    params: Params
    losses: list[float]
    seconds: float


def check(config: RunConfig) -> None:
    """Refuse a config this baseline cannot run, naming the key: it needs an image task and a conv4 model."""
    task = config.task_spec
    if task.kind != "classification" or not task.is_image:
        raise ConfigError(f"task.name: the fine-tuning baseline needs an image classification task, got {task.family!r}")
    if not isinstance(config.model, Conv4Model):
        raise ConfigError(f"model.network: the fine-tuning baseline pretrains a conv4, got {config.model.network!r}")


def training_set(distribution: TaskDistribution) -> TrainingSet:
    """Every image of the train split with its (character, rotation) class."""
    if not distribution.is_image:
        raise ValueError("the fine-tuning baseline needs an image task (its store has no image table)")
    turns, n = distribution.turns, len(distribution.pixels)
    pool = fewshot.turned(distribution.pixels) if turns == 4 else distribution.pixels.unsqueeze(0)
    train = distribution.splits["train"]
    table_classes = distribution.table.classes
    members = np.flatnonzero(np.isin(table_classes, train))
    position = np.searchsorted(train, table_classes[members])
    rows = torch.from_numpy(members).repeat(turns) + torch.arange(turns).repeat_interleave(len(members)) * n
    labels = torch.from_numpy(position).repeat(turns) * turns + torch.arange(turns).repeat_interleave(len(members))
    return TrainingSet(pool.flatten(0, 1), rows, labels, len(train) * turns, distribution.inputs)


def networks(config: RunConfig, classes: int) -> tuple[Conv4, Conv4]:
    """The config's Conv4 with a head over ``classes`` (pretraining) and with an N-way head (fine-tuning)."""
    check(config)
    episode = build_network(config)
    return dataclasses.replace(episode, ways=classes), episode


def pretrain(
    network: Conv4,
    data: TrainingSet,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 100,
    log: Callable[[str], None] = progress,
) -> Pretrained:
    """Train ``network`` (its head over ``data.classes``) with Adam (pipeline.optim.adam) on uniformly drawn mini-batches."""
    if network.ways != data.classes:
        raise ValueError(f"pretrain: the network has {network.ways} outputs, the training set {data.classes} classes")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"pretrain: steps and batch_size must be >= 1, got {steps} and {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    params = network.init(gen)
    optimizer = adam(lr)
    state = optimizer.init(params)
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = data.batch(torch.randint(len(data), (batch_size,), generator=gen))
        at = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss = F.cross_entropy(network.apply(at, x), y)
        updates, state = optimizer.update(dict(zip(at, torch.autograd.grad(loss, list(at.values())))), state)
        params = apply_updates(params, updates)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            elapsed = time.perf_counter() - start
            recent = losses[-log_every:]
            log(
                f"pretrain step {step}/{steps}: loss {sum(recent) / len(recent):.4f}, {step / elapsed:.1f} steps/s,"
                f" ETA {(steps - step) * elapsed / step:.0f} s"
            )
    return Pretrained(params, losses, time.perf_counter() - start)


def trunk(params: Params) -> Params:
    """The parameters without the head: what fine-tuning starts from."""
    return {k: v for k, v in params.items() if k not in HEAD}


def features(network: Conv4, trunk_params: Params, x: torch.Tensor) -> torch.Tensor:
    """The head's inputs ``[T, M, network.features()]`` for stacked images ``x[T, M, C, H, W]`` (an identity head)."""
    width = network.features()
    identity = {"head.weight": torch.eye(width, dtype=x.dtype), "head.bias": torch.zeros(width, dtype=x.dtype)}
    return network.apply_tasks(trunk_params | identity, x)


def finetune_tasks(
    network: Conv4, trunk_params: Params, support_x: torch.Tensor, support_y: torch.Tensor, settings: Finetune
) -> Params:
    """Per-task parameters after fine-tuning a zero N-way head (and, with mode ``all``, the trunk) on each support set.

    Tasks are stacked (``support_x[T, N*K, C, H, W]``) and independent: each
    gets its own head ``[T, N, F]`` and Adam state, so the result is the same
    as fine-tuning one task at a time. With mode ``head`` the trunk stays shared
    and its support features are computed once.
    """
    tasks = support_x.shape[0]
    width = network.features()
    head = {
        "head.weight": torch.zeros(tasks, network.ways, width, dtype=support_x.dtype),
        "head.bias": torch.zeros(tasks, network.ways, dtype=support_x.dtype),
    }

    def task_losses(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), support_y.flatten(), reduction="none").view(support_y.shape).mean(-1)

    with torch.enable_grad():
        if settings.mode == "head":
            with torch.no_grad():
                inputs = features(network, trunk_params, support_x)

            def losses(p: Params) -> torch.Tensor:
                return task_losses(torch.baddbmm(p["head.bias"].unsqueeze(1), inputs, p["head.weight"].transpose(1, 2)))

            tuned, _ = unroll(losses, head, adam(settings.lr), settings.steps, create_graph=False)
            return {k: v.detach() for k, v in (trunk_params | tuned).items()}
        fast = {k: v.expand(tasks, *v.shape) for k, v in trunk_params.items()} | head
        tuned, _ = unroll(
            lambda p: task_losses(network.apply_tasks(p, support_x)), fast, adam(settings.lr), settings.steps, create_graph=False
        )
        return {k: v.detach() for k, v in tuned.items()}


def accuracies(network: Conv4, trunk_params: Params, episodes: Episodes, settings: Finetune, chunk: int = 50) -> torch.Tensor:
    """Query accuracy ``[len(episodes)]`` of each episode after fine-tuning on its support set, ``chunk`` at a time."""
    parts = []
    for start in range(0, len(episodes), chunk):
        part = episodes[start : start + chunk]
        tuned = finetune_tasks(network, trunk_params, part.support_x, part.support_y, settings)
        with torch.no_grad():
            logits = network.apply_tasks(tuned, part.query_x)
        parts.append((logits.argmax(-1) == part.query_y).float().mean(-1))
    return torch.cat(parts)


def evaluate(network: Conv4, trunk_params: Params, episodes: Episodes, settings: Finetune, chunk: int = 50) -> EvalResult:
    """Mean query accuracy over ``episodes`` with its 95% confidence half-width (pipeline.evaluation's interval)."""
    values = accuracies(network, trunk_params, episodes, settings, chunk).tolist()
    mean, ci = mean_ci95(values)
    return EvalResult("accuracy", mean, ci, len(values))


def tune(
    network: Conv4,
    trunk_params: Params,
    episodes: Episodes,
    grid: tuple[Finetune, ...] = GRID,
    chunk: int = 50,
    log: Callable[[str], None] = progress,
) -> tuple[Finetune, dict[Finetune, EvalResult]]:
    """The grid setting with the best mean accuracy on ``episodes`` (the val episodes), and every setting's result."""
    if not grid:
        raise ValueError("tune: the grid is empty")
    results = {}
    for i, settings in enumerate(grid, 1):
        start = time.perf_counter()
        results[settings] = evaluate(network, trunk_params, episodes, settings, chunk)
        log(f"val {i}/{len(grid)} ({settings}): {results[settings]} in {time.perf_counter() - start:.1f} s")
    return max(grid, key=lambda s: results[s].mean), results


@dataclass(frozen=True)
class Report:
    """What the CLI prints and logs."""

    chosen: Finetune
    val: dict[Finetune, EvalResult]
    test: EvalResult
    pretrain: dict[str, float]
    """steps, batch_size, lr, seed, classes, seconds, final_loss (mean of the last 100 steps)"""

    def table(self) -> str:
        """A small markdown table of the result."""
        p = self.pretrain

        def accuracy(r: EvalResult) -> str:
            return f"{100 * r.mean:.2f}% +- {100 * r.ci95:.2f}% ({r.n} episodes)"

        rows = [
            ("fine-tuning (chosen on val)", str(self.chosen)),
            ("val accuracy", accuracy(self.val[self.chosen])),
            ("test accuracy", accuracy(self.test)),
            ("pretraining", f"{int(p['steps'])} steps x {int(p['batch_size'])} images, {int(p['classes'])} classes,"
             f" final loss {p['final_loss']:.3f}"),
            ("pretraining time", f"{p['seconds']:.0f} s"),
        ]
        return "\n".join(["| baseline-finetune | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])

    def summary(self) -> dict:
        """JSON-ready: chosen settings, pretraining, test, and every grid setting's val result."""
        return {
            "chosen": dataclasses.asdict(self.chosen),
            "pretrain": self.pretrain,
            "test": dataclasses.asdict(self.test),
            "val": [dataclasses.asdict(s) | {"accuracy": r.mean, "ci95": r.ci95, "n": r.n} for s, r in self.val.items()],
        }


def log_to_run(run_id: str, report: Report, tracking: TrackingConfig) -> None:
    """Metrics ``baseline_finetune/{accuracy,accuracy_ci95,val_accuracy}``, the settings as tags, baseline_finetune.json."""
    import tempfile
    from pathlib import Path

    from mlflow.tracking import MlflowClient

    from pipeline.tracking.mlflow_tracker import tracking_uri

    client = MlflowClient(tracking_uri(tracking))
    client.log_metric(run_id, "baseline_finetune/accuracy", report.test.mean)
    client.log_metric(run_id, "baseline_finetune/accuracy_ci95", report.test.ci95)
    client.log_metric(run_id, "baseline_finetune/val_accuracy", report.val[report.chosen].mean)
    for key, value in dataclasses.asdict(report.chosen).items():
        client.set_tag(run_id, f"baseline_finetune.{key}", str(value))
    for key, value in report.pretrain.items():
        client.set_tag(run_id, f"baseline_finetune.pretrain_{key}", str(value))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "baseline_finetune.json"
        path.write_text(json.dumps(report.summary(), indent=1))
        client.log_artifact(run_id, str(path))


def main(argv: list[str] | None = None) -> Report:
    """CLI: open the config's store, pretrain, tune on val, evaluate on test, print (and log) the table."""
    parser = argparse.ArgumentParser(prog="python -m pipeline baseline finetune", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="run config YAML (an image task with a conv4 model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--pretrain-steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=64, help="pretraining mini-batch")
    parser.add_argument("--lr", type=float, default=3e-3, help="pretraining Adam learning rate")
    parser.add_argument("--episodes", type=int, help="test episodes (default: train.test_episodes)")
    parser.add_argument("--val-episodes", type=int, help="val episodes for the grid (default: train.val_episodes)")
    parser.add_argument("--log-every", type=int, default=100, help="pretraining progress line every this many steps")
    parser.add_argument("--mlflow-run", metavar="RUN_ID", help="also log the result to this existing MLflow run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (more than the free cores slows torch badly)")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> Report:
    from tasks.store.parquet import precompute


    config = load_config(args.config, args.set)
    check(config)
    store = precompute(config)
    data = training_set(store.distribution)
    pretraining, episode_net = networks(config, data.classes)
    print(f"pretraining a conv4 ({config.model.filters} filters) on {data.classes} classes, {len(data)} images", flush=True)
    pretrained = pretrain(pretraining, data, args.pretrain_steps, args.batch_size, args.lr, config.seed, args.log_every)
    start = time.perf_counter()
    base = trunk(pretrained.params)
    val = store.read_split("val", args.val_episodes or config.train.val_episodes)
    chosen, results = tune(episode_net, base, val)
    test = evaluate(episode_net, base, store.read_split("test", args.episodes or config.train.test_episodes), chosen)
    print(f"tuning and test: {time.perf_counter() - start:.0f} s", flush=True)
    tail = pretrained.losses[-100:]
    report = Report(
        chosen, results, test,
        {
            "steps": args.pretrain_steps, "batch_size": args.batch_size, "lr": args.lr, "seed": config.seed,
            "classes": data.classes, "seconds": pretrained.seconds, "final_loss": sum(tail) / len(tail),
        },
    )
    print(report.table())
    if args.mlflow_run:
        log_to_run(args.mlflow_run, report, config.tracking)
    return report

