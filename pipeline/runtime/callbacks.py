"""What happens around the step loop: validation and the best checkpoint, periodic checkpoints and metrics after
each step (progress: pipeline/runtime/progress.py); the meta-test, the figures and the export at the run's end.

Each step callback gets the step's ``StepEnd`` and may add metrics to it; the loop
calls them in the order given (validation first, so its metrics are logged with
the step's). They reach the server and the workers only through the ``Pool`` and
tracking only through the ``Tracker`` protocol.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

from pipeline.config import RunConfig
from pipeline.evaluation import EvalResult, meta_test_state
from pipeline.export.directory import export
from pipeline.runtime import checkpoint
from pipeline.runtime.flat_buffer import Layout
from pipeline.runtime.pool import Pool, Positions
from pipeline.runtime.server import ServerState
from pipeline.runtime.worker import StepReport
from pipeline.tracking.model_registry import MODEL_PATH
from pipeline.tracking.plots import (
    CURVE_KEYS,
    Series,
    episodes_figure,
    learning_curve,
    log_figure,
)
from pipeline.tracking.tracker import Tracker
from pipeline.types import Carry, MetaLearner, Params
from tasks.episodes import Episodes
from tasks.family import ImageTask
from tasks.store.parquet import Store

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class StepEnd:
    """A finished step: the server version after it, whether it is the run's last, its reports and metrics."""

    version: int
    last: bool
    reports: list[StepReport]
    metrics: dict[str, float]


class Callback(Protocol):
    def on_step(self, step: StepEnd) -> None:
        """React to a finished step; may add ``scope/name`` metrics to ``step.metrics``."""
        ...


def current_params(pool: Pool, layout: Layout) -> Params:
    """The server's parameters now, as a dict of tensors (a copy)."""
    _, flat = pool.pull()
    return layout.unflatten(torch.from_numpy(flat.copy()))


@dataclass(frozen=True)
class RestorePoint:
    """The server state and reader positions of the last checkpoint: what a dead server is restored from."""

    state: ServerState
    positions: Positions


class Checkpoints:
    """Writes the run's checkpoints (``checkpoints/<name>`` artifacts) and remembers the last for restores."""

    def __init__(
        self, pool: Pool, tracker: Tracker, scratch: Path, config: RunConfig, best_val: float | None, restore_point: RestorePoint
    ) -> None:
        self._pool = pool
        self._tracker = tracker
        self._scratch = scratch
        self._config = config.model_dump(mode="json")
        self.best_val = best_val
        """The best validation mean so far (accuracy: highest; mse: lowest), recorded in every checkpoint."""
        self.restore_point = restore_point

    def save(self, name: str) -> None:
        """Checkpoint the server and the workers' positions as ``checkpoints/<name>``; raises ServerLost."""
        state = self._pool.state()
        positions = list(self._pool.positions)
        self.restore_point = RestorePoint(state, positions)
        path = checkpoint.save(self._scratch / name, checkpoint.Checkpoint(state, positions, self.best_val, self._config))
        self._tracker.log_artifacts(path, f"checkpoints/{name}")

    def best(self) -> checkpoint.Checkpoint | None:
        """The run's best checkpoint: the last this process wrote, else the one a resumed run had (driver._resume
        puts it in the scratch folder); None before any validation."""
        path = self._scratch / "best"
        return checkpoint.load(path) if path.exists() else None


class Validation:
    """Every ``every`` steps and at the last: the workers evaluate the current parameters on the first
    ``episodes`` validation episodes (``val/*``); a better result than any before is saved as checkpoints/best.

    Each episode adapts from the ``learner``'s meta-test state now (evaluation.meta_test_state: for Reptile with
    ``eval_state: carried``, worker slot 0's inner Adam state after its last step, as openai's evaluation during
    training uses the current state), so the best checkpoint holds the parameters and the state it was scored with.
    """

    def __init__(self, episodes: int, every: int, pool: Pool, checkpoints: Checkpoints, learner: MetaLearner) -> None:
        self._episodes, self._every, self._pool, self._checkpoints, self._learner = episodes, every, pool, checkpoints, learner

    def on_step(self, step: StepEnd) -> None:
        if step.version % self._every and not step.last:
            return
        state = meta_test_state(self._learner, self._pool.positions)
        result = self._pool.evaluate("val", self._episodes, self._pool.pull()[1], state)
        step.metrics[f"val/{result.metric}"] = result.mean
        step.metrics[f"val/{result.metric}_ci95"] = result.ci95
        best = self._checkpoints.best_val
        if best is None or (result.mean > best if result.metric == "accuracy" else result.mean < best):
            self._checkpoints.best_val = result.mean
            self._checkpoints.save("best")
        step.metrics["val/best"] = self._checkpoints.best_val


class MetricsLog:
    """Logs a step's metrics every ``every`` steps, at the last and whenever it validated."""

    def __init__(self, tracker: Tracker, every: int) -> None:
        self._tracker, self._every = tracker, every

    def on_step(self, step: StepEnd) -> None:
        step.metrics["faults/tracking_outages"] = self._tracker.outages
        if step.version % self._every == 0 or step.last or "val/best" in step.metrics:
            # A fault counter is logged from its first fault on: a clean run's charts open with its curves.
            logged = {k: v for k, v in step.metrics.items() if v or not k.startswith("faults/")}
            self._tracker.log_metrics(logged, step=step.version)


