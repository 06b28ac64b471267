import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tasks import images
from tasks.errors import StoreError
from tasks.families import miniimagenet, omniglot
from tasks.families.miniimagenet import MiniImageNetTask
from tasks.families.omniglot import OmniglotTask
from tasks.family import to_inputs
from tasks.images import ImageTable, from_parquet, write_parquet


def test_omniglot_rows_are_28x28_with_ink_high():
    paper = np.ones((105, 105), dtype=bool)
    paper[40:60, 40:60] = False  # black ink square
    row = omniglot.to_array(Image.fromarray(paper), OmniglotTask())
    assert row.shape == (1, 28, 28) and row.dtype == np.uint8
    assert row[0, 14, 14] == 255 and row[0, 0, 0] == 0


def test_miniimagenet_rows_are_84x84_rgb():
    image = Image.fromarray(np.full((100, 120, 3), (255, 0, 0), dtype=np.uint8))
    row = miniimagenet.to_array(image, MiniImageNetTask())
    assert row.shape == (3, 84, 84)
    assert row[0].min() == 255 and row[1].max() == 0


def test_preprocess_is_the_table_transform_scaled_to_unit_range():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.random((105, 105)) > 0.5) for _ in range(3)]
    task = OmniglotTask()
    x = omniglot.FAMILY.preprocess(images, task)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    expected = torch.from_numpy(np.stack([omniglot.to_array(im, task) for im in images])).float() / 255
    assert torch.equal(x, expected)


def test_inputs_are_pixels_scaled_to_unit_range_then_normalized_per_channel():
    pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    scaled = to_inputs(pixels, None)
    assert scaled.dtype == torch.float32 and torch.equal(scaled, pixels.float() / 255)
    normed = to_inputs(pixels, ((0.5, 0.2, 0.9), (0.25, 0.5, 0.1)))
    reference = (pixels.double() / 255 - torch.tensor([0.5, 0.2, 0.9]).double().view(3, 1, 1)) / torch.tensor(
        [0.25, 0.5, 0.1]
    ).double().view(3, 1, 1)
    assert torch.allclose(normed.double(), reference, atol=1e-6)
    assert pixels.dtype == torch.uint8 and int(pixels.max()) == 255  # the table is not touched


def test_inputs_are_the_cpus_float32_arithmetic_bit_for_bit_on_the_pixels_device():
    """Every pixel value: the looked-up input equals float32 ``x / 255`` (and ``(x - m) / s``) computed on the CPU,
    and the lookup happens where the pixels are (a GPU worker's table; "meta" stands in for it here)."""
    pixels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(2, 3, 16, 16)
    mean, std = (0.5, 0.2, 0.9), (0.25, 0.5, 0.1)
    assert torch.equal(to_inputs(pixels, None), pixels.to(torch.float32).div_(255.0))
    by_hand = pixels.to(torch.float32).div_(255.0).sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))
    assert torch.equal(to_inputs(pixels, (mean, std)), by_hand)
    for normalization in (None, (mean, std)):
        moved = to_inputs(pixels.to("meta"), normalization)
        assert moved.device.type == "meta" and moved.shape == pixels.shape and moved.dtype == torch.float32


def test_preprocess_needs_images():
    with pytest.raises(ValueError, match="at least one image"):
        omniglot.FAMILY.preprocess([], OmniglotTask())


