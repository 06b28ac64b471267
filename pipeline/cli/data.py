"""Data commands: ``precompute`` a store, ``inspect`` one, ``download`` a data set."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.configs import config_file
from pipeline.config import load_episode_config
from tasks.errors import DatasetError
from tasks.families import spec


def _precompute(args: argparse.Namespace) -> int:
    from tasks.store.parquet import precompute

    config = load_episode_config(args.config, args.set)
    store = precompute(config, out=args.out, episodes=args.episodes, seed=args.seed, force=args.force)
    counts = ", ".join(f"{split} {store.episodes(split)}" for split in ("train", "val", "test"))
    print(f"store {store.path}: {counts} episodes ({spec(store.config.task).family}, seed {store.manifest['seed']})")
    return 0


def _add_precompute(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("precompute", help="sample every split of a config into a Parquet episode store")
    p.add_argument("config", type=config_file, help="task base (configs/tasks/) or run config YAML, or a shipped config's name")
    p.add_argument("--out", help="store location, a folder or s3://bucket/prefix (default: store.path)")
    p.add_argument("--episodes", type=int, help="training episodes (default: store.train_episodes)")
    p.add_argument("--seed", type=int, help="sampling seed (default: store.seed)")
    p.add_argument("--force", action="store_true", help="replace a store made for another config")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key, e.g. task.ways=20")
    p.set_defaults(func=_precompute)


def _inspect(args: argparse.Namespace) -> int:
    import json

    from tasks.grid import episode_grid
    from tasks.store.parquet import open_store

    store = open_store(args.store)
    print(f"store {store.path} (schema {store.manifest['schema_version']}, seed {store.manifest['seed']})")
    print("config:", json.dumps(store.manifest["config"], indent=2))
    counts = store.verify()
    for split, count in counts.items():
        info = store.manifest["splits"][split]
        print(f"  {split:5s} {count:>9d} episodes  {len(info['shards'])} shards  layout {info['layout']}  verified")
    if store.distribution.is_image and counts["train"]:
        grid = Path(args.grid or f"{Path(store.path.rstrip('/')).name}-episodes.png")
        episode_grid(store.read_split("train", args.show)).save(grid)
        print(f"grid of {min(args.show, counts['train'])} training episodes: {grid}")
    return 0


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help="print a store's counts and config, verify every file, draw episodes")
    p.add_argument("store", help="store folder or s3://bucket/prefix")
    p.add_argument("--grid", help="PNG file for the episode grid (default: ./<store name>-episodes.png)")
    p.add_argument("--show", type=int, default=4, help="episodes in the grid")
    p.set_defaults(func=_inspect)


def _download(args: argparse.Namespace) -> int:
    from torchvision.datasets import Omniglot

    from tasks.datasets import data_root

    target = data_root(args.root) / "omniglot"
    for background in (True, False):
        try:
            Omniglot(str(target), background=background, download=True)
        except (OSError, RuntimeError) as e:
            raise DatasetError(
                f"cannot download Omniglot into {target} ({e}); without internet, copy the two zips"
                " images_background.zip and images_evaluation.zip there instead"
            ) from None
    print(f"Omniglot in {target / 'omniglot-py'}")
    return 0


def _add_download(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("download", help="fetch a data set with torchvision (needs internet)")
    p.add_argument("dataset", choices=["omniglot"], help="the data set to fetch (omniglot)")
    p.add_argument("--root", help="data root (default: $METAPIPE_DATA, else ../shared/data)")
    p.set_defaults(func=_download)
