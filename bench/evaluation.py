"""Meta-test evaluation: the workers' path (episodes split over Ray workers) against the driver's own loop.

    python -m bench.evaluation                                   # Omniglot 5w1s MAML, 600 test episodes, 1 2 4 workers
    python -m bench.evaluation --episodes 20 --workers 2 --config configs/sinusoid_maml.yaml   # a quick check
    python -m bench.evaluation --episodes 100 --workers --config configs/meta_lstm_omniglot_5w1s.yaml   # batching only
    python -m bench.evaluation --episodes 64 --workers --chunks 1 4 16 64 --config configs/metanet_omniglot_5w1s.yaml

Rows:

- ``driver, one at a time``: for a learner with a batched ``evaluate``, the same evaluation through
  ``learner.adapt`` one episode at a time (what ``pipeline.evaluation`` does for a learner without it),
- ``driver, N per pass`` (``--chunks``, for a learner whose ``evaluate`` takes ``chunk``: the Meta-LSTM, MetaNet):
  the same with N episodes stacked in each pass, to choose its default,
- ``driver``: ``pipeline.evaluation.evaluate`` in the driver process (what a run did before the workers
  evaluated) on the first ``--episodes`` test episodes (read from the store, adapted batched on its CPU),
- ``workers N, first``: ``RayPool.evaluate`` over N workers as a run's final test does it
  (each worker reads its slice of the store once, adapts it batched on its device; the driver
  only aggregates), including that read,
- ``workers N, again``: the same call again (slices kept, as validation repeats them).

Columns: wall time, the driver process's own CPU time (``time.process_time``: what the
driver spends itself), episodes per second, and whether the result equals the driver's
(mean and 95% interval; one at a time, to float rounding: the accuracies of the two paths can differ only
where rounding flips an argmax). The parameters are the config's initial ones (speed does not depend on them).
The store is precomputed when missing, as a run would.
"""
from __future__ import annotations

import argparse
import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import ray
import torch

from pipeline.build import build_learner
from pipeline.config import load_config
from pipeline.evaluation import EvalResult, evaluate
from pipeline.runtime.flat_buffer import Layout
from pipeline.runtime.placement import Placement
from pipeline.runtime.policy import FailurePolicy
from pipeline.runtime.pool import RayPool
from pipeline.runtime.ray_env import start_ray
from pipeline.runtime.server import ParameterServer
from pipeline.types import BatchedEvaluation, MetaLearner, Params, Predictor
from tasks.episodes import Episodes
from tasks.store.parquet import precompute

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")


def timed(call: Callable[[], T]) -> tuple[T, float, float]:
    """``call()``'s result, its wall time and the CPU time this process spent in it (s)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, time.perf_counter() - wall, time.process_time() - cpu


@dataclass(frozen=True)
class OneAtATime:
    """``learner`` without its batched ``evaluate``: ``pipeline.evaluation`` then adapts one episode at a time."""

    learner: MetaLearner

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        return self.learner.adapt(params, support_x, support_y)


@dataclass(frozen=True)
class PerPass(OneAtATime):
    """``learner`` evaluating ``chunk`` episodes per pass instead of its default."""

    chunk: int

    def evaluate(self, params: Params, episodes: Episodes) -> dict[str, torch.Tensor]:
        return self.learner.evaluate(params, episodes, chunk=self.chunk)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.evaluation", description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "omniglot_maml_5w1s.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--episodes", type=int, default=600, help="test episodes (default 600, the papers' count)")
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 2, 4], help="worker counts (none: driver rows only)")
    parser.add_argument("--chunks", nargs="*", type=int, default=[], help="episodes per pass to time (Meta-LSTM, MetaNet)")
    args = parser.parse_args(argv)

    base = load_config(args.config, args.set)
    store = precompute(base)
    episodes = min(args.episodes, store.episodes("test"))
    learner = build_learner(base)
    if args.chunks and "chunk" not in inspect.signature(getattr(learner, "evaluate", lambda: None)).parameters:
        parser.error(f"--chunks: {base.algorithm.name}'s evaluation takes no chunk (the Meta-LSTM's and MetaNet's do)")
    params = learner.init(base.seed)
    layout = Layout.of(params)
    flat = layout.flatten(params).numpy()
    rows: list[tuple[str, float, float, EvalResult]] = []
    if isinstance(learner, BatchedEvaluation):
        one, wall, cpu = timed(lambda: evaluate(OneAtATime(learner), params, store.read_split("test", limit=episodes)))
        rows.append(("driver, one at a time", wall, cpu, one))
    reference, wall, cpu = timed(lambda: evaluate(learner, params, store.read_split("test", limit=episodes)))
    rows.append(("driver", wall, cpu, reference))
    for chunk in args.chunks:
        result, wall, cpu = timed(lambda: evaluate(PerPass(learner, chunk), params, store.read_split("test", limit=episodes)))  # noqa: B023
        rows.append((f"driver, {chunk} per pass", wall, cpu, result))
    for n in args.workers:
        config = load_config(args.config, [*args.set, f"train.workers={n}", f"train.meta_batch={max(n, base.train.meta_batch)}"])
        placement = Placement.reserve(config, start_ray(config))
        pool = RayPool(config, placement, ParameterServer.fresh(layout.flatten(params)), [None] * n, FailurePolicy(3))
        try:
            ray.get([worker.__ray_ready__.remote() for worker in pool.workers])  # started: not part of the figure
            for label in ("first", "again"):
                result, wall, cpu = timed(lambda: pool.evaluate("test", episodes, flat))  # noqa: B023 - called at once
                rows.append((f"workers {n}, {label}", wall, cpu, result))
        finally:
            pool.stop()
            placement.remove()
    if ray.is_initialized():
        ray.shutdown()
    print(f"{base.name}: {episodes} test episodes, {reference}")
    print(f"{'path':<22}{'wall s':>9}{'driver cpu s':>14}{'episodes/s':>12}{'same result':>13}")
    for name, wall, cpu, result in rows:
        same = result == reference or f"{abs(result.mean - reference.mean):.1e} apart"
        print(f"{name:<22}{wall:>9.2f}{cpu:>14.2f}{episodes / wall:>12.1f}{same!s:>13}")


if __name__ == "__main__":
    main()
