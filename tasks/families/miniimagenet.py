"""Mini-ImageNet in the layout of Ravi & Larochelle: ``<root>/miniimagenet/images/*.jpg`` and
``train.csv``, ``val.csv``, ``test.csv`` (columns ``filename,label``), resized to 84x84 RGB.

The splits are the CSVs' (64/16/20 classes in the original); a class (label)
belongs to exactly one split. The reading is image_folder's CSV split files; this module
holds only the layout (``miniimagenet/`` under the data root, CSVs beside ``images/``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from tasks.datasets import data_root
from tasks.errors import DatasetError
from tasks.families import image_folder
from tasks.family import ImageFamily, ImageTask, TaskSpec
from tasks.images import ImageTable, resized


class MiniImageNetTask(ImageTask):
    """Mini-ImageNet in the layout of Ravi & Larochelle: images/ plus train/val/test.csv."""

    name: Literal["miniimagenet"] = "miniimagenet"
    image_size: int = Field(84, ge=8)


def load(task: MiniImageNetTask, out: Path | None = None) -> ImageTable:
    """Every listed image; classes ``<split>/<label>`` ordered by split (train, val, test), then label;
    with ``out``, decoded into that ``.npy`` file a chunk at a time (``image_folder.build_table``)."""
    base = data_root(task.data_root) / "miniimagenet"
    if not (base / "images").is_dir():
        raise DatasetError(f"{base / 'images'}: missing (expected Mini-ImageNet images/ plus train/val/test.csv)")
    files = {split: base / f"{split}.csv" for split in image_folder.SPLITS}
    splits = {split: image_folder.csv_classes(path, base / "images") for split, path in files.items()}
    image_folder.check_disjoint(splits, files)
    return image_folder.build_table(
        image_folder.by_split(splits),
        lambda file: to_array(image_folder.open_image(file, "image listed in the CSV is missing"), task),
        out,
    )


split_classes = image_folder.split_classes
"""Class ids of each split, as the CSVs assigned them (class names are ``<split>/<label>``)."""


def to_array(image: Image.Image, task: MiniImageNetTask) -> np.ndarray:
    """One image as a uint8 ``[3, H, W]`` row: RGB, LANCZOS resize to ``task.image_size``."""
    return resized(image, task.image_size, "RGB")


def spec(task: MiniImageNetTask) -> TaskSpec:
    """N-way classification of ``[3, image_size, image_size]`` RGB images."""
    return TaskSpec(kind="classification", input_shape=(3, task.image_size, task.image_size), outputs=task.ways, loss="cross_entropy")


FAMILY = ImageFamily(
    config=MiniImageNetTask, spec=spec, load=load, split_classes=split_classes, to_array=to_array
)
