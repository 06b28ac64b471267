"""The driver: starts the parameter server and workers, runs the step loop, and tracks the run.

It validates on fixed validation episodes every ``train.val_every`` steps, keeps
the best parameters, checkpoints every ``train.checkpoint_every`` steps (a
parameter server that dies is restored from the last one), and ends with the
meta-test (mean and 95% CI over ``train.test_episodes`` held-out episodes), an
export directory and an MLflow pyfunc model.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError
from tqdm import tqdm

from pipeline.build import build_learner
from pipeline.config import RunConfig
from pipeline.errors import TrainingError
from pipeline.evaluation import EvalResult, evaluate
from pipeline.export.directory import export
from pipeline.runtime import checkpoint
from pipeline.runtime.flat_buffer import Layout
from pipeline.runtime.pool import ServerLost, WorkerPool
from pipeline.runtime.server import ParameterServer, ServerState
from pipeline.runtime.worker import MALLOC_ENV, StepReport
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.tracking.plots import log_learning_curve
from pipeline.tracking.tracker import Tracker, flatten
from pipeline.types import Illustrated
from tasks.episodes import Episodes
from tasks.store.parquet import precompute

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_SERVER_RESTORES = 3
"""Server restores in a row with no new checkpoint between them before the run gives up."""


@dataclass(frozen=True)
class TrainResult:
    """Where the run is tracked, how it tested and where its export went."""

    run_id: str
    steps: int
    test: EvalResult
    export_dir: Path


def check_gpus(config: RunConfig, gpus: float) -> None:
    """Refuse a run whose workers need more GPUs than there are (with no GPU at all, workers use CPUs)."""
    need = config.train.workers * config.train.gpus_per_worker
    if gpus and need > gpus:
        raise TrainingError(
            f"train.workers x train.gpus_per_worker = {config.train.workers} x {config.train.gpus_per_worker} "
            f"needs {need:g} GPUs, there are {gpus:g}"
        )


def start_ray(config: RunConfig) -> dict[str, float]:
    """Connect to $RAY_ADDRESS (a cluster) or start an embedded local Ray; return its resources."""
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        check_gpus(config, torch.cuda.device_count())  # before Ray starts; a cluster is checked once joined
    if not ray.is_initialized():
        env = {"env_vars": {**MALLOC_ENV, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=True)
        else:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, runtime_env=env)
    resources = ray.cluster_resources()
    check_gpus(config, resources.get("GPU", 0.0))
    return resources


def summarize(reports: list[StepReport], wall: float) -> dict[str, float]:
    """Step metrics weighted by episode count, the time split, and throughput."""
    total = sum(r.n_episodes for r in reports)
    out: dict[str, float] = {}
    for key in reports[0].metrics:
        out[f"train/{key}"] = sum(r.metrics[key] * r.n_episodes for r in reports) / total
    for key in reports[0].timings:
        out[f"time/{key}"] = sum(r.timings[key] for r in reports) / len(reports)
    busiest = max(sum(r.timings.values()) for r in reports)
    out["time/wait_s"] = max(wall - busiest, 0.0)
    out["time/step_s"] = wall
    out["throughput/episodes_per_s"] = total / wall
    out["server/staleness"] = sum(r.result.staleness for r in reports) / len(reports)
    return out


class Run:
    """One training run's mutable shell: the actors, the tracker and the best validation so far."""

    def __init__(self, config: RunConfig, resume: str | None, progress: bool) -> None:
        self.config = config
        self.progress = progress
        # Precomputes the store when it is missing; refuses one made for another config.
        self.store = precompute(config)
        self.learner = build_learner(config)
        self.layout = Layout.of(self.learner.init(config.seed))
        resources = start_ray(config)
        self.tracker = MlflowTracker(config.tracking, config.name, run_id=resume)
        self.scratch = Path(tempfile.mkdtemp(prefix=f"metapipe-{self.tracker.run_id[:8]}-"))
        self.val = self.store.read_split("val", limit=config.train.val_episodes)
        if resume:
            state, positions, self.best_val = self._restore()
        else:
            state = ParameterServer.fresh(self.layout.flatten(self.learner.init(config.seed)))
            positions = [None] * config.train.workers
            self.best_val = None
            self.tracker.log_params(flatten(config.model_dump(mode="json")))
            self.tracker.set_tag("metapipe.algorithm", config.algorithm.name)
        self.server = self._start_server(state)
        self.workers = WorkerPool(config, resources, positions)
        self.version = state.version
        self.restore_point = (state, list(positions))
        self.server_restores = 0
        self.restores_in_a_row = 0
        self.steps_redone = 0

    def _start_server(self, state: ServerState) -> Any:
        t = self.config.train
        return (
            ray.remote(ParameterServer)
            .options(num_cpus=0)
            .remote(state, self.config.optimizer, t.steps, t.workers, t.mode, t.max_staleness)
        )

    def _restore_server(self, error: BaseException, bar: tqdm) -> None:
        """Replace a dead server by one from the last checkpoint; the workers restart at its positions."""
        self.restores_in_a_row += 1
        if self.restores_in_a_row > MAX_SERVER_RESTORES:
            raise TrainingError(f"the parameter server died {MAX_SERVER_RESTORES + 1} times with no checkpoint between: {error}") from error
        state, positions = self.restore_point
        redone = self.version - state.version
        print(
            f"parameter server died at step {self.version} ({type(error).__name__}); restoring it from the "
            f"checkpoint of step {state.version}: {redone} steps will be redone",
            file=sys.stderr,
        )
        ray.kill(self.server)
        self.server = self._start_server(state)
        self.workers.restart(positions)
        self.version = state.version
        self.server_restores += 1
        self.steps_redone += redone
        bar.n = self.version
        bar.refresh()

    def _restore(self) -> tuple[ServerState, list[dict | None], float | None]:
        ckpt = checkpoint.load(self.tracker.download("checkpoints/latest", self.scratch / "resume"))
        mine, theirs = dict(self.config.model_dump(mode="json")), dict(ckpt.config)
        for c in (mine, theirs):
            c["train"] = {k: v for k, v in c["train"].items() if k != "steps"}
        if mine != theirs:
            diff = sorted(k for k, v in flatten(mine).items() if flatten(theirs).get(k) != v)
            raise TrainingError(f"--resume {self.tracker.run_id}: config differs from the checkpoint's at {diff}")
        print(f"resuming run {self.tracker.run_id} from step {ckpt.server.version}", file=sys.stderr)
        self.tracker.mark_running()
        self.tracker.set_tag("metapipe.resumed_from_step", str(ckpt.server.version))
        return ckpt.server, ckpt.positions, ckpt.best_val

    def params(self) -> dict[str, torch.Tensor]:
        _, flat = ray.get(self.server.pull.remote())
        return self.layout.unflatten(torch.from_numpy(flat.copy()))

    def validate(self) -> dict[str, float]:
        result = evaluate(self.learner, self.params(), self.val)
        metrics = {f"val/{result.metric}": result.mean, f"val/{result.metric}_ci95": result.ci95}
        better = self.best_val is None or (result.mean > self.best_val if result.metric == "accuracy" else result.mean < self.best_val)
        if better:
            self.best_val = result.mean
            self.save_checkpoint("best")
        metrics["val/best"] = self.best_val
        return metrics

    def save_checkpoint(self, name: str) -> None:
        state = ray.get(self.server.state.remote())
        ckpt = checkpoint.Checkpoint(state, self.workers.positions, self.best_val, self.config.model_dump(mode="json"), {})
        self.restore_point = (state, list(self.workers.positions))
        self.restores_in_a_row = 0
        path = checkpoint.save(self.scratch / name, ckpt)
        self.tracker.log_artifacts(path, f"checkpoints/{name}")

    def loop(self) -> None:
        t = self.config.train
        bar = tqdm(total=t.steps, initial=self.version, disable=not self.progress, unit="step", file=sys.stderr)
        try:
            while self.version < t.steps:
                try:
                    if t.mode == "sync":
                        self._sync_loop(bar)
                    else:
                        self._async_loop(bar)
                except (ServerLost, RayActorError) as e:  # worker deaths are handled in the pool
                    self._restore_server(e, bar)
        finally:
            bar.close()

    def _after_step(self, reports: list[StepReport], wall: float, bar: tqdm) -> None:
        t = self.config.train
        stats = ray.get(self.server.stats.remote())
        if stats["bad_in_a_row"] >= t.max_bad_grads:
            self.save_checkpoint("latest")
            bad = [f"worker {r.worker_id} at version {r.version}: {r.result.reason}" for r in reports if not r.result.accepted]
            raise TrainingError(f"{stats['bad_in_a_row']} rejected gradients in a row (train.max_bad_grads={t.max_bad_grads}); last: {bad}")
        advanced = int(stats["version"]) - self.version
        self.version = int(stats["version"])
        if advanced <= 0:
            return
        bar.update(advanced)
        metrics = summarize(reports, wall)
        metrics.update({f"server/{k}": v for k, v in stats.items() if k not in ("version", "bad_in_a_row")})
        metrics["faults/worker_restarts"] = self.workers.restarts
        metrics["faults/server_restores"] = self.server_restores
        metrics["faults/steps_redone"] = self.steps_redone
        metrics["faults/tracking_outages"] = self.tracker.outages
        last = self.version >= t.steps
        if self.version % t.val_every == 0 or last:
            metrics.update(self.validate())
        if self.version % t.log_every == 0 or last or "val/best" in metrics:
            self.tracker.log_metrics(metrics, step=self.version)
        if self.version % t.checkpoint_every == 0 or last:
            self.save_checkpoint("latest")
        shown = {k.split("/")[1]: round(v, 4) for k, v in metrics.items() if k in ("train/loss", "train/accuracy", "val/accuracy", "val/mse")}
        bar.set_postfix(**shown, eps=round(metrics["throughput/episodes_per_s"], 1))

    def _sync_loop(self, bar: tqdm) -> None:
        while self.version < self.config.train.steps:
            start = time.perf_counter()
            reports = self.workers.step_all(self.server)
            self._after_step(reports, time.perf_counter() - start, bar)

    def _async_loop(self, bar: tqdm) -> None:
        n = len(self.workers.actors)
        started = {self.workers.submit(i, self.server): (i, time.perf_counter()) for i in range(n)}
        while self.version < self.config.train.steps:
            ready, _ = ray.wait(list(started), num_returns=1)
            i, start = started.pop(ready[0])
            report = self.workers.result(i, ready[0], self.server)
            self._after_step([report], time.perf_counter() - start, bar)
            if self.version < self.config.train.steps:
                started[self.workers.submit(i, self.server)] = (i, time.perf_counter())
        for ref, (i, _) in started.items():
            self.workers.result(i, ref, self.server)

    def finish(self, export_dir: str | Path | None) -> TrainResult:
        """Meta-test the best parameters, export them, log the model; returns the result."""
        best = checkpoint.load(self.scratch / "best") if (self.scratch / "best").exists() else None
        params = self.layout.unflatten(best.server.params) if best else self.params()
        test_set = self.store.read_split("test", limit=self.config.train.test_episodes)
        result = evaluate(self.learner, params, test_set)
        metrics = {f"test/{result.metric}": result.mean, f"test/{result.metric}_ci95": result.ci95, "test/episodes": result.n}
        self.tracker.log_metrics(metrics, step=self.version)
        table = self.scratch / "test_results.json"
        table.write_text(json.dumps({"metric": result.metric, "mean": result.mean, "ci95": result.ci95, "episodes": result.n}, indent=1))
        self.tracker.log_artifact(table)
        log_learning_curve(self.tracker, self.scratch)
        self._log_figures(params, test_set)
        out = export(params, self.config, export_dir or self.scratch / "export", metrics)
        self.tracker.log_artifacts(out, "export")
        log_pyfunc(self.tracker, out, self.scratch / "model")
        self.tracker.finish("FINISHED")
        return TrainResult(self.tracker.run_id, self.version, result, Path(out))

    def _log_figures(self, params: dict[str, torch.Tensor], episodes: Episodes) -> None:
        """The learner's own figures (e.g. the Meta-LSTM's gates), when it draws any."""
        if not isinstance(self.learner, Illustrated):
            return
        import matplotlib.pyplot as plt

        for name, figure in self.learner.figures(params, episodes).items():
            path = self.scratch / f"{name}.png"
            figure.savefig(path, dpi=80)
            plt.close(figure)
            self.tracker.log_artifact(path, "plots")

    def shutdown(self, status: str | None = None) -> None:
        self.workers.stop()
        ray.kill(self.server)
        if status:
            self.tracker.finish(status)