class LearningCurve:
    """Redraws ``plots/learning_curve.png`` at every validation, from the curves' values of every step so far
    (``history``: what earlier processes of the run logged), so a run that stops early has its curve."""

    def __init__(self, tracker: Tracker, scratch: Path, history: Series) -> None:
        self._tracker, self._scratch = tracker, scratch
        self._series = {key: list(history.get(key, [])) for key in CURVE_KEYS}

    def on_step(self, step: StepEnd) -> None:
        for key in CURVE_KEYS:
            points = self._series[key]
            while points and points[-1][0] >= step.version:  # steps redone after a server restore
                points.pop()
            if key in step.metrics:
                points.append((step.version, step.metrics[key]))
        if "val/best" in step.metrics:
            figure = learning_curve(self._series)
            if figure is not None:
                log_figure(self._tracker, "learning_curve", figure, self._scratch)


class PeriodicCheckpoint:
    """Writes checkpoints/latest every ``every`` steps and at the last."""

    def __init__(self, checkpoints: Checkpoints, every: int) -> None:
        self._checkpoints, self._every = checkpoints, every

    def on_step(self, step: StepEnd) -> None:
        if step.version % self._every == 0 or step.last:
            self._checkpoints.save("latest")


def test_metrics(result: EvalResult) -> dict[str, float]:
    """``test/<metric>``, ``test/<metric>_ci95`` and ``test/episodes`` of a meta-test."""
    return {f"test/{result.metric}": result.mean, f"test/{result.metric}_ci95": result.ci95, "test/episodes": result.n}


def log_test(tracker: Tracker, result: EvalResult, step: int, scratch: Path) -> None:
    """Log a meta-test's ``result``: ``test/*`` metrics at ``step``, ``test_results.json`` and the per-episode
    scores as the table ``test_episodes.json``."""
    tracker.log_metrics(test_metrics(result), step=step)
    table = scratch / "test_results.json"
    table.write_text(json.dumps({"metric": result.metric, "mean": result.mean, "ci95": result.ci95, "episodes": result.n}, indent=1))
    tracker.log_artifact(table)
    if result.scores:
        tracker.log_table({"episode": list(range(len(result.scores))), result.metric: list(result.scores)}, "test_episodes.json")


def log_learner_figures(tracker: Tracker, figures: dict[str, Figure], scratch: Path) -> None:
    """The figures a worker drew of the learner (``Pool.figures``: e.g. the Meta-LSTM's gates, the sinusoid fits)
    under ``plots/``."""
    for name, figure in figures.items():
        log_figure(tracker, name, figure, scratch)


def log_run_start(tracker: Tracker, config: RunConfig, store: Store, scratch: Path) -> None:
    """What a new run's page shows before its first step: a description, the episode store as the run's data set
    input, and a few training and test episodes as the learner is fed them (``plots/episodes.png``)."""
    tracker.set_tag("mlflow.note.content", describe(config, store))
    digest = hashlib.sha256(json.dumps(store.manifest, sort_keys=True).encode()).hexdigest()[:12]
    tracker.log_input(Path(store.path.rstrip("/")).name, store.path, digest, "training, validation and test episodes")
    figure = episodes_figure({split: store.read_split(split, limit=EPISODES_SHOWN) for split in ("train", "test")})
    if figure is not None:
        log_figure(tracker, "episodes", figure, scratch)


EPISODES_SHOWN = 4
"""Episodes per split drawn in ``plots/episodes.png``."""


def describe(config: RunConfig, store: Store) -> str:
    """The run's description: algorithm, task, network, training length and store, in one paragraph."""
    spec, t = config.task_spec, config.train
    shots = f" {config.task.ways}-way {config.task.shots}-shot" if isinstance(config.task, ImageTask) else ""
    return (
        f"{config.algorithm.name} on {spec.family}{shots} ({spec.kind}), network {config.model.network}: "
        f"{t.steps} steps of meta-batch {t.meta_batch} over {t.workers} worker(s), {t.mode} updates; validation every "
        f"{t.val_every} steps on {t.val_episodes} episodes, meta-test on {t.test_episodes}. Episodes: {store.path}."
    )


def log_export(
    tracker: Tracker, params: Params, config: RunConfig, test: EvalResult, out: Path, example: Episodes, state: Carry | None = None
) -> Path:
    """Write the export directory of ``params`` and the meta-test ``state`` (pipeline.export.directory.export) to
    ``out`` (artifact ``export/``) and log it as the run's MLflow pyfunc model ``model``, whose input example is a
    request made of ``example``'s first episode."""
    out = export(params, config, out, test_metrics(test), state)
    tracker.log_artifacts(out, "export")
    log_pyfunc(tracker, out, example)
    return out


def log_pyfunc(tracker: Tracker, export_dir: Path, example: Episodes) -> None:
    """Log the export as the run's pyfunc model ``model`` (models from code: nothing is pickled), with a signature
    and an input example made of ``example``'s first episode."""
    from pipeline.export.pyfunc import model_arguments

    tracker.log_model(MODEL_PATH, **model_arguments(export_dir, example))
