"""Peak resident memory of ``precompute`` on image folders of two sizes: the table is decoded a chunk at a time.

For each ``--images`` count, a synthetic image folder is written to a temporary folder (RGB PNGs of
``--size`` x ``--size``, 100 classes split 64/16/20 into ``train/ val/ test/`` folders). A fresh process
then either runs ``precompute`` on it, or, for contrast, decodes the folder into memory
(``TaskDistribution.load`` without a file: what precompute did before). Precompute decodes the table
into the node's ``.npy`` copy ``tasks.images.CHUNK_BYTES`` at a time and streams images.parquet a row
group at a time. Its store has 1,000 training and 20 val/test episodes, val/test stored as indices
(``store.eval_pixels: false``) so that the figure is the table's: evaluation shards with pixels are
built in memory, about 21 KB per image of an 84x84 episode, a cost of the store's episode counts and not
of the data set. Printed per row: the table's size, the process's RSS before the work (after imports),
its peak RSS (``ru_maxrss``) and the rise. Expected: once the table is a few chunks large, precompute's
rise stays about the same as the table grows (a few buffers of a chunk or a row group, ``--chunk-mib``
sets both, 64 as shipped; plus the file list, about 150 bytes a file), while the in-memory rise grows
with the table. Usage, from the repository root:

    python -m bench.precompute_memory                                  # 10,000 and 40,000 images of 84x84
    python -m bench.precompute_memory --chunk-mib 8                    # the same with 8 MiB chunks
    python -m bench.precompute_memory --images 300 600 --size 16       # a quick check
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from bench.lstm_memory import _rss_mib

CLASSES = {"train": 64, "val": 16, "test": 20}
MODES = ("precompute", "in memory")


def write_folder(root: Path, images: int, size: int) -> None:
    """``images`` PNGs in 100 class folders under ``root/{train,val,test}/`` (smooth random images: small files)."""
    names: list[tuple[str, str]] = []
    for split, n in CLASSES.items():
        names += [(split, f"c{len(names) + i:03d}") for i in range(n)]
    rng = np.random.default_rng(0)
    for index in range(images):
        split, name = names[index % len(names)]
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        coarse.resize((size, size), Image.BILINEAR).save(folder / f"{index:07d}.png")


def config(root: Path, store: Path, size: int):  # an EpisodeConfig
    from tasks.config import EpisodeConfig

    return EpisodeConfig.model_validate({
        "task": {"name": "image_folder", "root": str(root), "ways": 5, "shots": 1, "queries": 2, "image_size": size},
        "store": {"path": str(store), "train_episodes": 1000, "val_episodes": 20, "test_episodes": 20, "eval_pixels": False},
    })


def child(mode: str, root: Path, store: Path, size: int, chunk_mib: float) -> None:
    """In this fresh process: precompute (or decode into memory), then print the memory figures as JSON."""
    import pyarrow.compute  # noqa: F401 - modules precompute imports on first use, loaded before the baseline
    import torch

    from tasks import images
    from tasks.distribution import TaskDistribution
    from tasks.store.parquet import precompute

    torch.set_num_threads(1)
    images.CHUNK_BYTES = images.ROW_GROUP_BYTES = int(chunk_mib * 2**20)
    settings = config(root, store, size)
    before = _rss_mib()
    if mode == "precompute":
        table = precompute(settings, progress=False).manifest["image_table"]
        count, shape = table["images"], table["shape"]
    else:
        pixels = TaskDistribution.load(settings.task).table.pixels
        count, shape = len(pixels), list(pixels.shape[1:])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"table": count * int(np.prod(shape)) / 2**20, "before": before, "peak": peak}))


def measure(mode: str, root: Path, store: Path, size: int, chunk_mib: float) -> dict[str, float]:
    """Run ``child`` in a fresh interpreter with its own table cache folder."""
    with tempfile.TemporaryDirectory() as cache:
        command = ["--child", mode, str(root), str(store), str(size), str(chunk_mib)]
        result = subprocess.run(
            [sys.executable, "-m", "bench.precompute_memory", *command],
            capture_output=True, text=True, check=False, env=os.environ | {"METAPIPE_TABLE_CACHE": cache},
        )
    if result.returncode != 0:
        raise SystemExit(f"{mode} on {root} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 40_000])
    parser.add_argument("--size", type=int, default=84)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--chunk-mib", type=float, default=64, help="tasks.images.CHUNK_BYTES and ROW_GROUP_BYTES, in MiB")
    parser.add_argument("--child", nargs=5, metavar=("MODE", "ROOT", "STORE", "SIZE", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, root, store, size, chunk_mib = args.child
        child(mode, Path(root), Path(store), int(size), float(chunk_mib))
        return
    print(f"decoding chunk and Parquet row group: {args.chunk_mib:g} MiB each")
    print("| images | table (MiB) | mode | RSS before (MiB) | peak RSS (MiB) | rise (MiB) |")
    print("|---|---|---|---|---|---|")
    for count in args.images:
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch) / "folder"
            write_folder(root, count, args.size)
            for mode in args.modes:
                m = measure(mode, root, Path(scratch) / f"store-{mode.replace(' ', '-')}", args.size, args.chunk_mib)
                print(
                    f"| {count} | {m['table']:.0f} | {mode} | {m['before']:.0f} | {m['peak']:.0f} | {m['peak'] - m['before']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
