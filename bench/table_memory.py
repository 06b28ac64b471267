"""Summed resident memory of 1, 2 and 4 worker processes reading one image table: the node's mapped copy
(tasks/store/table.py) against a private in-memory copy per worker (how workers read before).

A synthetic table (default Mini-ImageNet-sized: 60,000 x 3 x 84 x 84 uint8, 100 classes split 64/16/20)
is written once as the node's copy in a temporary cache folder. Each worker is a fresh process (spawn)
that maps the table (or copies it into its own memory), decodes batches of 5-way 1-shot episodes through
TaskDistribution, then touches every page of the table, as a long run does; while all workers of a row
are alive, their PSS and USS (``/proc/PID/smaps_rollup``: PSS counts a page shared by k processes as
1/k; USS = private pages) are summed. "rise" is the sum over workers of PSS after reading minus PSS
before the table was touched or copied (imports and interpreter excluded). Target: the mapped table's
4-worker rise at most 1.3x the 1-worker rise (a private copy per worker gives about 4x). Usage, from the repository root:

    python -m bench.table_memory                                     # 60,000 images, 1/2/4 workers
    python -m bench.table_memory --images 2000 --workers 1 2         # a quick check
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
from pathlib import Path

import numpy as np

CLASSES = (64, 16, 20)


def smaps(pid: int) -> dict[str, int]:
    """Rss, Pss and USS (private clean + dirty) of ``pid`` in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return {"rss": fields["Rss"], "pss": fields["Pss"], "uss": fields["Private_Clean"] + fields["Private_Dirty"]}


def task_config(size: int):  # an ImageFolderTask
    from tasks.families.image_folder import ImageFolderTask

    return ImageFolderTask(root="synthetic", ways=5, shots=1, queries=15, image_size=size)


def make_table(key: str, images: int, size: int) -> None:
    """Write the synthetic table as the node's copy ``key`` (chunk by chunk, never whole in memory)."""
    from tasks.images import ImageTable, assemble
    from tasks.store import table as node_table

    names = tuple(f"{split}/c{i:03d}" for split, n in zip(("train", "val", "test"), CLASSES) for i in range(n))
    classes = np.minimum(np.arange(images) * len(names) // images, len(names) - 1).astype(np.int32)
    rng = np.random.default_rng(0)
    blocks = (rng.integers(0, 256, (min(2000, images - start), 3, size, size), dtype=np.uint8) for start in range(0, images, 2000))
    with node_table.scratch() as path:
        node_table.adopt(key, path, ImageTable(assemble(blocks, (images, 3, size, size), path), classes, names))


def worker(key: str, size: int, mode: str, batches: int, ready, go) -> None:
    """Map (or copy) the table, report PSS, read episodes and touch every page, report again, wait."""
    import torch

    from tasks.distribution import TaskDistribution
    from tasks.images import ImageTable
    from tasks.store import table as node_table

    torch.set_num_threads(1)
    table = node_table.mapped_table(key, lambda: None, "synthetic")
    before = smaps(os.getpid())
    if mode == "copy":
        table = ImageTable(np.array(table.pixels), table.classes, table.class_names)
    distribution = TaskDistribution(task_config(size), table)
    rng = np.random.default_rng(os.getpid())
    for _ in range(batches):
        distribution.episodes("train", rng, 32)
    flat = np.asarray(table.pixels).reshape(-1)
    int(flat[::4096].sum())  # every page of the table, as a long run touches every image
    ready.put((os.getpid(), before))
    go.wait()


def measure(key: str, size: int, mode: str, workers: int, batches: int) -> dict[str, float]:
    """Summed MiB over ``workers`` processes alive together."""
    context = multiprocessing.get_context("spawn")
    ready, go = context.Queue(), context.Event()
    processes = [context.Process(target=worker, args=(key, size, mode, batches, ready, go)) for _ in range(workers)]
    for p in processes:
        p.start()
    before = dict(ready.get(timeout=600) for _ in processes)
    after = {pid: smaps(pid) for pid in before}
    go.set()
    for p in processes:
        p.join(timeout=60)
    return {
        "pss": sum(a["pss"] for a in after.values()) / 1024,
        "uss": sum(a["uss"] for a in after.values()) / 1024,
        "rise": sum(after[pid]["pss"] - before[pid]["pss"] for pid in after) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=60_000)
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", default=["mapped", "copy"], choices=["mapped", "copy"])
    parser.add_argument("--batches", type=int, default=20, help="batches of 32 episodes each worker decodes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["METAPIPE_TABLE_CACHE"] = cache
        key = f"bench-{args.images}-{args.size}"
        make_table(key, args.images, args.size)
        table_mib = args.images * 3 * args.size * args.size / 2**20
        print(f"table: {args.images} x 3 x {args.size} x {args.size} uint8 = {table_mib:.0f} MiB")
        print("| table | workers | summed PSS (MiB) | / 1 worker's | summed USS (MiB) | summed PSS rise (MiB) | / 1 worker's |")
        print("|---|---|---|---|---|---|---|")
        for mode in args.modes:
            first = None
            for n in args.workers:
                m = measure(key, args.size, mode, n, args.batches)
                first = first or m
                print(
                    f"| {mode} | {n} | {m['pss']:.0f} | {m['pss'] / first['pss']:.2f}x | {m['uss']:.0f} | {m['rise']:.0f}"
                    f" | {m['rise'] / first['rise']:.2f}x |", flush=True,
                )


if __name__ == "__main__":
    main()
