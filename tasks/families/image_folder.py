"""Any image data set laid out as class folders (``task.name: image_folder``), and the reading code the
benchmark families (Omniglot, Mini-ImageNet) are built on.

A class is a folder of PNG or JPEG images, ``task.class_depth`` folders deep (``n01532829/`` at depth 1,
``Alphabet/character01/`` at depth 2). The train, val and test classes come from one of:

- ``split: folders``: top-level ``train/``, ``val/``, ``test/`` folders, each holding class folders;
- ``split: files``: ``task.split_files`` (relative to the root) listing each split's classes: a ``.txt``
  file with one class per line (class folders under ``task.images``), or a ``.csv`` file in the form of
  Ravi & Larochelle (header ``filename,label``; the listed files lie flat in ``task.images``);
- ``split: list``: one of the public split lists shipped under ``configs/splits/<split_list>/``.

Images are decoded once, converted to ``task.mode`` ("L" or "RGB") and LANCZOS-resized to
``task.image_size``; an image whose file mode is not in ``task.file_modes`` is an error, so a stray
grayscale JPEG in an RGB set is caught rather than silently converted. Every problem (a missing split
file, a listed class that is absent, a class with fewer images than shots + queries, an unreadable
image, a wrong mode, a stray file) is a DatasetError naming the file or class, raised before anything
is written. Classes of the table are named ``<split>/<class>``.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field, model_validator

from tasks.datasets import data_root
from tasks.errors import DatasetError
from tasks.family import ImageFamily, ImageTask, Strict, TaskSpec
from tasks.images import ImageTable, assemble, chunks, resized

SPLITS = ("train", "val", "test")
SUFFIXES = (".png", ".jpg", ".jpeg")
SHIPPED = Path(__file__).resolve().parents[2] / "configs" / "splits"
"""The public split lists shipped with metapipe: ``configs/splits/<name>/{train,val,test}.txt``."""
FILE_MODES = {"L": ("1", "L"), "RGB": ("RGB",)}
"""PIL modes an image file may have by default, per table mode."""


class SplitFiles(Strict):
    """Each split's class list, relative to the data set root (``.txt``: class names; ``.csv``: Ravi & Larochelle)."""

    train: str = "train.txt"
    val: str = "val.txt"
    test: str = "test.txt"


class Normalize(Strict):
    """Per-channel ``(x - mean) / std`` on pixels scaled to [0, 1], applied when episodes are decoded."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @model_validator(mode="after")
    def _positive(self) -> Normalize:
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"normalize: mean {self.mean} and std {self.std} need one value per channel, std > 0")
        return self


class ImageFolderTask(ImageTask):
    """A data set of class folders under ``root``, split by folders, split files or a shipped list."""

    name: Literal["image_folder"] = "image_folder"
    root: str = Field(..., description="the data set's folder; a relative path is under the data root")
    split: Literal["folders", "files", "list"] = "folders"
    split_files: SplitFiles = SplitFiles()
    split_list: str | None = Field(None, description="with split: list, a folder name under configs/splits/")
    images: str = Field(".", description="folder under root holding the class folders (or a CSV split's files)")
    class_depth: int = Field(1, ge=1, description="folders from the class-folder root down to a class")
    mode: Literal["L", "RGB"] = "RGB"
    file_modes: tuple[str, ...] | None = Field(None, description="PIL modes a file may have; default L: 1, L; RGB: RGB")
    image_size: int = Field(84, ge=8)
    normalize: Normalize | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ImageFolderTask:
        if self.split == "list":
            if self.split_list is None:
                raise ValueError("task.split: list needs task.split_list, a folder name under configs/splits/")
            if not (SHIPPED / self.split_list).is_dir():
                known = sorted(p.name for p in SHIPPED.iterdir()) if SHIPPED.is_dir() else []
                raise ValueError(f"task.split_list={self.split_list!r}: no such list in {SHIPPED} (shipped: {known})")
        elif self.split_list is not None:
            raise ValueError(f"task.split_list is only read with split: list, not split: {self.split}")
        if self.normalize is not None and len(self.normalize.mean) != len(self.mode):
            raise ValueError(f"task.normalize: {len(self.normalize.mean)} channels, mode {self.mode} has {len(self.mode)}")
        return self


@dataclass(frozen=True, slots=True)
class ImageFile:
    """One image of a data set: where it is (for messages) and how to read its bytes. A data set may list
    hundreds of thousands, so a plain file keeps only its path (about 150 bytes each, not 450 with a Path)."""

    where: str
    read: Callable[[], bytes] | None = None
    """reads the bytes (e.g. of a zip member); None: ``where`` is the file's path"""

    def data(self) -> bytes:
        """The file's bytes; FileNotFoundError when it is absent."""
        return Path(self.where).read_bytes() if self.read is None else self.read()


