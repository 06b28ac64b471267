"""The Parquet episode store: precompute once, read back deterministically, trust nothing unchecked.

Layout under a local folder or ``s3://bucket/prefix``::

    manifest.json              written last: config, seed, schema version, per split its shards
    images.parquet             image sets: the image table (uint8 [n, C, H, W]), once per store
    train/part-00000.parquet   one fixed-size binary column per episode field, row groups of 1000
    val/...  test/...

A field's dtype and per-episode shape are in the manifest (and in the column's
metadata); reading views the column's bytes as a tensor without copying. Each
split draws from its own seed (``SeedSequence([seed, split, shard])``), so the
same config and seed give byte-identical shards. Every shard and the image table
is checked against its sha256 before use; any problem is a StoreError naming the
file and what is wrong.
"""
from __future__ import annotations

import functools
import json
import math
import queue
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import ValidationError
from tqdm import tqdm

from tasks import augment as augmentation
from tasks.config import ROW_GROUP, EpisodeConfig
from tasks.distribution import SPLITS, TaskDistribution
from tasks.episodes import Episodes
from tasks.errors import StoreError
from tasks.families import TaskConfig, family
from tasks.family import Augment, ImageFamily
from tasks.images import write_parquet
from tasks.store import table as node_table
from tasks.store.filesystem import (
    ArrowError,
    delete,
    exists,
    read_bytes,
    resolve,
    sha256_hex,
    write_atomic,
    write_streamed,
)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
TABLE = "images.parquet"
"""Episodes per Parquet row group: the unit of worker assignment and read-ahead."""


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """What makes two stores the same: the whole config except where it is kept, the training
    augmentation and where readers keep the image table (read-time choices, not stored)."""
    return {
        "task": {k: v for k, v in config["task"].items() if k != "augment"},
        "store": {k: v for k, v in config["store"].items() if k not in ("path", "device_table")},
    }


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for key in sorted(set(a) | set(b)) for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [f"{prefix[:-1]}: store has {a!r}, config has {b!r}"]


def _columns(schema: pa.Schema) -> list[list[str]]:
    """[name, Arrow type] of each column: what a shard's schema must match."""
    return [[field.name, str(field.type)] for field in schema]


def _expected_columns(fields: list[dict[str, Any]]) -> list[list[str]]:
    return [[f["name"], str(pa.binary(np.dtype(f["dtype"]).itemsize * math.prod(f["shape"])))] for f in fields]


def _shard_bytes(fields: dict[str, np.ndarray]) -> bytes:
    """One Parquet file, a fixed-size binary column per field (each episode's array as its raw bytes).

    Binary rather than fixed-size lists: Parquet decodes list elements one by one
    (with repetition levels), which made pixel shards 10x slower to read.
    """
    columns, schema = [], []
    for name, values in fields.items():
        values = np.ascontiguousarray(values)
        width = values.nbytes // len(values)
        columns.append(pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(values)]))
        meta = {"dtype": values.dtype.str, "shape": json.dumps(list(values.shape[1:]))}
        schema.append(pa.field(name, pa.binary(width), nullable=False, metadata=meta))
    sink = pa.BufferOutputStream()
    pq.write_table(
        pa.Table.from_arrays(columns, schema=pa.schema(schema)), sink,
        compression="zstd", row_group_size=ROW_GROUP, use_dictionary=False, write_statistics=False,
    )
    return sink.getvalue().to_pybytes()


