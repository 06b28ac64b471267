import numpy as np
import pytest
import torch
from PIL import Image

from tasks.errors import StoreError
from tasks.families import miniimagenet, omniglot
from tasks.families.miniimagenet import MiniImageNetTask
from tasks.families.omniglot import OmniglotTask
from tasks.images import ImageTable, from_parquet, to_parquet


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


def test_preprocess_needs_images():
    with pytest.raises(ValueError, match="at least one image"):
        omniglot.FAMILY.preprocess([], OmniglotTask())


def test_table_round_trips_through_parquet_byte_for_byte():
    rng = np.random.default_rng(1)
    table = ImageTable(rng.integers(0, 256, (6, 1, 4, 4), dtype=np.uint8), np.array([0, 0, 1, 1, 1, 2], np.int32), ("a", "b", "c"))
    data = to_parquet(table)
    assert to_parquet(table) == data
    back = from_parquet(data, "images.parquet")
    assert np.array_equal(back.pixels, table.pixels) and np.array_equal(back.classes, table.classes)
    assert back.class_names == table.class_names
    assert back.starts.tolist() == [0, 2, 5] and back.sizes.tolist() == [2, 3, 1]


def test_garbage_is_not_an_image_table():
    with pytest.raises(StoreError, match="x/images.parquet: not a valid image table"):
        from_parquet(b"not parquet at all", "x/images.parquet")


def test_table_classes_must_ascend():
    with pytest.raises(ValueError, match="ascending"):
        ImageTable(np.zeros((2, 1, 2, 2), np.uint8), np.array([1, 0], np.int32), ("a", "b"))
