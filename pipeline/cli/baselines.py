"""``baseline finetune|optimizers``: Ravi & Larochelle's Baseline-finetune, and hand-tuned optimizers vs L2L.

Their arguments belong to the baseline modules (pipeline/baselines/); these subcommands pass the rest of the
command line on, so ``python -m pipeline baseline finetune --help`` shows the module's own help.
"""
from __future__ import annotations

import argparse


def _finetune(rest: list[str]) -> int:
    from pipeline.baselines import finetune

    finetune.main(rest)
    return 0


def _optimizers(rest: list[str]) -> int:
    from pipeline.baselines import optimizers

    optimizers.main(rest)
    return 0


BASELINES = {"finetune": _finetune, "optimizers": _optimizers}
"""``baseline NAME``: the function that runs it on the rest of the command line (its own parser reads it)."""


def _add_baseline(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("baseline", help="the papers' baselines: finetune, optimizers (see baseline NAME --help)")
    names = p.add_subparsers(dest="baseline", required=True, metavar="NAME")
    names.add_parser("finetune", help="Baseline-finetune: pretrain a conv4 on all training classes, fine-tune per episode")
    names.add_parser("optimizers", help="hand-tuned torch.optim optimizers against a learned L2L optimizer")
