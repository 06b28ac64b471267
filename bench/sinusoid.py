"""Sinusoid regression, MAML paper figure 2: post-adaptation MSE after 1 and 10 gradient steps.

MAML (configs/sinusoid_maml.yaml, trained in one process by bench/accuracy.py: the driver's run on
LocalPool; its best validation checkpoint, as ``train`` exports)
against a network pretrained on all tasks jointly (the paper's baseline: plain
regression on every training episode's points with the same steps and Adam,
then fine-tuned with the same inner SGD), both meta-tested on the store's 600
held-out tasks (K=10 support points, 10 query points).

    python -m bench.sinusoid [--steps 3000]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import pipeline
from bench.accuracy import load, meta_train
from pipeline.build import build_learner
from pipeline.evaluation import mean_ci95
from tasks.store.parquet import precompute


def pretrain(config, log_every: int):
    """The baseline: Adam on the MSE over all points of every training episode, no adaptation."""
    learner = build_learner(config)
    params = {k: v.requires_grad_() for k, v in learner.init(config.seed).items()}
    optimizer = torch.optim.Adam(params.values(), lr=config.optimizer.lr)
    reader = precompute(config).reader("train", batch_size=config.train.meta_batch)
    for step in range(1, config.train.steps + 1):
        e = next(reader)
        x, y = torch.cat([e.support_x, e.query_x], 1), torch.cat([e.support_y, e.query_y], 1)
        loss = (learner.network.apply_tasks(params, x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % log_every == 0:
            print(f"pretrain step {step} mse {loss.item():.4f}", flush=True)
    reader.close()
    return {k: v.detach() for k, v in params.items()}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sinusoid", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/sinusoid_maml.yaml")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--log-every", type=int, default=500, help="pretraining progress every this many steps")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-sinusoid-"))
    config = load(argparse.Namespace(config=args.config, steps=args.steps, set=[]), workdir)
    test = precompute(config).read_split("test")
    maml_params = pipeline.load(meta_train(config, workdir).export_dir).params
    baseline_params = pretrain(config, args.log_every)
    learner = build_learner(config)
    print(f"\nsinusoid K={config.task.shots}, {config.train.steps} steps x meta-batch {config.train.meta_batch}, "
          f"inner lr {config.algorithm.inner_lr}, {len(test)} test tasks; query MSE (95% CI)")
    print(f"{'model':<26}{'0 steps':>18}{'1 step':>18}{'10 steps':>18}")
    for name, params in (("MAML", maml_params), ("pretrained on all tasks", baseline_params)):
        cells = []
        for steps in (1, 10):
            per_task = learner.evaluate(params, test, steps=steps)
            if steps == 1:
                cells.append(mean_ci95(per_task["pre_loss"].tolist()))
            cells.append(mean_ci95(per_task["loss"].tolist()))
        print(f"{name:<26}" + "".join(f"{m:>10.3f} +-{c:>5.3f}" for m, c in cells))


if __name__ == "__main__":
    main()
