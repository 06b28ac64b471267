"""One copy of a store's image table per node: a ``.npy`` file every reader maps read-only.

The store keeps the table as ``images.parquet`` (compressed, checked against its sha256). The first
reader on a node verifies it and writes the decoded pixels, uncompressed, to
``<cache>/<key>.npy`` (plus ``<key>.json``: class sizes and names), under a file lock so that one
process does it while the others wait; every reader then maps the ``.npy`` read-only, so N workers
share one copy of the pixels in the page cache and a table larger than memory is paged in as episodes
touch it. The key is a hash of the store path and the table's sha256, so a store rewritten in place
gets a fresh copy. ``<cache>`` is ``$METAPIPE_TABLE_CACHE``, else ``<temp dir>/metapipe-tables``
(node-local, on disk rather than a RAM-backed tmpfs; give it room for the table: 1.3 GB for Mini-ImageNet
at 84x84, 16.5 GB for tiered-ImageNet). Precompute decodes the data set into this folder a chunk at a
time (``scratch``) and makes the result the node's copy (``adopt``), so the precompute node never decodes twice.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import uuid
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


def _write(folder: Path, key: str, fill: Callable[[Path], ImageTable]) -> None:
    """Write ``<key>.npy`` with ``fill(path)`` (a temporary path beside it), then install it (``_install``);
    a failed ``fill`` leaves nothing behind."""
    temporary = folder / f"{key}.npy.tmp-{os.getpid()}"
    try:
        table = fill(temporary)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _install(folder, key, temporary, table)


def _install(folder: Path, key: str, npy: Path, table: ImageTable) -> None:
    """Move the finished ``npy`` (``table``'s pixels) to ``<key>.npy``, then write ``<key>.json`` (its
    presence marks the copy complete) under a temporary name first."""
    meta = {"sizes": table.sizes.tolist(), "class_names": list(table.class_names), "shape": list(table.pixels.shape)}
    os.replace(npy, folder / f"{key}.npy")
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
                        _write(folder, key, lambda path: from_parquet(source, where, path))
    except OSError as e:
        raise _unwritable(folder, e) from None
    return _open(folder, key)


def _unwritable(folder: Path, error: OSError) -> StoreError:
    return StoreError(
        f"{folder}: cannot write the node's copy of the image table ({error});"
        f" set {CACHE_ENV} to a local folder with room for it"
    )


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh ``.npy`` path in the node's cache folder to decode a table into (precompute), removed on exit
    unless ``adopt`` has made it the node's copy. Raises StoreError when the folder cannot be written."""
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(folder, e) from None
    path = folder / f"decoded-{uuid.uuid4().hex}.npy.tmp"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def adopt(key: str, npy: Path, table: ImageTable) -> None:
    """Make ``npy`` (in the cache folder, from ``scratch``), the table precompute just decoded, the node's copy
    ``key``, so readers here need not decode it again; left where it is if the node has that copy already."""
    folder = cache_dir()
    try:
        with _locked(folder / f"{key}.lock"):
            if not (folder / f"{key}.json").exists():
                _install(folder, key, npy, table)
    except OSError as e:
        raise _unwritable(folder, e) from None
