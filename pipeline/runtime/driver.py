"""The driver: ``train`` a config end to end.

It starts (or joins) Ray, precomputes the episode store when it is missing, reserves
the server's and the workers' resources as one placement group (refused, naming
what is missing, when the cluster cannot hold them), opens the MLflow run, starts
the parameter server and workers (``RayPool``) and runs the step loop with its
callbacks: validation on fixed validation episodes every
``train.val_every`` steps (the best parameters kept as checkpoints/best),
metrics every ``train.log_every``, checkpoints/latest every
``train.checkpoint_every`` (a parameter server that dies is restored from the last
one). It ends with the meta-test of the best parameters (mean and 95% CI over
``train.test_episodes`` held-out episodes; a learner that evaluates from a carry, as
Reptile with ``eval_state: carried``, adapts them from the best checkpoint's worker slot 0
carry: evaluation.meta_test_state), the figures, an export directory and
an MLflow pyfunc model. A run that fails or is interrupted still gets its learning
curve and is marked FAILED or KILLED.
"""
from __future__ import annotations

import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pipeline.build import build_learner
from pipeline.config import RunConfig, validate
from pipeline.errors import CheckpointError, ConfigError, RunError, Terminated
from pipeline.evaluation import EvalResult, meta_test_state
from pipeline.runtime import checkpoint
from pipeline.runtime.callbacks import (
    Checkpoints,
    LearningCurve,
    MetricsLog,
    PeriodicCheckpoint,
    RestorePoint,
    Validation,
    current_params,
    log_export,
    log_learner_figures,
    log_run_start,
    log_test,
)
from pipeline.runtime.flat_buffer import Layout
from pipeline.runtime.loop import StepLoop
from pipeline.runtime.placement import Placement
from pipeline.runtime.policy import FailurePolicy
from pipeline.runtime.pool import Pool, Positions, RayPool, ended_version
from pipeline.runtime.progress import Progress
from pipeline.runtime.ray_env import start_ray
from pipeline.runtime.server import ParameterServer, ServerState
from pipeline.runtime.system_metrics import SystemMetrics
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.tracking.plots import CURVE_KEYS, log_learning_curve
from pipeline.tracking.tracker import Tracker, flatten
from pipeline.types import Carry, Params
from tasks.store.parquet import Store, precompute

if TYPE_CHECKING:
    from matplotlib.figure import Figure

StartPool = Callable[[ServerState, Positions, FailurePolicy], Pool]
"""Starts the server from a state and the workers at reader positions, under a failure policy."""


@dataclass(frozen=True)
class TrainResult:
    """Where the run is tracked, how it tested and where its export went."""

    run_id: str
    steps: int
    test: EvalResult
    export_dir: Path