def _to_tensors(table: pa.Table, fields: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Zero-copy views of each binary column as a [rows, *shape] tensor of the field's dtype."""
    out = {}
    for spec in fields:
        column = table.column(spec["name"]).combine_chunks()
        dtype = torch.from_numpy(np.empty(0, np.dtype(spec["dtype"]))).dtype
        width = column.type.byte_width
        values = torch.frombuffer(
            column.buffers()[1], dtype=dtype, count=len(column) * width // dtype.itemsize, offset=column.offset * width
        )
        out[spec["name"]] = values.reshape(len(column), *spec["shape"])
    return out


def _check_manifest(manifest: Any, where: str) -> None:
    if not isinstance(manifest, dict):
        raise StoreError(f"{where}: manifest is not a JSON object")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise StoreError(
            f"{where}: schema version {manifest.get('schema_version')!r}, this code reads version {SCHEMA_VERSION}"
            " (precompute the store again)"
        )
    for key in ("config", "seed", "splits", "row_group_episodes"):
        if key not in manifest:
            raise StoreError(f"{where}: manifest lacks {key!r}")
    for split in SPLITS:
        info = manifest["splits"].get(split)
        if not isinstance(info, dict) or not {"episodes", "layout", "fields", "shards"} <= set(info):
            raise StoreError(f"{where}: manifest entry for split {split!r} is missing or incomplete")
        shards = info["shards"]
        if not isinstance(shards, list) or not all(isinstance(s, dict) and {"file", "rows", "sha256"} <= set(s) for s in shards):
            raise StoreError(f"{where}: a shard entry of split {split} lacks file, rows or sha256")
        counted = sum(s["rows"] for s in shards)
        if counted != info["episodes"]:
            raise StoreError(f"{where}: split {split} lists {info['episodes']} episodes but its shards hold {counted}")


class Store:
    """An episode store that exists and whose manifest is sound; shards are verified as they are read."""

    def __init__(self, path: str, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self._fs, self._root = resolve(path)
        raw = json.loads(json.dumps(manifest["config"]))
        raw["store"]["path"] = path
        try:
            self.config = EpisodeConfig.model_validate(raw)
        except ValidationError as e:
            raise StoreError(f"{self._where(MANIFEST)}: config is not valid ({e.errors()[0]['msg']})") from None
        self._distribution: TaskDistribution | None = None

    def _where(self, file: str) -> str:
        return f"{self.path.rstrip('/')}/{file}"

    def episodes(self, split: str) -> int:
        """Episodes stored for ``split``."""
        return self._split(split)["episodes"]

    def _split(self, split: str) -> dict[str, Any]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.manifest["splits"][split]

    @property
    def distribution(self) -> TaskDistribution:
        """The task distribution, with the store's verified image table for image sets (loaded once)."""
        if self._distribution is None:
            self._distribution = self._load_distribution()
        return self._distribution

    def _load_distribution(self) -> TaskDistribution:
        """The task distribution over the node's mapped copy of the image table (written from the
        verified Parquet table by the node's first reader)."""
        info = self.manifest.get("image_table")
        table = None
        if info is not None:
            table = node_table.mapped_table(
                node_table.cache_key(self.path, info["sha256"]), lambda: self._verified_file(info["file"], info["sha256"]),
                self._where(info["file"]),
            )
        return TaskDistribution(self.config.task, table)

    def _verified(self, file: str, sha256: str) -> bytes:
        """The bytes of ``file`` after checking them against the manifest."""
        try:
            data = read_bytes(self._fs, f"{self._root}/{file}")
        except FileNotFoundError:
            raise StoreError(f"{self._where(file)}: missing (listed in {MANIFEST})") from None
        except ArrowError as e:
            raise StoreError(f"{self._where(file)}: cannot be read ({e})") from None
        self._check(file, sha256_hex(data), len(data), sha256)
        return data

    def _verified_file(self, file: str, sha256: str) -> pa.NativeFile:
        """``file`` open for random access, after streaming it through sha256 (never whole in memory)."""
        path = f"{self._root}/{file}"
        try:
            with self._fs.open_input_stream(path) as stream:
                digest = sha256_hex(stream)
            size = self._fs.get_file_info(path).size
            opened = self._fs.open_input_file(path)
        except FileNotFoundError:
            raise StoreError(f"{self._where(file)}: missing (listed in {MANIFEST})") from None
        except ArrowError as e:
            raise StoreError(f"{self._where(file)}: cannot be read ({e})") from None
        self._check(file, digest, size, sha256)
        return opened

    def _check(self, file: str, digest: str, size: int, sha256: str) -> None:
        if digest != sha256:
            raise StoreError(
                f"{self._where(file)}: checksum mismatch ({size} bytes, sha256 {digest[:12]}...,"
                f" manifest says {sha256[:12]}...): the file is truncated or altered"
            )

    def shard(self, split: str, index: int) -> pq.ParquetFile:
        """Shard ``index`` of ``split``, verified: checksum, schema, rows and row groups as the manifest says."""
        info = self._split(split)
        entry = info["shards"][index]
        file = entry["file"]
        data = self._verified(file, entry["sha256"])
        try:
            parquet = pq.ParquetFile(pa.BufferReader(data))
        except ArrowError as e:
            raise StoreError(f"{self._where(file)}: not a Parquet file ({e})") from None
        found, expected = _columns(parquet.schema_arrow), _expected_columns(info["fields"])
        if found != expected:
            raise StoreError(f"{self._where(file)}: schema mismatch: file has columns {found}, manifest expects {expected}")
        rows = parquet.metadata.num_rows
        groups = math.ceil(rows / self.manifest["row_group_episodes"])
        if rows != entry["rows"] or parquet.num_row_groups != groups:
            raise StoreError(
                f"{self._where(file)}: manifest mismatch: file has {rows} episodes in {parquet.num_row_groups} row groups,"
                f" manifest says {entry['rows']} in {groups}"
            )
        return parquet

    def verify(self) -> dict[str, int]:
        """Read and check every file of the store; episodes per split."""
        info = self.manifest.get("image_table")
        if info is not None:
            self._verified_file(info["file"], info["sha256"]).close()
        self._distribution = self._load_distribution()
        for split in SPLITS:
            for index in range(len(self._split(split)["shards"])):
                self.shard(split, index)
        return {split: self.episodes(split) for split in SPLITS}

    def reader(
        self,
        split: str,
        batch_size: int,
        worker: int = 0,
        num_workers: int = 1,
        start: dict[str, Any] | None = None,
        loop: bool = True,
        augment: Augment | None = None,
        device: torch.device | None = None,
    ) -> EpisodeReader:
        """Batches of ``split`` for worker ``worker`` of ``num_workers`` (disjoint, together the whole split).

        ``augment`` (image sets, train split only): the run's ``task.augment``, applied to each episode
        with a seed from the store seed and the episode's epoch, shard and row (tasks/augment.py).
        ``device`` (image sets): hold the image table there (once per store) and gather episodes there.
        """
        if device is not None:
            self.distribution.to(device)
        return EpisodeReader(self, split, batch_size, worker, num_workers, start, loop, augment)

    def read_split(self, split: str, limit: int | None = None) -> Episodes:
        """The first ``limit`` (default all) episodes of ``split`` in one batch, for evaluation.

        Raises ValueError for a ``limit`` below 1 and StoreError for an empty split; warns
        (UserWarning, naming both numbers) when the split holds fewer than ``limit``.
        """
        if limit is not None and limit < 1:
            raise ValueError(f"{split} episodes: ask for at least 1, got {limit}")
        held = self.episodes(split)
        if held < 1:
            raise StoreError(f"{self.path}: split {split} has no episodes")
        if limit is not None and limit > held:
            warnings.warn(f"asked for {limit} {split} episodes, {self.path} holds {held}: using {held}", stacklevel=2)
        count = held if limit is None else min(limit, held)
        with self.reader(split, count, loop=False) as reader:
            return next(reader)


class EpisodeReader(Iterator[Episodes]):
    """Streams batches of one worker's row groups with a background read-ahead thread.

    ``position`` is a JSON-serializable dict; pass it as ``start`` to resume with
    exactly the next batch (and, with ``augment``, exactly the same pixels). With ``loop``
    the worker's row groups repeat forever; without it the last batch may be smaller and
    iteration then stops.
    """

    def __init__(
        self,
        store: Store,
        split: str,
        batch_size: int,
        worker: int,
        num_workers: int,
        start: dict[str, Any] | None,
        loop: bool,
        augment: Augment | None = None,
        read_ahead: int = 4,
    ) -> None:
        if batch_size < 1 or num_workers < 1 or not 0 <= worker < num_workers:
            raise ValueError(f"need batch_size >= 1 and 0 <= worker < num_workers, got {batch_size}, {worker}, {num_workers}")
        if augment is not None and (split != "train" or not store.distribution.is_image):
            raise ValueError(f"augmentation applies to the training episodes of image sets, not {split} of {store.path}")
        self._augment = augment
        self._store, self._split, self._batch, self._loop = store, split, batch_size, loop
        info = store._split(split)
        self._fields, self._layout = info["fields"], info["layout"]
        group = store.manifest["row_group_episodes"]
        units = [
            (s, g, min(group, entry["rows"] - g * group))
            for s, entry in enumerate(info["shards"])
            for g in range(math.ceil(entry["rows"] / group))
        ]
        if len(info["shards"]) >= num_workers:
            self._units = [u for u in units if u[0] % num_workers == worker]
        else:
            self._units = units[worker::num_workers]
        if not self._units:
            raise StoreError(
                f"{store.path}: split {split} has {len(units)} row groups of {group} episodes,"
                f" too few for {num_workers} workers"
            )
        self._identity = {"split": split, "worker": worker, "num_workers": num_workers}
        start = dict(start or {"epoch": 0, "unit": 0, "row": 0, "episodes": 0})
        for key, value in self._identity.items():
            if start.get(key, value) != value:
                raise ValueError(f"start position is for {key}={start[key]!r}, this reader has {key}={value!r}")
        if not 0 <= start["unit"] < len(self._units):
            raise ValueError(f"start position unit {start['unit']} is outside this worker's {len(self._units)} row groups")
        self._epoch, self._unit, self._row, self._episodes = start["epoch"], start["unit"], start["row"], start["episodes"]
        self._chunk: dict[str, torch.Tensor] | None = None
        self._chunk_rows = 0
        self._done = False
        self._queue: queue.Queue = queue.Queue(maxsize=read_ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._epoch, self._unit), daemon=True)
        self._thread.start()

    @property
    def position(self) -> dict[str, Any]:
        """Where the next batch starts (JSON-serializable)."""
        return {**self._identity, "epoch": self._epoch, "unit": self._unit, "row": self._row, "episodes": self._episodes}

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, epoch: int, unit: int) -> None:
        try:
            open_shard, parquet = None, None
            while True:
                for index in range(unit, len(self._units)):
                    shard, group, _ = self._units[index]
                    if shard != open_shard:
                        parquet, open_shard = self._store.shard(self._split, shard), shard
                    tensors = _to_tensors(parquet.read_row_group(group), self._fields)
                    if not self._put((epoch, index, tensors)):
                        return
                if not self._loop:
                    self._put(None)
                    return
                epoch, unit = epoch + 1, 0
        except Exception as e:  # handed to the consumer, which raises it
            self._put(e)

    def _next_chunk(self) -> bool:
        item = self._queue.get()
        if isinstance(item, Exception):
            self.close()
            raise item
        if item is None:
            return False
        epoch, unit, tensors = item
        if (epoch, unit) != (self._epoch, self._unit):
            self._row = 0
        self._epoch, self._unit, self._chunk = epoch, unit, tensors
        self._chunk_rows = self._units[unit][2]
        return True

    def __next__(self) -> Episodes:
        if self._done:
            raise StopIteration
        parts, places, need = [], [], self._batch
        while need:
            if self._chunk is None or self._row >= self._chunk_rows:
                if not self._next_chunk():
                    self._done = True
                    break
                continue
            take = min(need, self._chunk_rows - self._row)
            parts.append({k: v[self._row : self._row + take] for k, v in self._chunk.items()})
            shard, group, _ = self._units[self._unit]
            rows = np.arange(self._row, self._row + take) + group * self._store.manifest["row_group_episodes"]
            places.append(np.stack([np.full(take, self._epoch), np.full(take, shard), rows]))
            self._row += take
            need -= take
        if not parts:
            self.close()
            raise StopIteration
        fields = parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        self._episodes += self._batch - need
        augment = None
        if self._augment is not None:
            epoch, shard, row = np.concatenate(places, axis=1)
            seeds = augmentation.episode_seeds(self._store.manifest["seed"], epoch, shard, row)
            augment = functools.partial(augmentation.apply, self._augment, seeds=seeds)
        return self._store.distribution.decode(fields, self._layout, augment)

    def close(self) -> None:
        """Stop the read-ahead thread."""
        self._stop.set()
        self._done = True

    def __enter__(self) -> EpisodeReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_manifest(path: str) -> dict[str, Any] | None:
    fs, root = resolve(path)
    where = f"{path.rstrip('/')}/{MANIFEST}"
    try:
        if not exists(fs, f"{root}/{MANIFEST}"):
            return None
        text = read_bytes(fs, f"{root}/{MANIFEST}")
    except ArrowError as e:
        raise StoreError(f"{where}: cannot be read ({e})") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{where}: not valid JSON ({e})") from None
    _check_manifest(manifest, where)
    return manifest


