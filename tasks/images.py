"""The image table: a data set decoded once into uint8 ``[num_images, C, H, W]``, and its Parquet form.

``resized`` is the MAML paper's resize with PIL LANCZOS that each image family's
``to_array`` builds on (Omniglot 28x28 grayscale with ink = 255, Mini-ImageNet 84x84 RGB);
``ImageFamily.preprocess`` applies exactly that transform to a user's images, so an
exported model sees the same inputs it was trained on.

A table larger than memory never has to be whole in it: decoding can write it to a ``.npy`` file a
chunk at a time (``chunks``, ``assemble``) and ``write_parquet`` streams it a row group at a time.
"""
from __future__ import annotations

import json
import math
import mmap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tasks.errors import StoreError


@dataclass(frozen=True)
class ImageTable:
    """All images of a data set; the images of one class are contiguous and classes ascend."""

    pixels: np.ndarray
    """uint8 [num_images, C, H, W]"""
    classes: np.ndarray
    """int32 [num_images]: class id of each image, 0..num_classes-1"""
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.pixels.dtype != np.uint8 or self.pixels.ndim != 4:
            raise ValueError(f"image table pixels must be uint8 [n, C, H, W], got {self.pixels.dtype} {self.pixels.shape}")
        if len(self.classes) != len(self.pixels) or np.any(np.diff(self.classes) < 0):
            raise ValueError("image table classes must give one ascending class id per image")

    @property
    def starts(self) -> np.ndarray:
        """int64 [num_classes]: row of the first image of each class."""
        return np.searchsorted(self.classes, np.arange(len(self.class_names)))

    @property
    def sizes(self) -> np.ndarray:
        """int64 [num_classes]: images per class."""
        return np.bincount(self.classes, minlength=len(self.class_names))