def log_pyfunc(tracker: Tracker, export_dir: Path, scratch: Path) -> None:
    """Save the export as an MLflow pyfunc model (models from code) and log it under ``model``."""
    import mlflow.pyfunc

    if scratch.exists():
        import shutil

        shutil.rmtree(scratch)
    mlflow.pyfunc.save_model(
        path=str(scratch),
        python_model=str(REPO_ROOT / "pipeline" / "export" / "pyfunc.py"),
        artifacts={"export": str(export_dir)},
        code_paths=[str(REPO_ROOT / "pipeline"), str(REPO_ROOT / "tasks")],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "pydantic", "pyyaml", "pyarrow", "pillow"],
    )
    tracker.log_artifacts(scratch, "model")


def train(
    config: RunConfig, resume: str | None = None, export_dir: str | Path | None = None, progress: bool = True
) -> TrainResult:
    """Meta-train ``config`` end to end; ``resume`` continues a run from its last checkpoint."""
    run = Run(config, resume, progress)
    print(f"run_id: {run.tracker.run_id}", flush=True)
    try:
        run.loop()
    except KeyboardInterrupt:
        try:
            run.save_checkpoint("latest")
            print(f"interrupted at step {run.version}: checkpoint written, run marked KILLED", file=sys.stderr)
        except Exception as e:  # the actors may have received the signal too
            print(f"interrupted; the final checkpoint failed ({e}), the last periodic one stands", file=sys.stderr)
        run.shutdown("KILLED")
        raise
    except BaseException:
        run.shutdown("FAILED")
        raise
    try:
        return run.finish(export_dir)
    finally:
        run.shutdown()