Classes = dict[str, list[ImageFile]]
"""class name -> its images, in table order."""


def open_image(file: ImageFile, missing: str = "missing") -> Image.Image:
    """The decoded PIL image of ``file``; DatasetError naming it when it is absent or unreadable."""
    try:
        data = file.data()
    except FileNotFoundError:
        raise DatasetError(f"{file.where}: {missing}") from None
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"{file.where}: unreadable image ({e})") from None
    return image


def build_table(
    classes: list[tuple[str, list[ImageFile]]], to_row: Callable[[ImageFile], np.ndarray], out: Path | None = None
) -> ImageTable:
    """Decode every image into one table, classes in the order given (their names as given).

    ``to_row`` maps one file to a uint8 ``[C, H, W]`` row (raising DatasetError naming it). Without
    ``out`` the table is held in memory; with ``out`` it is written to that ``.npy`` file a chunk at a
    time and mapped read-only, so memory holds one chunk of pixels (tasks.images.assemble), plus the
    file list. Raises DatasetError when there is no image.
    """
    sizes = [len(files) for _, files in classes]
    rows = (to_row(file) for _, files in classes for file in files)
    first = next(rows, None)
    if first is None:
        raise DatasetError("no images found")
    pixels = assemble(chunks(chain([first], rows), first.shape), (sum(sizes), *first.shape), out)
    ids = np.repeat(np.arange(len(classes), dtype=np.int32), sizes)
    return ImageTable(pixels, ids, tuple(name for name, _ in classes))


def by_split(splits: dict[str, Classes]) -> list[tuple[str, list[ImageFile]]]:
    """The classes of every split in order, named ``<split>/<class>`` (what ``split_classes`` reads back)."""
    return [(f"{split}/{name}", files) for split, classes in splits.items() for name, files in classes.items()]


def split_classes(task: Any, table: ImageTable) -> dict[str, np.ndarray]:
    """Class ids of each split, recovered from the table's class names ``<split>/<class>``."""
    split_of = np.array([name.split("/", 1)[0] for name in table.class_names])
    return {split: np.flatnonzero(split_of == split) for split in SPLITS}


def read_csv_split(path: Path) -> dict[str, list[str]]:
    """A split file in the form of Ravi & Larochelle: label -> file names, in the order of the file."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing (a split file of the task)")
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


def csv_classes(path: Path, images: Path) -> Classes:
    """The classes of one CSV split file, their files looked up flat in ``images`` (labels sorted)."""
    by_label = read_csv_split(path)
    return {label: [_file(images / name) for name in by_label[label]] for label in sorted(by_label)}


def check_disjoint(splits: dict[str, Classes], files: dict[str, Path]) -> None:
    """A class may belong to one split only; the error names both split files."""
    seen: dict[str, str] = {}
    for split, classes in splits.items():
        for name in classes:
            if name in seen:
                raise DatasetError(f"{files[split]}: class {name} is also in {files[seen[name]].name}")
            seen[name] = split


def _file(path: Path) -> ImageFile:
    return ImageFile(str(path))


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def class_images(folder: Path, name: str) -> list[ImageFile]:
    """The PNG/JPEG files of one class folder, sorted by name; a sub-folder or another file is an error."""
    files = []
    for path in _visible(folder):
        if path.is_dir():
            raise DatasetError(f"{path}: a folder inside class {name} (is task.class_depth right?)")
        if path.suffix.lower() not in SUFFIXES:
            raise DatasetError(f"{path}: not a PNG or JPEG file (class {name})")
        files.append(_file(path))
    return files


def folder_classes(folder: Path, depth: int) -> Classes:
    """Every class ``depth`` folders below ``folder`` with its images."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: missing (expected class folders here)")
    level = [folder]
    for _ in range(depth):
        below = []
        for parent in level:
            for child in _visible(parent):
                if not child.is_dir():
                    raise DatasetError(f"{child}: a file where class folders are expected (task.class_depth={depth})")
                below.append(child)
        level = below
    return {"/".join(p.relative_to(folder).parts): class_images(p, "/".join(p.relative_to(folder).parts)) for p in level}