def train(
    config: RunConfig, resume: str | None = None, export_dir: str | Path | None = None, progress: bool = True
) -> TrainResult:
    """Meta-train ``config`` on Ray end to end; ``resume`` (an MLflow run id) continues that run from its
    checkpoints/latest.

    Raises ConfigError (``resume`` with another config), TrainingError (the run cannot go on),
    TrackingError (MLflow refused a write or stayed unreachable), StoreError, and
    KeyboardInterrupt (Ctrl-C) or Terminated (SIGTERM) after writing a final checkpoint.
    """
    resumed, ckpt = open_resumed(config, resume) if resume else (None, None)  # refused before Ray starts
    resources = start_ray(config)  # refuses a local store.path on a cluster of several nodes
    store = precompute(config, progress=progress)  # when the store is missing; refuses one made for another config
    placement = Placement.reserve(config, resources)
    try:
        tracker = resumed or MlflowTracker(config.tracking, config.name)

        def start_pool(state: ServerState, positions: Positions, policy: FailurePolicy) -> Pool:
            return RayPool(config, placement, state, positions, policy)

        interval = config.tracking.system_metrics_s
        monitors = SystemMetrics(tracker.run_id, tracker.uri, interval, resume=resume is not None) if interval else None
        try:
            with _sigterm_as_interrupt():
                return run(config, store, tracker, start_pool, resume=ckpt, export_dir=export_dir, progress=progress)
        finally:
            if monitors:
                monitors.stop()
    finally:
        placement.remove()


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While training, SIGTERM raises ``Terminated`` (a KeyboardInterrupt), so it ends the run as Ctrl-C does.

    ``ray.init`` installs a SIGTERM handler that calls ``sys.exit``: under it ``ray job stop``, a
    scheduler's or ``timeout``'s SIGTERM would end the run FAILED without a final checkpoint. Python
    lets only the main thread set handlers; elsewhere Ray's stays. Ray's comes back afterwards.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise Terminated(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(
    config: RunConfig,
    store: Store,
    tracker: Tracker,
    start_pool: StartPool,
    resume: checkpoint.Checkpoint | None = None,
    export_dir: str | Path | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train on ``store``'s episodes and the pool ``start_pool`` makes (Ray's, or ``LocalPool`` in this process),
    tracked by ``tracker``.

    ``resume``: continue the tracker's run from this checkpoint (``resumed_checkpoint``'s: its checkpoints/latest,
    checked against ``config``). Raises as ``train``.
    """
    learner = build_learner(config)
    initial = learner.init(config.seed)
    layout = Layout.of(initial)
    scratch = Path(tempfile.mkdtemp(prefix=f"metapipe-{tracker.run_id[:8]}-"))
    if resume is not None:
        state, positions, best_val = _resume(resume, tracker, scratch)
    else:
        state = ParameterServer.fresh(layout.flatten(initial))
        positions, best_val = [None] * config.train.workers, None
        tracker.log_params(flatten(config.model_dump(mode="json")))
        tracker.set_tag("metapipe.algorithm", config.algorithm.name)
        log_run_start(tracker, config, store, scratch)
    t = config.train
    policy = FailurePolicy(t.max_bad_grads)
    pool = start_pool(state, positions, policy)
    checkpoints = Checkpoints(pool, tracker, scratch, config, best_val, RestorePoint(state, list(positions)))
    print(f"run_id: {tracker.run_id}", flush=True)
    start = ended_version(state)  # below state.version when a share landed but its report never came
    shown = Progress(t.steps, start, t.log_every, enabled=progress)
    callbacks = [
        Validation(_eval_count(store, "val", t.val_episodes), t.val_every, pool, checkpoints, learner),
        LearningCurve(tracker, scratch, {key: tracker.metric_history(key) for key in CURVE_KEYS} if resume is not None else {}),
        MetricsLog(tracker, t.log_every),
        PeriodicCheckpoint(checkpoints, t.checkpoint_every),
        shown,
    ]
    loop = StepLoop(pool, policy, checkpoints, callbacks, t, start)
    try:
        try:
            loop.run()
        finally:
            shown.close()
    except KeyboardInterrupt as e:
        try:
            checkpoints.save("latest")
            print(f"{_stopped(e)} at step {loop.version}: checkpoint written, run marked KILLED", file=sys.stderr)
        except (Exception, KeyboardInterrupt) as err:  # the actors may have received the signal too, or a second one came
            why = "a second signal" if isinstance(err, KeyboardInterrupt) else err
            print(f"{_stopped(e)}; the final checkpoint failed ({why}), the last periodic one stands", file=sys.stderr)
        _end_early(pool, tracker, scratch, "KILLED")
        raise
    except BaseException:
        _end_early(pool, tracker, scratch, "FAILED")
        raise
    try:
        best = checkpoints.best()
        params = layout.unflatten(best.server.params) if best else current_params(pool, layout)
        state = meta_test_state(learner, best.positions if best else pool.positions)  # the best's own, as validated
        flat = layout.flatten(params).numpy()
        count = _eval_count(store, "test", t.test_episodes)
        with shown.evaluating("meta-test", count):
            test = pool.evaluate("test", count, flat, state)
        figures = pool.figures(flat, state)
        out = Path(export_dir or scratch / "export")
        test = _end_finished(config, store, params, state, test, figures, tracker, loop.version, out, scratch)
        return TrainResult(tracker.run_id, loop.version, *test)
    except KeyboardInterrupt as e:  # training is over and checkpointed: what is left can be done from the run
        print(
            f"{_stopped(e)} after the last step, during the meta-test and export: run marked KILLED; its checkpoints"
            f" stand (pipeline evaluate {tracker.run_id}, pipeline export {tracker.run_id} --out DIR)",
            file=sys.stderr,
        )
        _end_early(pool, tracker, scratch, "KILLED")
        raise
    except BaseException:
        _end_early(pool, tracker, scratch, "FAILED")
        raise
    finally:
        pool.stop()


def _stopped(interrupt: KeyboardInterrupt) -> str:
    """How the run was stopped, for its last message."""
    return "terminated (SIGTERM)" if isinstance(interrupt, Terminated) else "interrupted"


def _eval_count(store: Store, split: str, asked: int) -> int:
    """How many of ``split``'s episodes an evaluation uses: ``asked``, or all the store holds (with a warning)."""
    held = store.episodes(split)
    if asked > held:
        warnings.warn(f"asked for {asked} {split} episodes, {store.path} holds {held}: using {held}", stacklevel=2)
    return min(asked, held)


