"""Meta-training throughput of the ways to batch MAML's tasks, in tasks per second.

    python bench/throughput.py                      # CPU, 2 torch threads, the whole table
    python bench/throughput.py --device cuda        # the same table on a GPU

Workload: Omniglot 5-way 1-shot 15-query, the MAML paper's Conv4 (64 filters,
stride 2), second-order MAML with one inner step, meta-batch 32, random 28x28
inputs (speed does not depend on the pixels). One "step" is one ``meta_grad``
of the whole meta-batch; the figure is the median over ``--repeats`` steps
after one warm-up step. Rows:

- the worker's path (``batching: auto`` on this device),
- ``loop``: one task at a time with torch.autograd.grad(create_graph=True), the
  way learn2learn and higher do it (the reference every ratio divides by),
- ``stacked``: all tasks in one pass (batched matmuls, grouped convolutions),
- ``vmap``: torch.func.vmap of the per-task function,
- ``... + malloc env``: the same in a fresh subprocess started with glibc's
  MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ raised (``MALLOC_ENV``), which
  keeps freed autograd buffers in the heap instead of returning them to the OS.

Torch threads default to 2 (this project's CPU machines have 2 cores; a Ray
worker gets its CPU share). ``distributed_rows`` is the hook for the columns
that need Ray (the full distributed step with 1 and 2 workers).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.maml import MAML, resolve_batching  # noqa: E402
from pipeline.networks import Conv4  # noqa: E402
from tasks.episodes import Episodes  # noqa: E402

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34)}
"""glibc malloc settings for meta-training processes (set before the process starts, e.g. a Ray runtime_env)."""


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    name: str
    tasks_per_s: float


def omniglot_batch(tasks: int, device: str, seed: int = 0) -> Episodes:
    """A random Omniglot-shaped 5-way 1-shot 15-query meta-batch."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(5)
    return Episodes(
        torch.rand(tasks, 5, 1, 28, 28, generator=gen),
        labels.repeat(tasks, 1),
        torch.rand(tasks, 75, 1, 28, 28, generator=gen),
        labels.repeat_interleave(15).repeat(tasks, 1),
    ).to(device)


def measure(batching: str, args: argparse.Namespace) -> float:
    """Median tasks/s of ``meta_grad`` with ``batching`` on the bench workload."""
    learner = MAML(Conv4(1, 28, 5, 64, "stride"), "cross_entropy", inner_lr=0.4, inner_steps=1, batching=batching)
    params = {k: v.to(args.device).requires_grad_() for k, v in learner.init(0).items()}
    episodes = omniglot_batch(args.meta_batch, args.device)
    times = []
    for i in range(args.repeats + 1):
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        learner.meta_grad(params, episodes)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return args.meta_batch / statistics.median(times)


def in_subprocess(paths: list[str], env: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """Measure ``paths`` in a fresh interpreter with ``env`` added (malloc settings act at process start)."""
    command = [sys.executable, __file__, "--json", "--paths", *paths, "--device", args.device,
               "--threads", str(args.threads), "--repeats", str(args.repeats), "--meta-batch", str(args.meta_batch)]
    done = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def distributed_rows(args: argparse.Namespace) -> list[Row]:
    """Rows for the full distributed step (parameter server + 1 and 2 Ray workers); the driver's part."""
    return []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--paths", nargs="+", default=["loop", "stacked", "vmap"])
    parser.add_argument("--malloc-paths", nargs="*", default=None, help="paths to rerun with MALLOC_ENV")
    parser.add_argument("--json", action="store_true", help="print {path: tasks/s} only (used for subprocesses)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {path: measure(path, args) for path in args.paths}
    if args.json:
        print(json.dumps(results))
        return
    auto = resolve_batching("auto", torch.device(args.device))
    malloc_paths = args.malloc_paths if args.malloc_paths is not None else ["loop", auto]
    malloc = in_subprocess(sorted(set(malloc_paths)), MALLOC_ENV, args) if malloc_paths else {}
    rows = [Row(f"worker path (auto = {auto})", results[auto])] if auto in results else []
    rows += [Row(path, rate) for path, rate in results.items()]
    rows += [Row(f"{path} + malloc env", rate) for path, rate in malloc.items()]
    rows += distributed_rows(args)
    base = results.get("loop")
    print(f"MAML 2nd order, Omniglot 5w1s 15q, Conv4-64, meta-batch {args.meta_batch}, "
          f"{args.device}, torch {torch.__version__}, {args.threads} threads")
    print(f"{'path':<34}{'tasks/s':>10}{'vs loop':>10}")
    for row in rows:
        ratio = f"{row.tasks_per_s / base:.2f}x" if base else "-"
        print(f"{row.name:<34}{row.tasks_per_s:>10.1f}{ratio:>10}")


if __name__ == "__main__":
    main()
