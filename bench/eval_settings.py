"""Meta-test one trained learner under meta-test settings of your choice, on the same test episodes.

Loads an export directory (``python -m pipeline train ... --export DIR``), applies
``--set KEY=VALUE`` overrides to its config (settings that change meta-testing only,
e.g. the Meta-LSTM's ``algorithm.eval_norm``, ``algorithm.eval_inner_steps`` or Reptile's
``algorithm.eval_state``: an export's carried inner state or a fresh Adam), and
prints the accuracy on the first ``--episodes`` test episodes of the export's store
for the export's own config and for each override, one table row each.

    python -m bench.eval_settings DIR --set algorithm.eval_norm=batch --episodes 200
"""
from __future__ import annotations

import argparse

from pipeline.build import build_learner
from pipeline.config import apply_overrides, validate
from pipeline.evaluation import EvalResult, eval_state, evaluate
from pipeline.export.directory import load
from tasks.store.parquet import open_store


def compare(export_dir: str, overrides: list[str], episodes: int) -> dict[str, EvalResult]:
    """``{"export's config": result, override: result, ...}`` on the same ``episodes`` test episodes."""
    exported = load(export_dir)
    batch = open_store(exported.config.store.path, exported.config).read_split("test", episodes)
    raw = exported.config.model_dump(mode="json")
    results = {}
    for name, config in [("export's config", exported.config)] + [
        (override, validate(apply_overrides(raw, [override]), f"--set {override}")) for override in overrides
    ]:
        learner = build_learner(config)  # its eval_state decides whether the export's carried state is used
        results[name] = evaluate(learner, exported.params, batch, eval_state(learner, exported.state))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.eval_settings", description=__doc__.splitlines()[0])
    parser.add_argument("export_dir")
    parser.add_argument("--set", action="append", default=[], help="a meta-test override; one row each")
    parser.add_argument("--episodes", type=int, default=600)
    args = parser.parse_args()
    print("| meta-test setting | result |")
    print("|---|---|")
    for name, result in compare(args.export_dir, args.set, args.episodes).items():
        print(f"| {name} | {result} |")


if __name__ == "__main__":
    main()
