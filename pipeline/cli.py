"""``python -m pipeline COMMAND``: one entry point, one ``_add_<command>`` function per subcommand.

Each ``_add_<command>(subparsers)`` declares its arguments and sets ``func``, a
function of the parsed arguments that returns the exit status. Errors a user can
fix (bad config, bad store, missing data) print one paragraph to stderr and exit 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config
from pipeline.errors import CheckpointError, ExportError, RunError, TrackingError, TrainingError
from tasks.errors import DatasetError, StoreError

USER_ERRORS = (ConfigError, StoreError, DatasetError, CheckpointError, ExportError, RunError)


def _precompute(args: argparse.Namespace) -> int:
    from tasks.store import precompute

    config = load_config(args.config, args.set)
    store = precompute(config, out=args.out, episodes=args.episodes, seed=args.seed, force=args.force)
    counts = ", ".join(f"{split} {store.episodes(split)}" for split in ("train", "val", "test"))
    print(f"store {store.path}: {counts} episodes ({store.config.task.name}, seed {store.manifest['seed']})")
    return 0


def _add_precompute(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("precompute", help="sample every split of a config into a Parquet episode store")
    p.add_argument("config", help="run config YAML (its task and store sections are used)")
    p.add_argument("--out", help="store location, a folder or s3://bucket/prefix (default: store.path)")
    p.add_argument("--episodes", type=int, help="training episodes (default: store.train_episodes)")
    p.add_argument("--seed", type=int, help="sampling seed (default: store.seed)")
    p.add_argument("--force", action="store_true", help="replace a store made for another config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. task.ways=20")
    p.set_defaults(func=_precompute)


def _inspect(args: argparse.Namespace) -> int:
    import json

    from tasks.grid import episode_grid
    from tasks.store import open_store

    store = open_store(args.store)
    print(f"store {store.path} (schema {store.manifest['schema_version']}, seed {store.manifest['seed']})")
    print("config:", json.dumps(store.manifest["config"], indent=2))
    counts = store.verify()
    for split, count in counts.items():
        info = store.manifest["splits"][split]
        print(f"  {split:5s} {count:>9d} episodes  {len(info['shards'])} shards  layout {info['layout']}  verified")
    if store.distribution.is_image and counts["train"]:
        grid = Path(args.grid or f"{Path(store.path.rstrip('/')).name}-episodes.png")
        episode_grid(store.read_split("train", args.show)).save(grid)
        print(f"grid of {min(args.show, counts['train'])} training episodes: {grid}")
    return 0


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="print a store's counts and config, verify every file, draw episodes")
    p.add_argument("store", help="store folder or s3://bucket/prefix")
    p.add_argument("--grid", help="PNG file for the episode grid (default: ./<store name>-episodes.png)")
    p.add_argument("--show", type=int, default=4, help="episodes in the grid")
    p.set_defaults(func=_inspect)


def _download(args: argparse.Namespace) -> int:
    from torchvision.datasets import Omniglot

    from tasks.datasets import data_root

    target = data_root(args.root) / "omniglot"
    for background in (True, False):
        try:
            Omniglot(str(target), background=background, download=True)
        except (OSError, RuntimeError) as e:
            raise DatasetError(
                f"cannot download Omniglot into {target} ({e}); without internet, copy the two zips"
                " images_background.zip and images_evaluation.zip there instead"
            ) from None
    print(f"Omniglot in {target / 'omniglot-py'}")
    return 0


def _add_download(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("download", help="fetch a data set with torchvision (needs internet)")
    p.add_argument("dataset", choices=["omniglot"])
    p.add_argument("--root", help="data root (default: $METAPIPE_DATA, else ../shared/data)")
    p.set_defaults(func=_download)


def _submit(args: argparse.Namespace) -> int:
    from pipeline.submit import SubmitError, submit

    try:
        return submit(args.config, args.set, args.address, follow_logs=args.follow, run_timeout=args.run_timeout)
    except SubmitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _add_submit(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.submit import DEFAULT_ADDRESS

    p = subparsers.add_parser("submit", help="run `train CONFIG` as a job on a Ray cluster (Ray Jobs API)")
    p.add_argument("config", help="run config YAML inside the project (the job sees the project folder)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
                   help=f"Ray dashboard (jobs) address (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    p.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its status")
    p.add_argument("--run-timeout", type=float, default=600.0,
                   help="without --follow: seconds to wait for the run id before returning")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.steps=100")
    p.set_defaults(func=_submit)


def _train(args: argparse.Namespace) -> int:
    from pipeline.driver import train

    overrides = [f"{key}={value}" for key, value in (("train.workers", args.workers), ("train.steps", args.steps), ("seed", args.seed)) if value is not None]
    config = load_config(args.config, overrides + args.set)
    try:
        result = train(config, resume=args.resume, export_dir=args.export)
    except (TrainingError, TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(f"test {result.test}")
    print(f"exported to {result.export_dir} (MLflow run {result.run_id}, artifacts export/ and model/)")
    return 0


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="meta-train on Ray, track in MLflow, test and export")
    p.add_argument("config", help="run config YAML")
    p.add_argument("--workers", type=int, help="episode workers (train.workers)")
    p.add_argument("--steps", type=int, help="meta-iterations (train.steps)")
    p.add_argument("--seed", type=int, help="run seed (seed)")
    p.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint")
    p.add_argument("--export", metavar="DIR", help="also write the export directory here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. algorithm.inner_lr=0.4")
    p.set_defaults(func=_train)


def _evaluate(args: argparse.Namespace) -> int:
    from pipeline.evaluation import evaluate
    from pipeline.learners import build_learner
    from pipeline.runs import load_run
    from tasks.store import open_store

    config, params = load_run(args.run_id, args.tracking_uri, args.checkpoint, args.set)
    episodes = open_store(config.store.path).read_split("test", limit=args.episodes)
    print(f"run {args.run_id} ({args.checkpoint} checkpoint): test {evaluate(build_learner(config), params, episodes)}")
    return 0


def _add_evaluate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("evaluate", help="meta-test a run's checkpoint: mean and 95%% interval")
    p.add_argument("run_id")
    p.add_argument("--episodes", type=int, default=600, help="held-out test episodes (default 600)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. algorithm.eval_inner_steps=10")
    p.set_defaults(func=_evaluate)


def _export(args: argparse.Namespace) -> int:
    from pipeline.export import export
    from pipeline.runs import load_run

    if args.out is None and args.register is None:
        raise ConfigError("export: give --out DIR, --register NAME, or both")
    if args.out:
        config, params = load_run(args.run_id, args.tracking_uri, args.checkpoint)
        print(f"exported run {args.run_id} ({args.checkpoint} checkpoint) to {export(params, config, args.out)}")
    if args.register:
        from pipeline.config import TrackingConfig
        from pipeline.registry import RegistryError, register
        from pipeline.tracking import tracking_uri

        try:
            version = register(args.run_id, args.register, tracking_uri(TrackingConfig(uri=args.tracking_uri)))
        except RegistryError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"registered models:/{version.name}/{version.version}")
    return 0


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="write a run's meta-learner to a directory and/or register it in MLflow")
    p.add_argument("run_id")
    p.add_argument("--out", metavar="DIR", help="export directory, loadable with pipeline.load(DIR)")
    p.add_argument("--register", metavar="NAME", help="register the run's MLflow model as a version of NAME")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best")
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    p.set_defaults(func=_export)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="metapipe: distributed meta-training")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_precompute, _add_inspect, _add_download, _add_train, _add_evaluate, _add_export, _add_submit):
        add(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