def open_store(path: str, config: EpisodeConfig | None = None) -> Store:
    """The store at ``path``; with ``config``, refuse a store made for another task or store config."""
    manifest = _read_manifest(path)
    if manifest is None:
        raise StoreError(
            f"{path.rstrip('/')}/{MANIFEST}: missing; {path} is not an episode store, or its precompute did not finish"
        )
    store = Store(path, manifest)
    if config is not None:
        differences = _differences(_identity(manifest["config"]), _identity(config.model_dump(mode="json")))
        if differences:
            raise StoreError(f"{store._where(MANIFEST)}: store made for another config: " + "; ".join(differences))
    return store


def precompute(
    config: EpisodeConfig,
    out: str | None = None,
    episodes: int | None = None,
    seed: int | None = None,
    force: bool = False,
    progress: bool | None = None,
) -> Store:
    """Sample and write every split of ``config`` (a RunConfig works too: only task and store count).

    ``out``, ``episodes`` (training episodes) and ``seed`` override the config's
    store section. A store already there with the same config is returned as it
    is; one with another config is an error unless ``force``. ``progress``: a
    progress bar on stderr (None: only on a terminal).
    """
    store_raw = config.store.model_dump() | {
        k: v for k, v in (("path", out), ("train_episodes", episodes), ("seed", seed)) if v is not None
    }
    try:
        config = EpisodeConfig.model_validate({"task": config.task.model_dump(), "store": store_raw})
    except ValidationError as e:
        raise StoreError(f"precompute: invalid override ({e.errors()[0]['loc'][-1]}: {e.errors()[0]['msg']})") from None
    path = config.store.path
    fs, root = resolve(path)
    wanted = config.model_dump(mode="json")
    try:
        old = _read_manifest(path)
    except StoreError:
        if not force:
            raise
        old = None
    if old is not None:
        differences = _differences(_identity(old["config"]), _identity(wanted))
        if not differences:
            return Store(path, old)
        if not force:
            raise StoreError(
                f"{path.rstrip('/')}/{MANIFEST}: store made for another config ({'; '.join(differences)});"
                " use --force to replace it"
            )
    with _decoded(config.task) as (distribution, decoded):  # data set errors come before anything is written
        try:
            delete(fs, f"{root}/{MANIFEST}")
            if old is not None:
                for split in old["splits"].values():
                    for shard in split["shards"]:
                        delete(fs, f"{root}/{shard['file']}")
            manifest = _write_shards(config, distribution, decoded, fs, root, progress)
            write_atomic(fs, f"{root}/{MANIFEST}", json.dumps(manifest, indent=2, sort_keys=True).encode())
        except ArrowError as e:
            raise StoreError(f"{path}: cannot write the store ({e})") from None
    return Store(path, manifest)


