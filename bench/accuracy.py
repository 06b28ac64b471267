"""Meta-train in one process (the server and one worker, no Ray, no MLflow) and meta-test.

The same ParameterServer, EpisodeWorker, store and evaluation as a Ray run, for
machines without Ray or a tracking server (e.g. a lent GPU box) and for quick
accuracy checks. Prints the test result and a line per ``--log-every`` steps.

    python -m bench.accuracy configs/omniglot_maml_5w1s.yaml --steps 2000
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeline.config import RunConfig, load_config
from pipeline.evaluation import evaluate
from pipeline.runtime.server import ParameterServer
from pipeline.runtime.worker import EpisodeWorker
from pipeline.types import Params
from tasks.store.parquet import precompute


def meta_train(config: RunConfig, log_every: int) -> tuple[EpisodeWorker, Params]:
    """Train ``config`` with an in-process server and worker; the worker and the final parameters."""
    t = config.train
    worker = EpisodeWorker(0, 1, config.model_dump(mode="json"), t.meta_batch)
    params = worker.learner.init(config.seed)
    server = ParameterServer(ParameterServer.fresh(worker.layout.flatten(params)), config.optimizer, t.steps, 1, "sync")
    print(f"device {worker.device}, {t.steps} steps of {t.meta_batch} episodes, {config.algorithm.name}", flush=True)
    start = time.perf_counter()
    while server.version() < t.steps:
        report = worker.step(server)
        step = server.version()
        if step % log_every == 0 or step == t.steps:
            rate = step * t.meta_batch / (time.perf_counter() - start)
            eta = (t.steps - step) * t.meta_batch / rate
            shown = " ".join(f"{k} {v:.4f}" for k, v in report.metrics.items())
            print(f"step {step} {shown} | {rate:.1f} episodes/s, ETA {eta:.0f} s", flush=True)
    print(f"trained {t.steps} steps in {time.perf_counter() - start:.0f} s on {worker.device}", flush=True)
    return worker, worker.layout.unflatten(torch.from_numpy(server.pull()[1]))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    config = load_config(args.config, args.set + ([f"train.steps={args.steps}"] if args.steps else []))
    store = precompute(config)
    worker, params = meta_train(config, args.log_every)
    result = evaluate(worker.learner, params, store.read_split("test", limit=config.train.test_episodes))
    print(f"test {result}")


if __name__ == "__main__":
    main()
