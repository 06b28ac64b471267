"""``submit``: run ``train CONFIG`` as a job on a Ray cluster."""
from __future__ import annotations

import argparse
import os

from pipeline.cli.configs import config_file


def _submit(args: argparse.Namespace) -> int:
    from pipeline.runtime.submit import submit

    return submit(args.config, args.set, args.address, follow_logs=args.follow, run_timeout=args.run_timeout, resume=args.resume)


def _add_submit(subparsers: argparse._SubParsersAction) -> None:
    from pipeline.runtime.submit import DEFAULT_ADDRESS

    p = subparsers.add_parser("submit", help="run `train CONFIG` as a job on a Ray cluster (Ray Jobs API)")
    p.add_argument("config", type=config_file, help="run config YAML inside the project (the job sees the project folder), or a shipped config's name")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS,
                   help=f"Ray dashboard (jobs) address (default: $RAY_ADDRESS, else {DEFAULT_ADDRESS})")
    p.add_argument("--follow", action="store_true", help="stream the job's logs and exit with its status")
    p.add_argument("--resume", metavar="RUN_ID", help="continue this MLflow run from its last checkpoint (e.g. after ray job stop)")
    p.add_argument("--run-timeout", type=float, default=600.0,
                   help="without --follow: seconds to wait for the run id before returning")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. train.steps=100")
    p.set_defaults(func=_submit)
