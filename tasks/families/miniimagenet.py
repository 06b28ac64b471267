"""Mini-ImageNet in the layout of Ravi & Larochelle: ``<root>/miniimagenet/images/*.jpg`` and
``train.csv``, ``val.csv``, ``test.csv`` (columns ``filename,label``), resized to 84x84 RGB.

The splits are the CSVs' (64/16/20 classes in the original); a class (label)
belongs to exactly one split.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field

from tasks.datasets import data_root
from tasks.errors import DatasetError
from tasks.family import ImageFamily, ImageTask, TaskSpec
from tasks.images import ImageTable, resized


class MiniImageNetTask(ImageTask):
    """Mini-ImageNet in the layout of Ravi & Larochelle: images/ plus train/val/test.csv."""

    name: Literal["miniimagenet"] = "miniimagenet"
    image_size: int = Field(84, ge=8)

SPLITS = ("train", "val", "test")


def _read_csv(path: Path) -> dict[str, list[str]]:
    """label -> file names, in the order of the file."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing (Mini-ImageNet needs train.csv, val.csv and test.csv)")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["filename", "label"]:
            raise DatasetError(f"{path}: header is {header}, expected ['filename', 'label']")
        by_label: dict[str, list[str]] = {}
        for line, row in enumerate(reader, start=2):
            if len(row) != 2:
                raise DatasetError(f"{path}:{line}: expected filename,label, got {row}")
            by_label.setdefault(row[1], []).append(row[0])
    if not by_label:
        raise DatasetError(f"{path}: no images listed")
    return by_label


def _decode(path: Path, task: MiniImageNetTask) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return to_array(image, task)
    except FileNotFoundError:
        raise DatasetError(f"{path}: image listed in the CSV is missing") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable image ({e})") from None


def _splits(base: Path) -> dict[str, dict[str, list[str]]]:
    splits = {s: _read_csv(base / f"{s}.csv") for s in SPLITS}
    seen: dict[str, str] = {}
    for split, by_label in splits.items():
        for label in by_label:
            if label in seen:
                raise DatasetError(f"{base / (split + '.csv')}: class {label} is also in {seen[label]}.csv")
            seen[label] = split
    return splits


def load(task: MiniImageNetTask) -> ImageTable:
    """Every listed image; classes ``<split>/<label>`` ordered by split (train, val, test), then label."""
    base = data_root(task.data_root) / "miniimagenet"
    if not (base / "images").is_dir():
        raise DatasetError(f"{base / 'images'}: missing (expected Mini-ImageNet images/ plus train/val/test.csv)")
    pixels, classes, names = [], [], []
    for split, by_label in _splits(base).items():
        for label in sorted(by_label):
            pixels.extend(_decode(base / "images" / name, task) for name in by_label[label])
            classes.extend([len(names)] * len(by_label[label]))
            names.append(f"{split}/{label}")
    return ImageTable(np.stack(pixels), np.asarray(classes, dtype=np.int32), tuple(names))


def split_classes(task: MiniImageNetTask, table: ImageTable) -> dict[str, np.ndarray]:
    """Class ids of each split, as the CSVs assigned them (class names are ``<split>/<label>``)."""
    split_of = np.array([name.split("/", 1)[0] for name in table.class_names])
    return {split: np.flatnonzero(split_of == split) for split in SPLITS}


def to_array(image: Image.Image, task: MiniImageNetTask) -> np.ndarray:
    """One image as a uint8 ``[3, H, W]`` row: RGB, LANCZOS resize to ``task.image_size``."""
    return resized(image, task.image_size, "RGB")


def spec(task: MiniImageNetTask) -> TaskSpec:
    """N-way classification of ``[3, image_size, image_size]`` RGB images."""
    return TaskSpec(kind="classification", input_shape=(3, task.image_size, task.image_size), outputs=task.ways, loss="cross_entropy")


FAMILY = ImageFamily(config=MiniImageNetTask, spec=spec, load=load, split_classes=split_classes, to_array=to_array)