def resized(image: Image.Image, size: int, mode: str) -> np.ndarray:
    """``image`` converted to ``mode`` ("L" or "RGB") and LANCZOS-resized to ``size`` x ``size``: uint8 ``[C, H, W]``."""
    pixels = np.asarray(image.convert(mode).resize((size, size), Image.LANCZOS), dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


ROW_GROUP_BYTES = 64 << 20
"""Pixels per row group of the table's Parquet file (about 64 MiB), so it can be read a group at a time."""

CHUNK_BYTES = 64 << 20
"""Pixels decoded before they are written to a table's ``.npy`` file (about 64 MiB). With a row group of
the Parquet file, this is what a table held on disk costs in memory, whatever the table's size."""


def chunks(rows: Iterable[np.ndarray], row_shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """Consecutive uint8 rows of ``row_shape`` gathered into blocks of about ``CHUNK_BYTES``.

    One buffer is reused: use each block before asking for the next.
    """
    buffer = np.empty((max(1, CHUNK_BYTES // math.prod(row_shape)), *row_shape), np.uint8)
    filled = 0
    for row in rows:
        buffer[filled] = row
        filled += 1
        if filled == len(buffer):
            yield buffer
            filled = 0
    if filled:
        yield buffer[:filled]


def assemble(blocks: Iterable[np.ndarray], shape: tuple[int, ...], out: Path | None = None) -> np.ndarray:
    """The uint8 array ``shape`` (``[n, C, H, W]``) from consecutive blocks of its rows.

    Without ``out`` it is built in memory. With ``out`` each block is appended to that ``.npy`` file as it
    comes (the bytes ``np.save`` writes) and the file is returned mapped read-only, so memory holds one
    block, never the table. Raises ValueError when the blocks are not ``shape[0]`` rows of ``shape[1:]``.
    """
    def checked(block: np.ndarray) -> np.ndarray:
        if block.shape[1:] != tuple(shape[1:]) or row + len(block) > shape[0]:
            raise ValueError(f"a block of {block.shape} after {row} rows does not fit the table's {tuple(shape)}")
        return block

    row = 0
    if out is None:
        pixels = np.empty(shape, np.uint8)
        for block in blocks:
            pixels[row : row + len(block)] = checked(block)
            row += len(block)
    else:
        with out.open("wb") as file:
            np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
            for block in blocks:
                file.write(np.ascontiguousarray(checked(block), np.uint8).data)
                row += len(block)
    if row != shape[0]:
        raise ValueError(f"{row} rows, the table's shape is {tuple(shape)}")
    return pixels if out is None else np.load(out, mmap_mode="r")


def blocks(pixels: np.ndarray, rows: int) -> Iterator[np.ndarray]:
    """``pixels`` ``rows`` at a time. A table mapped from a ``.npy`` file is read with plain file reads:
    the pages of a map it reads would stay in this process's resident memory, a whole table's worth."""
    if not (isinstance(pixels, np.memmap) and isinstance(pixels.base, mmap.mmap)):
        for start in range(0, len(pixels), rows):
            yield pixels[start : start + rows]
        return
    with open(pixels.filename, "rb") as file:
        file.seek(pixels.offset)
        for start in range(0, len(pixels), rows):
            count = min(rows, len(pixels) - start)
            yield np.fromfile(file, np.uint8, count * math.prod(pixels.shape[1:])).reshape(count, *pixels.shape[1:])


def write_parquet(table: ImageTable, sink: Any) -> None:
    """Write ``table`` as Parquet to ``sink`` (a writable file or Arrow stream), one row group of about
    ``ROW_GROUP_BYTES`` at a time, so memory holds one row group. Deterministic: same table, same bytes,
    whether the table is in memory or mapped. One binary cell per image."""
    n, c, h, w = table.pixels.shape
    width = c * h * w
    schema = pa.schema(
        [("pixels", pa.binary(width)), ("class", pa.int32())],
        metadata={"shape": json.dumps([c, h, w]), "class_names": json.dumps(list(table.class_names))},
    )
    rows = max(1, ROW_GROUP_BYTES // width)
    with pq.ParquetWriter(sink, schema, compression="zstd", use_dictionary=False, write_statistics=False) as writer:
        for start, block in zip(range(0, n, rows), blocks(table.pixels, rows)):
            pixels = np.ascontiguousarray(block)
            group = pa.table(
                {
                    "pixels": pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(pixels), [None, pa.py_buffer(pixels)]),
                    "class": pa.array(table.classes[start : start + len(pixels)], pa.int32()),
                },
                schema=schema,
            )
            writer.write_table(group, row_group_size=rows)


def from_parquet(source: bytes | pa.NativeFile, where: str, out: Path | None = None) -> ImageTable:
    """Read a table written by ``write_parquet`` (its bytes or an open file) one row group at a time:
    into memory, or with ``out`` into that ``.npy`` file, returned mapped (``assemble``).

    Raises StoreError naming ``where`` when it is not a valid image table.
    """
    try:
        parquet = pq.ParquetFile(pa.BufferReader(source) if isinstance(source, bytes) else source)
        meta = parquet.schema_arrow.metadata or {}
        shape = json.loads(meta[b"shape"])
        names = tuple(json.loads(meta[b"class_names"]))
        width = math.prod(shape)
        classes = np.empty(parquet.metadata.num_rows, np.int32)

        def groups() -> Iterator[np.ndarray]:
            row = 0
            for group in range(parquet.num_row_groups):
                part = parquet.read_row_group(group)
                column = part.column("pixels").combine_chunks()
                if column.type != pa.binary(width):
                    raise ValueError(f"pixels column is {column.type}, expected {pa.binary(width)}")
                classes[row : row + len(column)] = part.column("class").to_numpy()
                row += len(column)
                data = np.frombuffer(column.buffers()[1], np.uint8, count=len(column) * width, offset=column.offset * width)
                yield data.reshape(-1, *shape)

        pixels = assemble(groups(), (len(classes), *shape), out)
        return ImageTable(pixels, classes, names)
    except (pa.ArrowException, KeyError, ValueError) as e:
        raise StoreError(f"{where}: not a valid image table ({e})") from None
