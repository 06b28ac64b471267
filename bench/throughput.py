"""Meta-training throughput of the ways to batch MAML's tasks, in tasks per second.

    python -m bench.throughput                      # CPU, 2 torch threads, the whole table
    python -m bench.throughput --device cuda        # the same table on a GPU

Workload: Omniglot 5-way 1-shot 15-query, the MAML paper's Conv4 (64 filters,
stride 2), second-order MAML with one inner step (``--inner-steps``; ``--adapt-params "head.*"``
for ANIL), meta-batch 32, random 28x28
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
- ``--dtype bfloat16``: every row under bfloat16 autocast over float32 parameters,
  as a worker runs ``train.dtype: bfloat16``.

Torch threads default to 2 (this project's CPU machines have 2 cores; a Ray
worker gets its CPU share). The last rows are the full distributed step on
local Ray with 1 and 2 workers (``--workers``), on real Omniglot episodes from
the store, with the parameter-server overhead as a share of the step's wall
time. On a GPU the workers share it (``train.gpus_per_worker`` = 1 / workers),
and the "GPU busy" column is the mean of NVML's utilization samples over the
timed steps (the share of time at least one kernel ran). ``--out FILE`` also
writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.algorithms.maml import MAML, resolve_batching
from pipeline.nets.conv4 import Conv4
from pipeline.runtime.ray_env import MALLOC_ENV
from tasks.episodes import Episodes

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Row:
    """One line of the table."""

    name: str
    tasks_per_s: float
    gpu_busy: float | None = None


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


@contextlib.contextmanager
def gpu_busy(device: str, every_s: float = 0.05) -> Iterator[list[float]]:
    """Sample NVML's utilization of GPU 0 (percent of time a kernel ran) every ``every_s`` s while the block runs.

    Yields the list the samples go into (empty on the CPU, or where NVML is missing).
    """
    samples: list[float] = []
    if device != "cuda":
        yield samples
        return
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # noqa: BLE001 - no NVML: the column stays empty
        yield samples
        return
    done = threading.Event()

    def sample() -> None:
        while not done.wait(every_s):
            samples.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        done.set()
        thread.join()


def busy(samples: list[float]) -> float | None:
    """Mean NVML utilization of ``samples`` as a fraction, None without samples."""
    return statistics.mean(samples) / 100 if samples else None


def measure(batching: str, args: argparse.Namespace) -> tuple[float, float | None]:
    """Median tasks/s of ``meta_grad`` with ``batching`` on the bench workload, and the GPU's busy share."""
    learner = MAML(Conv4(1, 28, 5, 64, "stride"), "cross_entropy", inner_lr=0.4, inner_steps=args.inner_steps,
                   batching=batching, adapt_params=tuple(args.adapt_params) if args.adapt_params else None)
    params = {k: v.to(args.device).requires_grad_() for k, v in learner.init(0).items()}
    episodes = omniglot_batch(args.meta_batch, args.device)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bfloat16" else contextlib.nullcontext()
    times = []
    with gpu_busy(args.device) as samples:
        for i in range(args.repeats + 1):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with autocast:
                learner.meta_grad(params, episodes)
            if args.device == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    return args.meta_batch / statistics.median(times), busy(samples)


