"""What happens around the step loop: validation and the best checkpoint, periodic checkpoints, metrics and
progress after each step; the meta-test, the figures and the export at the run's end.

Each step callback gets the step's ``StepEnd`` and may add metrics to it; the loop
calls them in the order given (validation first, so its metrics are logged with
the step's). They reach the server and the workers only through the ``Pool`` and
tracking only through the ``Tracker`` protocol.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tqdm import tqdm

from pipeline.config import RunConfig
from pipeline.evaluation import EvalResult, evaluate
from pipeline.export.directory import export, factory_code
from pipeline.runtime import checkpoint
from pipeline.runtime.flat_buffer import Layout
from pipeline.runtime.pool import Pool, Positions
from pipeline.runtime.ray_env import REPO_ROOT
from pipeline.runtime.server import ServerState
from pipeline.runtime.worker import StepReport
from pipeline.tracking.plots import log_figure
from pipeline.tracking.tracker import Tracker
from pipeline.types import Illustrated, MetaLearner, Params
from tasks.episodes import Episodes


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
        """The best checkpoint this process wrote, if any."""
        path = self._scratch / "best"
        return checkpoint.load(path) if path.exists() else None


class Validation:
    """Every ``every`` steps and at the last: evaluate on the fixed validation episodes (``val/*``); a better
    result than any before is saved as checkpoints/best."""

    def __init__(
        self, learner: MetaLearner, layout: Layout, episodes: Episodes, every: int, pool: Pool, checkpoints: Checkpoints
    ) -> None:
        self._learner, self._layout, self._episodes = learner, layout, episodes
        self._every, self._pool, self._checkpoints = every, pool, checkpoints

    def on_step(self, step: StepEnd) -> None:
        if step.version % self._every and not step.last:
            return
        result = evaluate(self._learner, current_params(self._pool, self._layout), self._episodes)
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
            self._tracker.log_metrics(step.metrics, step=step.version)


class PeriodicCheckpoint:
    """Writes checkpoints/latest every ``every`` steps and at the last."""

    def __init__(self, checkpoints: Checkpoints, every: int) -> None:
        self._checkpoints, self._every = checkpoints, every

    def on_step(self, step: StepEnd) -> None:
        if step.version % self._every == 0 or step.last:
            self._checkpoints.save("latest")


class Progress:
    """Moves a progress bar to the step's version and shows its loss, accuracy and throughput."""

    SHOWN = ("train/loss", "train/accuracy", "val/accuracy", "val/mse")

    def __init__(self, bar: tqdm) -> None:
        self._bar = bar

    def on_step(self, step: StepEnd) -> None:
        self._bar.update(step.version - self._bar.n)  # back after a server restore
        shown = {k.split("/")[1]: round(v, 4) for k, v in step.metrics.items() if k in self.SHOWN}
        self._bar.set_postfix(**shown, eps=round(step.metrics["throughput/episodes_per_s"], 1))


def test_metrics(result: EvalResult) -> dict[str, float]:
    """``test/<metric>``, ``test/<metric>_ci95`` and ``test/episodes`` of a meta-test."""
    return {f"test/{result.metric}": result.mean, f"test/{result.metric}_ci95": result.ci95, "test/episodes": result.n}


def log_test(tracker: Tracker, learner: MetaLearner, params: Params, episodes: Episodes, step: int, scratch: Path) -> EvalResult:
    """Meta-test ``params`` on ``episodes``: ``test/*`` metrics at ``step`` and ``test_results.json``."""
    result = evaluate(learner, params, episodes)
    tracker.log_metrics(test_metrics(result), step=step)
    table = scratch / "test_results.json"
    table.write_text(json.dumps({"metric": result.metric, "mean": result.mean, "ci95": result.ci95, "episodes": result.n}, indent=1))
    tracker.log_artifact(table)
    return result


def log_learner_figures(tracker: Tracker, learner: MetaLearner, params: Params, episodes: Episodes, scratch: Path) -> None:
    """The learner's own figures (e.g. the Meta-LSTM's gates) under ``plots/``, when it draws any."""
    if isinstance(learner, Illustrated):
        for name, figure in learner.figures(params, episodes).items():
            log_figure(tracker, name, figure, scratch)


def log_export(tracker: Tracker, params: Params, config: RunConfig, test: EvalResult, out: Path, scratch: Path) -> Path:
    """Write the export directory to ``out`` (artifact ``export/``) and log it as an MLflow pyfunc model (``model/``)."""
    out = export(params, config, out, test_metrics(test))
    tracker.log_artifacts(out, "export")
    log_pyfunc(tracker, out, scratch / "model")
    return out


def log_pyfunc(tracker: Tracker, export_dir: Path, scratch: Path) -> None:
    """Save the export as an MLflow pyfunc model (models from code: nothing is pickled) and log it under ``model``."""
    import mlflow.pyfunc

    if scratch.exists():
        shutil.rmtree(scratch)
    mlflow.pyfunc.save_model(
        path=str(scratch),
        python_model=str(REPO_ROOT / "pipeline" / "export" / "pyfunc.py"),
        artifacts={"export": str(export_dir)},
        code_paths=[str(REPO_ROOT / "pipeline"), str(REPO_ROOT / "tasks"), *map(str, factory_code(export_dir))],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "pydantic", "pyyaml", "pyarrow", "pillow"],
    )
    tracker.log_artifacts(scratch, "model")
