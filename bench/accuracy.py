"""Meta-train in one process (the server and workers of a Ray run, without Ray) and meta-test.

The driver's own run (validation, best checkpoint, test, export) on ``LocalPool``:
the same ParameterServer, EpisodeWorker, store and evaluation as ``python -m pipeline
train``, for machines without Ray (e.g. a lent GPU box) and for quick accuracy
checks. Tracked in a SQLite MLflow under ``--workdir``.

    python -m bench.accuracy configs/omniglot_maml_5w1s.yaml --steps 2000
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pipeline.config import RunConfig, load_config
from pipeline.runtime.driver import TrainResult, run
from pipeline.runtime.local import LocalPool
from pipeline.tracking.mlflow_tracker import MlflowTracker
from tasks.store.parquet import precompute


def meta_train(config: RunConfig, workdir: Path) -> TrainResult:
    """Train ``config`` end to end in this process; its export goes to ``workdir/export``."""
    tracker = MlflowTracker(config.tracking, config.name)
    return run(
        config, precompute(config), tracker, lambda state, positions, _: LocalPool(config, state, positions),
        export_dir=workdir / "export",
    )


def load(args: argparse.Namespace, workdir: Path) -> RunConfig:
    """The config with ``--steps`` and ``--set`` applied, tracked in a SQLite MLflow under ``workdir``."""
    overrides = [f"tracking.uri=sqlite:///{workdir}/mlflow.db", *args.set]
    return load_config(args.config, overrides + ([f"train.steps={args.steps}"] if args.steps else []))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--workdir", type=Path, help="MLflow database and export (default: a new temporary folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    result = meta_train(load(args, workdir), workdir)
    print(f"test {result.test} after {result.steps} steps; export {result.export_dir}")


if __name__ == "__main__":
    main()