def _end_finished(
    config: RunConfig,
    store: Store,
    params: Params,
    state: Carry | None,
    test: EvalResult,
    figures: dict[str, Figure],
    tracker: Tracker,
    step: int,
    export_dir: Path,
    scratch: Path,
) -> tuple[EvalResult, Path]:
    """Log the meta-test ``test`` of ``params`` (every task adapted from ``state``) and the learner's ``figures``
    (both from the workers), the export of both (its input example from the store's first test episode), and mark
    the run FINISHED; the test and the export's folder."""
    log_test(tracker, test, step, scratch)
    log_learner_figures(tracker, figures, scratch)
    out = log_export(tracker, params, config, test, export_dir, store.read_split("test", limit=1), state)
    tracker.finish("FINISHED")
    return test, out


def _resume(ckpt: checkpoint.Checkpoint, tracker: Tracker, scratch: Path) -> tuple[ServerState, Positions, float | None]:
    """The server state, reader positions and best validation of ``ckpt`` (the run's checkpoints/latest); marks the
    tracker's run running.

    The run's checkpoints/best goes to ``scratch``/best, where ``Checkpoints.best`` looks: a sitting that validates
    nothing better meta-tests and exports the run's best so far, not its last parameters. When that checkpoint
    cannot be read (a run stopped while uploading it), a warning says so and the best validation restarts from
    this sitting's first, so that this sitting writes a best of its own.
    """
    print(f"resuming run {tracker.run_id} after step {ended_version(ckpt.server)}", file=sys.stderr)
    tracker.mark_running()
    tracker.set_tag("metapipe.resumed_from_step", str(ended_version(ckpt.server)))
    best_val = ckpt.best_val
    if best_val is not None:
        try:
            found = tracker.download("checkpoints/best", scratch / "resumed")
            checkpoint.load(found)  # refuses one whose upload was cut short: its tensors miss their sha256
        except (RunError, CheckpointError) as e:
            warnings.warn(f"resuming without the run's best checkpoint ({e}): the best is this sitting's", stacklevel=2)
            best_val = None
        else:
            found.rename(scratch / "best")
    return ckpt.server, ckpt.positions, best_val


def open_resumed(config: RunConfig, run_id: str) -> tuple[MlflowTracker, checkpoint.Checkpoint]:
    """The MLflow run ``run_id`` and its checkpoints/latest checked against ``config``; nothing is written.

    Raises RunError (no such run) and the errors of ``resumed_checkpoint``.
    """
    tracker = MlflowTracker(config.tracking, config.name, run_id=run_id)
    with tempfile.TemporaryDirectory(prefix=f"metapipe-{run_id[:8]}-") as scratch:  # the checkpoint is read into memory
        return tracker, resumed_checkpoint(config, tracker, Path(scratch))


def resumed_checkpoint(config: RunConfig, tracker: Tracker, scratch: Path) -> checkpoint.Checkpoint:
    """The run's checkpoints/latest (downloaded under ``scratch``), checked against ``config``.

    Raises ConfigError (a user's mistake: exit status 2, the run left as it was) when ``config`` differs from the
    checkpoint's (train.steps, description and tracking aside; a key the checkpoint's config lacks, a setting added
    since, compares at its default), naming the keys, or when the checkpoint's config no longer validates.
    """
    ckpt = checkpoint.load(tracker.download("checkpoints/latest", scratch / "resume"))
    # validated, so a setting added since the checkpoint was written compares at its default
    theirs = validate(ckpt.config, f"in checkpoints/latest of run {tracker.run_id}").model_dump(mode="json")
    mine = dict(config.model_dump(mode="json"))
    for c in (mine, theirs):
        c["train"] = {k: v for k, v in c["train"].items() if k != "steps"}
        for key in ("description", "tracking"):  # how the run is described and tracked, not what it trains
            c.pop(key, None)
    if mine != theirs:
        now, then = flatten(mine), flatten(theirs)
        diff = [f"{k} (checkpoint {then.get(k)}, now {now.get(k)})" for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
        raise ConfigError(f"--resume {tracker.run_id}: config differs from the checkpoint's at {', '.join(diff)}")
    return ckpt


def _end_early(pool: Pool, tracker: Tracker, scratch: Path, status: str) -> None:
    """Stop the actors, draw the learning curve so far (best effort) and mark the run ``status``. A further signal
    meanwhile (Ctrl-C pressed again) cuts the stopping or the drawing short, never the marking: the run is not left
    RUNNING."""
    try:
        pool.stop()
        try:
            log_learning_curve(tracker, scratch)
        except Exception as e:  # noqa: BLE001 - the run's own error is the one to report
            print(f"no learning curve for this {status} run: {e}", file=sys.stderr)
    finally:
        tracker.finish(status)
