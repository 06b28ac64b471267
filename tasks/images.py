"""The image table: a data set decoded once into uint8 ``[num_images, C, H, W]``, and its Parquet form.

``resized`` is the MAML paper's resize with PIL LANCZOS that each image family's
``to_array`` builds on (Omniglot 28x28 grayscale with ink = 255, Mini-ImageNet 84x84 RGB);
``ImageFamily.preprocess`` applies exactly that transform to a user's images, so an
exported model sees the same inputs it was trained on.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

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


def to_parquet(table: ImageTable) -> bytes:
    """The table as Parquet bytes (deterministic: same table, same bytes); one binary cell per image."""
    n, c, h, w = table.pixels.shape
    pixels = np.ascontiguousarray(table.pixels)
    arrow = pa.table(
        {
            "pixels": pa.FixedSizeBinaryArray.from_buffers(pa.binary(c * h * w), n, [None, pa.py_buffer(pixels)]),
            "class": pa.array(table.classes, pa.int32()),
        },
        metadata={"shape": json.dumps([c, h, w]), "class_names": json.dumps(list(table.class_names))},
    )
    sink = pa.BufferOutputStream()
    rows = max(1, ROW_GROUP_BYTES // (c * h * w))
    pq.write_table(arrow, sink, compression="zstd", use_dictionary=False, write_statistics=False, row_group_size=rows)
    return sink.getvalue().to_pybytes()


def from_parquet(
    source: bytes | pa.NativeFile, where: str, allocate: Callable[[tuple[int, ...]], np.ndarray] | None = None
) -> ImageTable:
    """Read a table written by ``to_parquet`` (its bytes or an open file), one row group at a time, into
    the array ``allocate(shape)`` returns (default in memory; a memory map writes it to disk).

    Raises StoreError naming ``where`` when it is not a valid image table.
    """
    try:
        parquet = pq.ParquetFile(pa.BufferReader(source) if isinstance(source, bytes) else source)
        meta = parquet.schema_arrow.metadata or {}
        shape = json.loads(meta[b"shape"])
        names = tuple(json.loads(meta[b"class_names"]))
        width = math.prod(shape)
        rows = (parquet.metadata.num_rows, *shape)
        pixels = np.empty(rows, np.uint8) if allocate is None else allocate(rows)
        classes = np.empty(parquet.metadata.num_rows, np.int32)
        row = 0
        for group in range(parquet.num_row_groups):
            part = parquet.read_row_group(group)
            column = part.column("pixels").combine_chunks()
            if column.type != pa.binary(width):
                raise ValueError(f"pixels column is {column.type}, expected {pa.binary(width)}")
            data = np.frombuffer(column.buffers()[1], np.uint8, count=len(column) * width, offset=column.offset * width)
            pixels[row : row + len(column)] = data.reshape(-1, *shape)
            classes[row : row + len(column)] = part.column("class").to_numpy()
            row += len(column)
        return ImageTable(pixels, classes, names)
    except (pa.ArrowException, KeyError, ValueError) as e:
        raise StoreError(f"{where}: not a valid image table ({e})") from None
