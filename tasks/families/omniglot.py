"""Omniglot (Lake et al. 2015): 1623 characters of 50 alphabets, 20 drawings each, 105x105 PNGs.

Read from ``<root>/omniglot`` in one of three layouts, tried in this order:
the original zips (``images_background.zip``, ``images_evaluation.zip``),
torchvision's download folder (``omniglot-py/images_background/...``), or the
unzipped folders (``images_background/...``). Characters are sorted by
(alphabet, character folder), permuted with ``task.split_seed``: the first
``train_characters`` are meta-training, the next ``val_characters`` validation
and the rest (423 by default) test. Rotations are applied when episodes are
decoded, so the table holds each drawing once.
"""
from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from tasks.datasets import data_root
from tasks.errors import DatasetError
from tasks.families.image_folder import ImageFile, build_table, open_image
from tasks.family import ImageFamily, ImageTask, TaskSpec
from tasks.images import ImageTable, resized


class OmniglotTask(ImageTask):
    """Omniglot: 1200 training characters (the last 100 of them for validation), 423 test."""

    name: Literal["omniglot"] = "omniglot"
    image_size: int = Field(28, ge=8)
    rotations: bool = Field(True, description="0/90/180/270 degree rotations as extra classes (MAML paper)")
    split_seed: int = Field(1, ge=0, lt=2**63, description="seed of the fixed permutation of the 1623 characters")
    train_characters: int = Field(1100, ge=1)
    val_characters: int = Field(100, ge=1)
    characters: int = Field(1623, ge=3, description="character folders the data set must hold (1623 in Omniglot)")
    drawings: int = Field(20, ge=1, description="drawings each character folder must hold (20 in Omniglot)")

    @model_validator(mode="after")
    def _split(self) -> OmniglotTask:
        if self.train_characters + self.val_characters >= self.characters:
            raise ValueError(
                f"task.train_characters + task.val_characters ({self.train_characters} + {self.val_characters})"
                f" must leave test characters out of task.characters ({self.characters})"
            )
        turns = 4 if self.rotations else 1
        splits = {
            "train": self.train_characters,
            "val": self.val_characters,
            "test": self.characters - self.train_characters - self.val_characters,
        }
        for split, characters in splits.items():
            if self.ways > characters * turns:
                raise ValueError(f"task.ways={self.ways}: the {split} split has only {characters * turns} classes")
        if self.shots + self.queries > self.drawings:
            raise ValueError(
                f"task.shots + task.queries = {self.shots} + {self.queries}: a character has only {self.drawings} drawings"
            )
        return self

SETS = ("images_background", "images_evaluation")
SOURCE_SIZE = (105, 105)

def locate(root: Path) -> tuple[str, list[Path]]:
    """The layout found under ``root/omniglot`` and its two set locations (zips or folders)."""
    base = root / "omniglot"
    layouts = {
        "zip": [base / f"{s}.zip" for s in SETS],
        "torchvision": [base / "omniglot-py" / s for s in SETS],
        "folder": [base / s for s in SETS],
    }
    for name, paths in layouts.items():
        if all(p.exists() for p in paths):
            return name, paths
    tried = "; ".join(" + ".join(str(p) for p in paths) for paths in layouts.values())
    raise DatasetError(
        f"Omniglot not found under {base}: expected one of {tried}"
        " (run `python -m pipeline download omniglot` with internet, or set task.data_root / METAPIPE_DATA)"
    )


Member = tuple[str, str, ImageFile]
"""(alphabet, character, drawing) of one drawing."""


def _zip_members(path: Path, top: str) -> Iterator[Member]:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: not a readable zip ({e})") from None
    for name in sorted(archive.namelist()):
        if name.endswith("/"):
            continue
        parts = name.split("/")
        if len(parts) != 4 or parts[0] != top or not parts[3].endswith(".png"):
            raise DatasetError(f"{path}: unexpected member {name} (expected {top}/<Alphabet>/<characterNN>/<id>.png)")
        yield parts[1], parts[2], ImageFile(f"{path}:{name}", lambda name=name: archive.read(name))


def _folder_members(path: Path) -> Iterator[Member]:
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        parts = file.relative_to(path).parts
        if len(parts) != 3 or file.suffix != ".png":
            raise DatasetError(f"{path}: unexpected file {file} (expected <Alphabet>/<characterNN>/<id>.png)")
        yield parts[0], parts[1], ImageFile(str(file))


def _members(layout: str, paths: list[Path]) -> Iterator[Member]:
    for top, path in zip(SETS, paths):
        yield from _zip_members(path, top) if layout == "zip" else _folder_members(path)


def _decode(file: ImageFile, task: OmniglotTask) -> np.ndarray:
    image = open_image(file)
    if image.size != SOURCE_SIZE:
        raise DatasetError(f"{file.where}: image is {image.size[0]}x{image.size[1]}, Omniglot drawings are 105x105")
    return to_array(image, task)


def load(task: OmniglotTask, out: Path | None = None) -> ImageTable:
    """Every drawing, one class per character, checked against ``task.characters`` and ``task.drawings``;
    with ``out``, decoded into that ``.npy`` file a chunk at a time (``build_table``)."""
    layout, paths = locate(data_root(task.data_root))
    by_character: dict[tuple[str, str], list[ImageFile]] = {}
    for alphabet, character, drawing in _members(layout, paths):
        by_character.setdefault((alphabet, character), []).append(drawing)
    where = " and ".join(str(p) for p in paths)
    if len(by_character) != task.characters:
        raise DatasetError(
            f"{where}: found {len(by_character)} character folders, expected {task.characters}"
            " (a class is missing or extra; check the download)"
        )
    classes = []
    for key in sorted(by_character):
        files = sorted(by_character[key], key=lambda f: f.where)
        if len(files) != task.drawings:
            folder = files[0].where.rsplit("/", 1)[0]
            raise DatasetError(f"{folder}: {len(files)} drawings, expected {task.drawings}")
        classes.append(("/".join(key), files))
    return build_table(classes, lambda file: _decode(file, task), out)


def split_classes(task: OmniglotTask, table: ImageTable) -> dict[str, np.ndarray]:
    """Class ids of the train, val and test characters: a fixed permutation by ``task.split_seed``."""
    order = np.random.default_rng(task.split_seed).permutation(len(table.class_names))
    cut = task.train_characters, task.train_characters + task.val_characters
    return {
        "train": np.sort(order[: cut[0]]),
        "val": np.sort(order[cut[0] : cut[1]]),
        "test": np.sort(order[cut[1] :]),
    }


def to_array(image: Image.Image, task: OmniglotTask) -> np.ndarray:
    """One drawing as a uint8 ``[1, H, W]`` row: grayscale, LANCZOS resize to ``task.image_size``, ink = 255."""
    return 255 - resized(image, task.image_size, "L")


def spec(task: OmniglotTask) -> TaskSpec:
    """N-way classification of ``[1, image_size, image_size]`` drawings."""
    return TaskSpec(kind="classification", input_shape=(1, task.image_size, task.image_size), outputs=task.ways, loss="cross_entropy")


FAMILY = ImageFamily(config=OmniglotTask, spec=spec, load=load, split_classes=split_classes, to_array=to_array)
