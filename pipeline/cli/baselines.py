"""Baseline commands: ``finetune`` (Ravi & Larochelle's Baseline-finetune) and ``baselines`` (hand-tuned optimizers vs L2L).

Their arguments belong to the baseline modules (pipeline/baselines/); these subcommands pass the rest of the
command line on, so ``python -m pipeline finetune --help`` shows the module's own help.
"""
from __future__ import annotations

import argparse


def _finetune(args: argparse.Namespace) -> int:
    from pipeline.baselines import finetune

    finetune.main(args.rest)
    return 0


def _baselines(args: argparse.Namespace) -> int:
    from pipeline.baselines import optimizers

    optimizers.main(args.rest)
    return 0


PASS_THROUGH = {"finetune": _finetune, "baselines": _baselines}
"""Subcommands whose arguments the baseline module's own parser reads."""


def _add_finetune(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser("finetune", help="Baseline-finetune: pretrain a conv4, fine-tune per episode (see --help)")


def _add_baselines(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser("baselines", help="hand-tuned torch.optim optimizers against a learned L2L optimizer (see --help)")
