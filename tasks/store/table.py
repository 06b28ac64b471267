"""One copy of a store's image table per node: a ``.npy`` file every reader maps read-only.

The store keeps the table as ``images.parquet`` (compressed, checked against its sha256). The first
reader on a node verifies it and writes the decoded pixels, uncompressed, to
``<cache>/<key>.npy`` (plus ``<key>.json``: class sizes and names), under a file lock so that one
process does it while the others wait; every reader then maps the ``.npy`` read-only, so N workers
share one copy of the pixels in the page cache and a table larger than memory is paged in as episodes
touch it. The key is a hash of the store path and the table's sha256, so a store rewritten in place
gets a fresh copy. ``<cache>`` is ``$METAPIPE_TABLE_CACHE``, else ``<temp dir>/metapipe-tables``
(node-local; give it room for the table: 1.3 GB for Mini-ImageNet at 84x84, 16.5 GB for tiered-ImageNet).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.errors import StoreError
from tasks.images import ImageTable, from_parquet

CACHE_ENV = "METAPIPE_TABLE_CACHE"


def cache_dir() -> Path:
    """The node-local folder of mapped tables."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path(tempfile.gettempdir()) / "metapipe-tables"


def cache_key(store_path: str, sha256: str) -> str:
    """The name of a store's table copy: a hash of where the store is and what its table holds."""
    return hashlib.sha256(f"{store_path}\0{sha256}".encode()).hexdigest()[:40]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write(folder: Path, key: str, fill: Callable[[Callable[[tuple[int, ...]], np.ndarray]], ImageTable]) -> None:
    """Write ``<key>.npy`` through a memory map that ``fill`` fills, then ``<key>.json`` (its presence
    marks the copy complete); both under temporary names first, then moved into place."""
    temporary = folder / f"{key}.npy.tmp-{os.getpid()}"

    def allocate(shape: tuple[int, ...]) -> np.ndarray:
        return np.lib.format.open_memmap(temporary, mode="w+", dtype=np.uint8, shape=shape)

    table = fill(allocate)
    table.pixels.flush()
    meta = {"sizes": table.sizes.tolist(), "class_names": list(table.class_names), "shape": list(table.pixels.shape)}
    del table
    os.replace(temporary, folder / f"{key}.npy")
    (folder / f"{key}.json.tmp-{os.getpid()}").write_text(json.dumps(meta))
    os.replace(folder / f"{key}.json.tmp-{os.getpid()}", folder / f"{key}.json")


def _open(folder: Path, key: str) -> ImageTable:
    meta = json.loads((folder / f"{key}.json").read_text())
    try:
        pixels = np.load(folder / f"{key}.npy", mmap_mode="r")
    except (OSError, ValueError) as e:
        raise StoreError(f"{folder / key}.npy: the node's copy of the image table cannot be mapped ({e}); delete it") from None
    if list(pixels.shape) != meta["shape"] or pixels.dtype != np.uint8:
        raise StoreError(f"{folder / key}.npy: holds {pixels.dtype} {pixels.shape}, expected uint8 {meta['shape']}; delete it")
    classes = np.repeat(np.arange(len(meta["sizes"]), dtype=np.int32), meta["sizes"])
    return ImageTable(pixels, classes, tuple(meta["class_names"]))


def mapped_table(key: str, open_verified: Callable[[], pa.NativeFile], where: str) -> ImageTable:
    """The table ``key`` mapped read-only; the first caller on the node writes it from the Parquet
    file ``open_verified()`` returns (already checked against the manifest)."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / f"{key}.json").exists():
            with _locked(folder / f"{key}.lock"):
                if not (folder / f"{key}.json").exists():
                    with open_verified() as source:
                        _write(folder, key, lambda allocate: from_parquet(source, where, allocate))
    except OSError as e:
        raise _unwritable(folder, e) from None
    return _open(folder, key)


def _unwritable(folder: Path, error: OSError) -> StoreError:
    return StoreError(
        f"{folder}: cannot write the node's copy of the image table ({error});"
        f" set {CACHE_ENV} to a local folder with room for it"
    )


def publish(key: str, table: ImageTable) -> None:
    """Write the node's copy of a table just decoded (precompute), so readers here need not decode it again."""
    def fill(allocate: Callable[[tuple[int, ...]], np.ndarray]) -> ImageTable:
        pixels = allocate(table.pixels.shape)
        pixels[:] = table.pixels
        return ImageTable(pixels, table.classes, table.class_names)

    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder / f"{key}.lock"):
            if not (folder / f"{key}.json").exists():
                _write(folder, key, fill)
    except OSError as e:
        raise _unwritable(folder, e) from None
