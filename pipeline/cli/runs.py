"""Run commands: ``train`` a config, ``evaluate`` and ``export`` a tracked run, list the tracked ``runs``."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from pipeline.cli.configs import CONFIG_HELP, config_file
from pipeline.config import TrackingConfig, load_config
from pipeline.errors import ConfigError, RunError, Terminated, TrackingError, TrainingError

RUN_ID_HELP = "MLflow run id, as train prints it (python -m pipeline runs lists them)"


def at_least_one(text: str) -> int:
    """An argparse type: an integer of at least 1 (argparse names the flag and exits 2 otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _train(args: argparse.Namespace) -> int:
    from pipeline.runtime.driver import train

    overrides = [f"{key}={value}" for key, value in (("train.workers", args.workers), ("train.steps", args.steps), ("seed", args.seed)) if value is not None]
    config = load_config(args.config, overrides + args.set)
    try:
        result = train(config, resume=args.resume, export_dir=args.export, progress=not args.quiet)
    except (TrainingError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Terminated:
        return 143  # 128 + SIGTERM, as a shell reports it
    except KeyboardInterrupt:
        return 130
    print(f"test {result.test}")
    print(f"exported to {result.export_dir} (MLflow run {result.run_id}, artifact export/, logged model 'model')")
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="meta-train on Ray, track in MLflow, test and export")
    p.add_argument("config", type=config_file, help=CONFIG_HELP)
    p.add_argument("--workers", type=int, help="episode workers (train.workers)")
    p.add_argument("--steps", type=int, help="meta-iterations (train.steps)")
    p.add_argument("--seed", type=int, help="run seed (seed)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint")
    p.add_argument("--export", metavar="DIR", help="also write the export directory here")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines (the run id and results still print)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. algorithm.inner_lr=0.4")
    p.set_defaults(func=_train)


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.build import build_learner
    from pipeline.evaluation import evaluate
    from pipeline.runtime.runs import load_run
    from tasks.store.parquet import open_store

    config, params, state = load_run(args.run_id, args.tracking_uri, args.checkpoint, args.set)
    episodes = open_store(config.store.path).read_split("test", limit=args.episodes)
    start = "" if state is None else ", every task from the carried inner state"
    print(f"run {args.run_id} ({args.checkpoint} checkpoint{start}): test {evaluate(build_learner(config), params, episodes, state)}")
    return 0


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="meta-test a run's checkpoint: mean and 95%% interval")
    p.add_argument("run_id", help=RUN_ID_HELP)
    p.add_argument("--episodes", type=at_least_one, default=600, help="held-out test episodes (default 600)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. algorithm.eval_inner_steps=10")
    p.set_defaults(func=_evaluate)


def _export(args: argparse.Namespace) -> int:
    from pipeline.export.directory import export
    from pipeline.runtime.runs import load_run

    if args.out is None and args.register is None:
        raise ConfigError("export: give --out DIR, --register NAME, or both")
    if args.set and not args.out:
        raise ConfigError(f"export --set {' '.join(args.set)}: --set changes the --out DIR export; --register registers the model the run logged")
    if args.out:
        config, params, state = load_run(args.run_id, args.tracking_uri, args.checkpoint, args.set)
        print(f"exported run {args.run_id} ({args.checkpoint} checkpoint) to {export(params, config, args.out, state=state)}")
    if args.register:
        from pipeline.tracking.mlflow_tracker import tracking_uri
        from pipeline.tracking.model_registry import register

        version = register(args.run_id, args.register, tracking_uri(TrackingConfig(uri=args.tracking_uri)))
        print(f"registered models:/{version.name}/{version.version}")
    return 0


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write a run's meta-learner to a directory and/or register it in MLflow")
    p.add_argument("run_id", help=RUN_ID_HELP)
    p.add_argument("--out", metavar="DIR", help="export directory, loadable with pipeline.load(DIR)")
    p.add_argument("--register", metavar="NAME", help="register the run's MLflow model as a version of NAME")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for --out: how the export adapts, e.g. algorithm.eval_inner_steps=10")
    p.set_defaults(func=_export)


def _runs(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.mlflow_tracker import tracking_uri

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # an unreachable server: said at once, not after minutes
    uri = tracking_uri(TrackingConfig(uri=args.tracking_uri))
    database = uri.removeprefix("sqlite:///")
    if uri.startswith("sqlite:///") and not Path(database).exists():  # MlflowClient would create an empty one
        raise RunError(f"no MLflow store at {uri} ({Path(database).resolve()} does not exist): no run was tracked from here")
    client = MlflowClient(uri)
    try:
        if args.experiment:
            experiment = client.get_experiment_by_name(args.experiment)
            if experiment is None:
                raise RunError(f"--experiment {args.experiment!r}: no such experiment at {uri}")
            ids = [experiment.experiment_id]
        else:
            ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, order_by=["attributes.start_time DESC"], max_results=args.limit) if ids else []
    except MlflowException as e:
        raise RunError(f"cannot list the runs at {uri}: {e.message}") from None
    print(f"{'run id':32s}  {'started (UTC)':16s}  {'status':8s}  {'test':24s}  name")
    for run in runs:
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime(run.info.start_time / 1000))
        print(f"{run.info.run_id:32s}  {started:16s}  {run.info.status:8s}  {test_summary(run.data.metrics):24s}  {run.info.run_name}")
    print(f"{len(runs)} most recent runs at {uri}" + (f", experiment {args.experiment}" if args.experiment else ""))
    return 0


def test_summary(metrics: dict[str, float]) -> str:
    """A run's meta-test result from its ``test/*`` metrics (``accuracy 88.21% +- 0.60%``), or ``-`` without one."""
    for metric in ("accuracy", "mse"):
        if f"test/{metric}" in metrics:
            mean, ci95 = metrics[f"test/{metric}"], metrics.get(f"test/{metric}_ci95", float("nan"))
            if metric == "accuracy":
                return f"accuracy {100 * mean:.2f}% +- {100 * ci95:.2f}%"
            return f"mse {mean:.4f} +- {ci95:.4f}"
    return "-"


def _add_runs(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("runs", help="list the most recent tracked runs: id, start, status, test result, name")
    p.add_argument("--experiment", help="only this MLflow experiment (default: all)")
    p.add_argument("--limit", type=at_least_one, default=20, help="runs to list, newest first (default 20)")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.set_defaults(func=_runs)
