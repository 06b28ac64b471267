"""Episode throughput: Parquet store (indexed and with pixels) against on-the-fly sampling.

    python -m bench.episodes [--episodes 200000] [--seconds 5] [--threads 1] [--out DIR]

Omniglot 5-way 1-shot with 15 queries, batches of 32 (the MAML paper setup), read
the way a training worker reads (one torch thread, like a Ray actor). Prints one
table: episodes/s per source, store size per million training episodes, and the
precompute time. The target: reading never limits training, i.e. at least 20x the
~23 episodes/s one CPU worker consumes with MAML (>= 460 episodes/s).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from tasks.config import EpisodeConfig
from tasks.episodes import Episodes
from tasks.family import Augment
from tasks.store.parquet import open_store, precompute

BATCH = 32
WORKER_RATE = 23.0
"""Episodes/s one CPU worker consumes with second-order MAML on Omniglot 5-way 1-shot."""


def rate(batches: Iterator[Episodes] | Callable[[], Episodes], seconds: float) -> float:
    """Episodes/s over about ``seconds`` (after one warm-up batch)."""
    take = batches if callable(batches) else lambda: next(batches)
    take()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(take())
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.episodes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=200_000, help="training episodes to precompute")
    parser.add_argument("--pixel-episodes", type=int, default=3_000, help="episodes stored with pixels (test split)")
    parser.add_argument("--seconds", type=float, default=5.0, help="time per read measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Ray worker has 1)")
    parser.add_argument("--out", help="store folder (default: a temporary folder, removed afterwards)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        path = args.out or str(Path(scratch) / "omniglot-5w1s")
        config = EpisodeConfig.model_validate(
            {
                "task": {"name": "omniglot", "ways": 5, "shots": 1, "queries": 15},
                "store": {"path": path, "train_episodes": args.episodes, "val_episodes": 0,
                          "test_episodes": args.pixel_episodes, "eval_pixels": True},
            }
        )
        start = time.perf_counter()
        precompute(config, force=True, progress=False)
        precompute_s = time.perf_counter() - start

        start = time.perf_counter()
        store = open_store(path)
        distribution = store.distribution
        table_s = time.perf_counter() - start

        train_bytes = sum(s["bytes"] for s in store.manifest["splits"]["train"]["shards"])
        pixel_bytes = sum(s["bytes"] for s in store.manifest["splits"]["test"]["shards"])
        with store.reader("train", BATCH) as reader:
            indexed = rate(reader, args.seconds)
        with store.reader("test", BATCH) as reader:
            pixels = rate(reader, args.seconds)
        augment = Augment.model_validate({"crop": {}, "flip": True, "color_jitter": {}})
        with store.reader("train", BATCH, augment=augment) as reader:
            augmented = rate(reader, args.seconds)
        on_device = None
        if torch.cuda.is_available():  # store.device_table: auto: the table on the GPU, episodes gathered there
            with open_store(path).reader("train", BATCH, device=torch.device("cuda")) as reader:
                on_device = rate(reader, args.seconds)
        rng = np.random.default_rng(0)
        fly = rate(lambda: distribution.episodes("train", rng, BATCH), args.seconds)

    target = 20 * WORKER_RATE
    rows = [
        ("store, indexed (train split)", f"{indexed:,.0f} ep/s", f"{indexed / WORKER_RATE:,.0f}x a worker"),
        ("store, with pixels (test split)", f"{pixels:,.0f} ep/s", f"{pixels / WORKER_RATE:,.0f}x a worker"),
        ("store, indexed + augment (crop, flip, jitter)", f"{augmented:,.0f} ep/s", f"{augmented / WORKER_RATE:,.0f}x a worker"),
        ("on the fly (sample + decode)", f"{fly:,.0f} ep/s", f"{fly / WORKER_RATE:,.0f}x a worker"),
        *([("store, indexed, table on cuda", f"{on_device:,.0f} ep/s", "store.device_table: auto")] if on_device else []),
        ("store size, indexed", f"{train_bytes / args.episodes * 1e6 / 2**20:,.1f} MiB", "per million episodes"),
        ("store size, with pixels", f"{pixel_bytes / args.pixel_episodes * 1e6 / 2**30:,.1f} GiB", "per million episodes"),
        ("precompute", f"{precompute_s:,.1f} s", f"{args.episodes + args.pixel_episodes:,} episodes, PNG decode included"),
        ("open store + map image table", f"{table_s:,.2f} s", "once per worker (the node's copy written by precompute)"),
    ]
    print(f"Omniglot 5-way 1-shot, 15 queries, batches of {BATCH}, {args.threads} torch thread(s);"
          f" target >= {target:.0f} ep/s (20 x {WORKER_RATE:.0f})")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>14}  {note}")
    verdict = "meets" if min(indexed, pixels) >= target else "MISSES"
    print(f"  reading {verdict} the target")


if __name__ == "__main__":
    main()
