"""``python -m pipeline COMMAND``: the one front door, one ``_add_<command>`` function per subcommand.

Each ``_add_<command>(subparsers)`` declares its arguments and sets ``func``, a
function of the parsed arguments that returns the exit status. The commands live
by concern: configs (configs, config), data (precompute, inspect, download), runs
(train, evaluate, export, runs), submit, baselines (baseline finetune|optimizers).
Errors a user can fix (every ``UserError``: bad config, bad store, missing data,
altered checkpoint or export) print one paragraph to stderr and exit 2.
"""
from __future__ import annotations

import argparse
import sys

from pipeline import __version__
from pipeline.cli.baselines import BASELINES, _add_baseline
from pipeline.cli.configs import _add_config, _add_configs
from pipeline.cli.data import _add_download, _add_inspect, _add_precompute
from pipeline.cli.runs import _add_evaluate, _add_export, _add_runs, _add_train
from pipeline.cli.submit import _add_submit
from tasks.errors import UserError


def parser() -> argparse.ArgumentParser:
    """The parser of every subcommand (``baseline NAME``'s own arguments are read by the baseline's parser)."""
    top = argparse.ArgumentParser(prog="python -m pipeline", description="metapipe: distributed meta-training")
    top.add_argument("--version", action="version", version=f"metapipe {__version__}")
    subparsers = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_configs, _add_config, _add_precompute, _add_inspect, _add_download, _add_train, _add_evaluate,
                _add_export, _add_runs, _add_submit, _add_baseline):
        add(subparsers)
    return top


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; the exit status."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["baseline"] and argv[1:2] and argv[1] in BASELINES:
            # the baseline's own parser reads the rest (argparse's REMAINDER drops a leading --flag)
            return BASELINES[argv[1]](argv[2:])
        args = parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