def in_subprocess(paths: list[str], env: dict[str, str], args: argparse.Namespace) -> dict[str, float]:
    """Measure ``paths`` in a fresh interpreter with ``env`` added (malloc settings act at process start)."""
    command = [sys.executable, "-m", "bench.throughput", "--json", "--paths", *paths, "--device", args.device, "--dtype", args.dtype,
               "--threads", str(args.threads), "--repeats", str(args.repeats), "--meta-batch", str(args.meta_batch),
               "--inner-steps", str(args.inner_steps), *(["--adapt-params", *args.adapt_params] if args.adapt_params else [])]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return {path: rate for path, (rate, _) in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def distributed_rows(args: argparse.Namespace) -> list[Row]:
    """The full distributed step on local Ray (parameter server + ``args.workers`` workers) on real store episodes.

    The parameter-server overhead is the share of a step's wall time not spent in
    the busiest worker's meta-gradient (pull, push, Adam, the sync barrier, Ray).
    On a GPU the workers share it: ``train.gpus_per_worker`` = 1 / workers.
    """
    import ray

    from pipeline.build import build_learner
    from pipeline.config import load_config
    from pipeline.runtime.flat_buffer import Layout
    from pipeline.runtime.placement import Placement
    from pipeline.runtime.policy import FailurePolicy
    from pipeline.runtime.pool import RayPool
    from pipeline.runtime.ray_env import start_ray
    from pipeline.runtime.server import ParameterServer
    from tasks.store.parquet import precompute

    rows = []
    for n in args.workers:
        overrides = [f"train.workers={n}", f"train.meta_batch={args.meta_batch}", "train.steps=1000000",
                     f"train.dtype={args.dtype}", f"train.gpus_per_worker={1 / n if args.device == 'cuda' else 0}"]
        config = load_config(ROOT / "configs" / "omniglot_maml_5w1s.yaml", overrides)
        precompute(config)
        resources = start_ray(config)
        params = build_learner(config).init(config.seed)
        state = ParameterServer.fresh(Layout.of(params).flatten(params))
        placement = Placement.reserve(config, resources)
        pool = RayPool(config, placement, state, [None] * n, FailurePolicy(config.train.max_bad_grads))
        pool.step_all()
        walls, overheads = [], []
        with gpu_busy(args.device) as samples:
            for _ in range(args.repeats):
                start = time.perf_counter()
                reports = pool.step_all()
                wall = time.perf_counter() - start
                walls.append(wall)
                overheads.append(1 - max(r.timings["compute_s"] for r in reports) / wall)
        pool.stop()
        placement.remove()
        overhead = statistics.median(overheads)
        rows.append(Row(f"Ray, {n} worker(s), PS overhead {overhead:.0%}", args.meta_batch / statistics.median(walls),
                        busy(samples)))
    ray.shutdown()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16: autocast over float32 parameters (train.dtype)")
    parser.add_argument("--adapt-params", nargs="+", help='ANIL: globs of the inner loop\'s parameters, e.g. "head.*"')
    parser.add_argument("--paths", nargs="+", default=["loop", "stacked", "vmap"])
    parser.add_argument("--malloc-paths", nargs="*", default=None, help="paths to rerun with MALLOC_ENV")
    parser.add_argument("--json", action="store_true", help="print {path: tasks/s} only (used for subprocesses)")
    parser.add_argument("--workers", nargs="*", type=int, default=[1, 2],
                        help="Ray workers of the distributed rows (on a GPU: workers sharing it)")
    parser.add_argument("--out", type=Path, help="also write the rows here as JSON")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.workers):
        parser.error(f"--workers: each count must be at least 1, got {args.workers}")
    if args.out and not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: folder {args.out.parent} does not exist")
    torch.set_num_threads(args.threads)
    results = {path: measure(path, args) for path in args.paths}
    if args.json:
        print(json.dumps(results))
        return
    auto = resolve_batching("auto", Conv4(1, 28, 5, 64, "stride"), torch.device(args.device))
    malloc_paths = args.malloc_paths if args.malloc_paths is not None else ["loop", auto]
    malloc = in_subprocess(sorted(set(malloc_paths)), MALLOC_ENV, args) if malloc_paths else {}
    rows = [Row(f"worker path (auto = {auto})", *results[auto])] if auto in results else []
    rows += [Row(path, *result) for path, result in results.items()]
    rows += [Row(f"{path} + malloc env", rate) for path, rate in malloc.items()]
    rows += distributed_rows(args) if args.workers else []
    base = results["loop"][0] if "loop" in results else None
    anil = f", ANIL (inner loop: {' '.join(args.adapt_params)})" if args.adapt_params else ""
    gpu = f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""
    print(f"MAML 2nd order, {args.inner_steps} inner step(s){anil}, Omniglot 5w1s 15q, Conv4-64, meta-batch {args.meta_batch}, "
          f"{args.device}{gpu}, {args.dtype}, torch {torch.__version__}, {args.threads} threads")
    print(f"{'path':<34}{'tasks/s':>10}{'vs loop':>10}{'GPU busy':>10}")
    for row in rows:
        ratio = f"{row.tasks_per_s / base:.2f}x" if base else "-"
        gpu_share = f"{row.gpu_busy:.0%}" if row.gpu_busy is not None else "-"
        print(f"{row.name:<34}{row.tasks_per_s:>10.1f}{ratio:>10}{gpu_share:>10}")
    if args.out:
        args.out.write_text(json.dumps([vars(row) for row in rows], indent=1))


if __name__ == "__main__":
    main()