@contextmanager
def _decoded(task: TaskConfig) -> Iterator[tuple[TaskDistribution, Path | None]]:
    """The task's distribution and, for an image set, the ``.npy`` file its table was decoded into, a chunk
    at a time (a scratch file of the node's table cache, removed on exit unless the store adopted it)."""
    if not isinstance(family(task), ImageFamily):
        yield TaskDistribution.load(task), None
        return
    with node_table.scratch() as decoded:
        yield TaskDistribution.load(task, decoded), decoded


def _stored(config: EpisodeConfig) -> dict[str, Any]:
    """The config as the manifest keeps it: without the training augmentation, which the store does not hold."""
    dumped = config.model_dump(mode="json")
    dumped["task"].pop("augment", None)
    dumped["store"].pop("device_table", None)
    return dumped


def _write_shards(
    config: EpisodeConfig, distribution: TaskDistribution, decoded: Path | None, fs: Any, root: str, progress: bool | None
) -> dict:
    store = config.store
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "config": _stored(config),
        "seed": store.seed,
        "row_group_episodes": ROW_GROUP,
        "image_table": None,
        "splits": {},
    }
    if distribution.table is not None:
        table = distribution.table
        digest, _ = write_streamed(fs, f"{root}/{TABLE}", lambda file: write_parquet(table, file))
        manifest["image_table"] = {"file": TABLE, "sha256": digest, "images": len(table.pixels), "shape": list(table.pixels.shape[1:])}
        node_table.adopt(node_table.cache_key(store.path, digest), decoded, table)
    counts = {"train": store.train_episodes, "val": store.val_episodes, "test": store.test_episodes}
    bar = tqdm(total=sum(counts.values()), unit="ep", desc=f"precompute {store.path}", file=sys.stderr,
               disable=None if progress is None else not progress)
    for split_index, split in enumerate(SPLITS):
        layout = distribution.layout(split, store.eval_pixels)
        entry: dict[str, Any] = {"episodes": counts[split], "layout": layout, "fields": [], "shards": []}
        for shard, first in enumerate(range(0, counts[split], store.shard_episodes)):
            rows = min(store.shard_episodes, counts[split] - first)
            rng = np.random.default_rng(np.random.SeedSequence([store.seed, split_index, shard]))
            fields = distribution.sample(split, rng, rows, layout)
            entry["fields"] = [{"name": k, "dtype": v.dtype.str[1:], "shape": list(v.shape[1:])} for k, v in fields.items()]
            data = _shard_bytes(fields)
            file = f"{split}/part-{shard:05d}.parquet"
            write_atomic(fs, f"{root}/{file}", data)
            entry["shards"].append({"file": file, "rows": rows, "sha256": sha256_hex(data), "bytes": len(data)})
            bar.update(rows)
        manifest["splits"][split] = entry
    bar.close()
    return manifest
