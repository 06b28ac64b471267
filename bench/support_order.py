"""How much a trained learner's query predictions depend on the order of its support set.

Loads an export directory (``python -m pipeline train ... --export DIR``), reads the
first ``--episodes`` test episodes of the export's episode store, and predicts every
query twice: with the support set in the store's order (label order) and with each
support set randomly permuted (seeded). Prints the fraction of query predictions that
flip and both accuracies. An order-invariant learner flips none; MetaNet's LSTM
generator d reads the support chunks in order, so a MetaNet trained on one order
(``algorithm.shuffle_support: false``) can flip many.

    python -m bench.support_order DIR --episodes 200
"""
from __future__ import annotations

import argparse

import torch

from pipeline.build import build_learner
from pipeline.export.directory import load
from tasks.store.parquet import open_store


def flips(export_dir: str, episodes: int, seed: int) -> dict[str, float]:
    """``{"flipped", "accuracy_store_order", "accuracy_permuted"}``, fractions of all queries of ``episodes`` test episodes."""
    exported = load(export_dir)
    learner = build_learner(exported.config)
    batch = open_store(exported.config.store.path, exported.config).read_split("test", episodes)
    gen = torch.Generator().manual_seed(seed)
    flipped = right = right_permuted = total = 0
    with torch.no_grad():
        for e in range(len(batch)):
            sx, sy, qx, qy = batch.support_x[e], batch.support_y[e], batch.query_x[e], batch.query_y[e]
            order = torch.randperm(sy.shape[0], generator=gen)
            first = learner.adapt(exported.params, sx, sy)(qx).argmax(-1)
            second = learner.adapt(exported.params, sx[order], sy[order])(qx).argmax(-1)
            flipped += int((first != second).sum())
            right += int((first == qy).sum())
            right_permuted += int((second == qy).sum())
            total += qy.numel()
    return {"flipped": flipped / total, "accuracy_store_order": right / total, "accuracy_permuted": right_permuted / total}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.support_order", description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--episodes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = flips(args.export_dir, args.episodes, args.seed)
    print("| queries flipped | accuracy, store order | accuracy, permuted support |")
    print("|---|---|---|")
    print(f"| {result['flipped']:.2%} | {result['accuracy_store_order']:.2%} | {result['accuracy_permuted']:.2%} |")


if __name__ == "__main__":
    main()