def small_table(rows: int = 8) -> ImageTable:
    """``rows`` random 1x4x4 images (16 bytes each) in three classes."""
    classes = np.minimum(np.arange(rows) * 3 // rows, 2).astype(np.int32)
    return ImageTable(np.random.default_rng(1).integers(0, 256, (rows, 1, 4, 4), dtype=np.uint8), classes, ("a", "b", "c"))


def parquet_bytes(table: ImageTable) -> bytes:
    sink = pa.BufferOutputStream()
    write_parquet(table, sink)
    return sink.getvalue().to_pybytes()


def one_write(table: ImageTable) -> bytes:
    """The reference: the whole table as one Arrow table, written by one pq.write_table call (how the
    store wrote images.parquet before it streamed row groups)."""
    n, c, h, w = table.pixels.shape
    arrow = pa.table(
        {
            "pixels": pa.FixedSizeBinaryArray.from_buffers(pa.binary(c * h * w), n, [None, pa.py_buffer(table.pixels.copy())]),
            "class": pa.array(table.classes, pa.int32()),
        },
        metadata={"shape": json.dumps([c, h, w]), "class_names": json.dumps(list(table.class_names))},
    )
    sink = pa.BufferOutputStream()
    rows = max(1, images.ROW_GROUP_BYTES // (c * h * w))
    pq.write_table(arrow, sink, compression="zstd", use_dictionary=False, write_statistics=False, row_group_size=rows)
    return sink.getvalue().to_pybytes()


def test_table_round_trips_through_parquet_byte_for_byte():
    table = small_table(6)
    data = parquet_bytes(table)
    assert parquet_bytes(table) == data == one_write(table)
    back = from_parquet(data, "images.parquet")
    assert np.array_equal(back.pixels, table.pixels) and np.array_equal(back.classes, table.classes)
    assert back.class_names == table.class_names
    assert back.starts.tolist() == [0, 2, 4] and back.sizes.tolist() == [2, 2, 2]


def test_parquet_streamed_a_row_group_at_a_time_is_the_one_write_byte_for_byte(monkeypatch):
    monkeypatch.setattr(images, "ROW_GROUP_BYTES", 3 * 16)  # 3 images a row group: 3 + 3 + 2
    table = small_table(8)
    data = parquet_bytes(table)
    assert pq.ParquetFile(pa.BufferReader(data)).num_row_groups == 3
    assert data == one_write(table)
    assert np.array_equal(from_parquet(data, "images.parquet").pixels, table.pixels)


def test_a_table_written_chunk_by_chunk_is_np_saves_file_and_the_same_parquet(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "CHUNK_BYTES", 2 * 16 + 5)  # 2 images a chunk: 4 chunks
    monkeypatch.setattr(images, "ROW_GROUP_BYTES", 3 * 16)
    table = small_table(8)
    assert [len(c) for c in images.chunks(iter(table.pixels), (1, 4, 4))] == [2, 2, 2, 2]
    mapped = images.assemble(images.chunks(iter(table.pixels), (1, 4, 4)), table.pixels.shape, tmp_path / "table.npy")
    np.save(tmp_path / "reference.npy", table.pixels)
    assert (tmp_path / "table.npy").read_bytes() == (tmp_path / "reference.npy").read_bytes()
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable and np.array_equal(mapped, table.pixels)
    in_memory = images.assemble(images.chunks(iter(table.pixels), (1, 4, 4)), table.pixels.shape)
    assert not isinstance(in_memory, np.memmap) and np.array_equal(in_memory, table.pixels)
    assert parquet_bytes(ImageTable(mapped, table.classes, table.class_names)) == one_write(table)  # read by file reads
    back = from_parquet(parquet_bytes(table), "images.parquet", tmp_path / "back.npy")
    assert (tmp_path / "back.npy").read_bytes() == (tmp_path / "reference.npy").read_bytes()
    assert isinstance(back.pixels, np.memmap) and np.array_equal(back.classes, table.classes)


def test_blocks_that_do_not_make_the_table_are_refused(tmp_path):
    rows = np.zeros((3, 1, 2, 2), np.uint8)
    for out in (None, tmp_path / "t.npy"):
        with pytest.raises(ValueError, match="2 rows, the table's shape is \\(3, 1, 2, 2\\)"):
            images.assemble([rows[:2]], (3, 1, 2, 2), out)
        with pytest.raises(ValueError, match="does not fit the table's \\(3, 1, 2, 2\\)"):
            images.assemble([rows, rows[:1]], (3, 1, 2, 2), out)
        with pytest.raises(ValueError, match="does not fit"):
            images.assemble([np.zeros((3, 1, 2, 3), np.uint8)], (3, 1, 2, 2), out)


def test_garbage_is_not_an_image_table():
    with pytest.raises(StoreError, match="x/images.parquet: not a valid image table"):
        from_parquet(b"not parquet at all", "x/images.parquet")


def test_table_classes_must_ascend():
    with pytest.raises(ValueError, match="ascending"):
        ImageTable(np.zeros((2, 1, 2, 2), np.uint8), np.array([1, 0], np.int32), ("a", "b"))
