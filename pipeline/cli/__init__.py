"""``python -m pipeline COMMAND``: the one front door, one ``_add_<command>`` function per subcommand.

Each ``_add_<command>(subparsers)`` declares its arguments and sets ``func``, a
function of the parsed arguments that returns the exit status. The commands live
by concern: data (precompute, inspect, download), runs (train, evaluate, export),
submit, baselines (finetune, baselines). Errors a user can fix (every
``UserError``: bad config, bad store, missing data, altered checkpoint or export)
print one paragraph to stderr and exit 2.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.cli.baselines import PASS_THROUGH, _add_baselines, _add_finetune
from pipeline.cli.data import _add_download, _add_inspect, _add_precompute
from pipeline.cli.runs import _add_evaluate, _add_export, _add_train
from pipeline.cli.submit import _add_submit
from tasks.errors import UserError


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m pipeline", description="metapipe: distributed meta-training")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add in (_add_precompute, _add_inspect, _add_download, _add_train, _add_evaluate, _add_export, _add_submit,
                _add_finetune, _add_baselines):
        add(subparsers)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASS_THROUGH:  # their own parsers read the rest (argparse's REMAINDER drops a leading --flag)
        args = argparse.Namespace(func=PASS_THROUGH[argv[0]], rest=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