def listed_classes(path: Path, images: Path, depth: int) -> Classes:
    """The classes a ``.txt`` split file lists (one per line), each read from its folder under ``images``."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing (a split file of the task)")
    classes: Classes = {}
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        name = text.strip()
        if not name:
            continue
        if len(Path(name).parts) != depth:
            raise DatasetError(f"{path}:{line}: class {name!r} is not {depth} folder(s) deep (task.class_depth)")
        if name in classes:
            raise DatasetError(f"{path}:{line}: class {name} is listed twice")
        if not (images / name).is_dir():
            raise DatasetError(f"{path}:{line}: class {name} is listed but {images / name} does not exist")
        classes[name] = class_images(images / name, name)
    if not classes:
        raise DatasetError(f"{path}: no classes listed")
    return classes


def dataset_root(task: ImageFolderTask) -> Path:
    """``task.root``, under the data root when relative."""
    root = Path(task.root).expanduser()
    return root if root.is_absolute() else data_root(task.data_root) / root


def split_sources(task: ImageFolderTask, root: Path) -> dict[str, Path]:
    """Where each split's classes come from: its folder, split file or shipped list."""
    if task.split == "folders":
        return {split: root / split for split in SPLITS}
    if task.split == "list":
        return {split: SHIPPED / task.split_list / f"{split}.txt" for split in SPLITS}
    return {split: root / getattr(task.split_files, split) for split in SPLITS}


def find_classes(task: ImageFolderTask) -> dict[str, Classes]:
    """Each split's classes and their image files, checked against the task (nothing decoded yet)."""
    root = dataset_root(task)
    if not root.is_dir():
        relative = "" if Path(task.root).expanduser().is_absolute() else (
            f" (task.root {task.root!r} is relative, so it is read under the data root {data_root(task.data_root)}:"
            " task.data_root, else $METAPIPE_DATA, else ../shared/data; give an absolute path to read it elsewhere)"
        )
        raise DatasetError(f"{root}: task.root does not exist{relative}")
    sources = split_sources(task, root)
    images = root / task.images
    splits: dict[str, Classes] = {}
    for split, source in sources.items():
        if task.split == "folders":
            splits[split] = folder_classes(source, task.class_depth)
        elif source.suffix == ".csv":
            splits[split] = csv_classes(source, images)
        else:
            splits[split] = listed_classes(source, images, task.class_depth)
    check_disjoint(splits, sources)
    check_counts(task, splits, sources)
    return splits


def check_counts(task: ImageTask, splits: dict[str, Classes], sources: dict[str, Path]) -> None:
    """Enough classes per split for ``task.ways`` and enough images per class for shots + queries."""
    need = task.shots + task.queries
    for split, classes in splits.items():
        if len(classes) < task.ways:
            raise DatasetError(f"{sources[split]}: split {split} has {len(classes)} classes, task.ways is {task.ways}")
        for name, files in classes.items():
            if len(files) < need:
                raise DatasetError(
                    f"{sources[split]}: class {name} has {len(files)} images,"
                    f" fewer than task.shots + task.queries = {need}"
                )


def to_array(image: Image.Image, task: ImageFolderTask) -> np.ndarray:
    """One image as a uint8 ``[C, H, W]`` row: ``task.mode``, LANCZOS resize to ``task.image_size``."""
    return resized(image, task.image_size, task.mode)


def decode(file: ImageFile, task: ImageFolderTask) -> np.ndarray:
    """One file as a table row, refusing a file mode outside ``task.file_modes``."""
    image = open_image(file)
    modes = task.file_modes or FILE_MODES[task.mode]
    if image.mode not in modes:
        raise DatasetError(
            f"{file.where}: image mode is {image.mode}, task.file_modes allows {list(modes)}"
            f" (list {image.mode} in task.file_modes to convert such files to {task.mode})"
        )
    return to_array(image, task)


def load(task: ImageFolderTask, out: Path | None = None) -> ImageTable:
    """Every image of every split's classes, decoded once (errors name the file or class); with ``out``,
    into that ``.npy`` file a chunk at a time (``build_table``)."""
    return build_table(by_split(find_classes(task)), lambda file: decode(file, task), out)


def normalization(task: ImageFolderTask) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """The task's per-channel (mean, std), or None."""
    return None if task.normalize is None else (task.normalize.mean, task.normalize.std)


def spec(task: ImageFolderTask) -> TaskSpec:
    """N-way classification of ``[C, image_size, image_size]`` images (C = 1 for L, 3 for RGB)."""
    shape = (len(task.mode), task.image_size, task.image_size)
    return TaskSpec(kind="classification", input_shape=shape, outputs=task.ways, loss="cross_entropy")


FAMILY = ImageFamily(
    config=ImageFolderTask, spec=spec, load=load, split_classes=split_classes, to_array=to_array, normalization=normalization
)
