import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tasks import images
from tasks.config import EpisodeConfig
from tasks.distribution import TaskDistribution
from tasks.errors import DatasetError
from tasks.families import image_folder
from tasks.families.image_folder import ImageFolderTask
from tasks.store import table as node_table
from tasks.store.parquet import open_store, precompute
from tests.helpers import write_class_folders

SPLIT_CLASSES = {"train": ["cat", "dog", "eel"], "val": ["fox", "gnu"], "test": ["hen", "ibis"]}
PER_CLASS = 4


def write_split_folders(root: Path, **kwargs) -> Path:
    for split, names in SPLIT_CLASSES.items():
        write_class_folders(root / split, {n: PER_CLASS for n in names}, **kwargs)
    return root


def write_split_files(root: Path) -> Path:
    write_class_folders(root / "images", {n: PER_CLASS for names in SPLIT_CLASSES.values() for n in names})
    for split, names in SPLIT_CLASSES.items():
        (root / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def task(root: Path, **fields) -> ImageFolderTask:
    return ImageFolderTask(**({"root": str(root), "ways": 2, "shots": 1, "queries": 2, "image_size": 8} | fields))


# layouts -------------------------------------------------------------------------------------------


def test_split_folders_load_every_class_resized_and_split(tmp_path):
    config = task(write_split_folders(tmp_path))
    table = image_folder.load(config)
    assert table.pixels.shape == (7 * PER_CLASS, 3, 8, 8) and table.pixels.dtype == np.uint8
    assert table.class_names == ("train/cat", "train/dog", "train/eel", "val/fox", "val/gnu", "test/hen", "test/ibis")
    splits = image_folder.split_classes(config, table)
    assert {k: v.tolist() for k, v in splits.items()} == {"train": [0, 1, 2], "val": [3, 4], "test": [5, 6]}
    expected = np.asarray(Image.open(tmp_path / "val" / "fox" / "img2.png").resize((8, 8), Image.LANCZOS)).transpose(2, 0, 1)
    assert np.array_equal(table.pixels[3 * PER_CLASS + 2], expected)


def test_nested_grayscale_classes_with_class_depth_two(tmp_path):
    for split, alphabets in {"train": ["Alpha", "Beta"], "val": ["Gamma"], "test": ["Delta"]}.items():
        classes = {f"{a}/character{c:02d}": 3 for a in alphabets for c in (1, 2)}
        write_class_folders(tmp_path / split, classes, mode="L", suffix=".jpg")
    config = task(tmp_path, class_depth=2, mode="L", queries=1)
    table = image_folder.load(config)
    assert table.pixels.shape == (8 * 3, 1, 8, 8)
    assert table.class_names[:2] == ("train/Alpha/character01", "train/Alpha/character02")
    assert image_folder.spec(config).input_shape == (1, 8, 8)


def test_split_files_list_class_folders(tmp_path):
    config = task(write_split_files(tmp_path), split="files", images="images")
    reference = image_folder.load(task(write_split_folders(tmp_path / "folders")))
    table = image_folder.load(config)
    assert table.class_names == reference.class_names and np.array_equal(table.pixels, reference.pixels)


def test_csv_split_files_of_ravi_and_larochelle(tmp_path):
    write_class_folders(tmp_path / "class", {n: PER_CLASS for names in SPLIT_CLASSES.values() for n in names}, suffix=".jpg")
    (tmp_path / "images").mkdir()
    for split, names in SPLIT_CLASSES.items():
        lines = ["filename,label"]
        for name in names:
            for i in range(PER_CLASS):
                shutil.copy(tmp_path / "class" / name / f"img{i}.jpg", tmp_path / "images" / f"{name}{i:08d}.jpg")
                lines.append(f"{name}{i:08d}.jpg,{name}")
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    files = {"train": "train.csv", "val": "val.csv", "test": "test.csv"}
    table = image_folder.load(task(tmp_path, split="files", split_files=files, images="images"))
    assert table.pixels.shape == (7 * PER_CLASS, 3, 8, 8) and table.class_names[-1] == "test/ibis"


def test_relative_root_is_under_the_data_root(tmp_path):
    write_split_folders(tmp_path / "mine")
    config = ImageFolderTask(root="mine", data_root=str(tmp_path), ways=2, shots=1, queries=2, image_size=8)
    assert image_folder.load(config).pixels.shape[0] == 7 * PER_CLASS
    missing = ImageFolderTask(root="other/mine", data_root=str(tmp_path), ways=2, shots=1, queries=2, image_size=8)
    with pytest.raises(DatasetError, match=f"{tmp_path}/other/mine: task.root does not exist \\(task.root 'other/mine' is relative,"
                                           f" so it is read under the data root {tmp_path}: .* give an absolute path"):
        image_folder.load(missing)
    with pytest.raises(DatasetError, match=f"{tmp_path}/nowhere: task.root does not exist$"):
        image_folder.load(task(tmp_path / "nowhere"))


def test_normalization_applies_to_decoded_episodes_and_preprocess(tmp_path):
    plain = task(write_split_folders(tmp_path))
    normed = task(tmp_path, normalize={"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.5]})
    a = TaskDistribution.load(plain).episodes("train", np.random.default_rng(0), 3)
    b = TaskDistribution.load(normed).episodes("train", np.random.default_rng(0), 3)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1), torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1)
    assert torch.allclose(b.support_x, (a.support_x - mean) / std) and torch.allclose(b.query_x, (a.query_x - mean) / std)
    image = Image.open(tmp_path / "train" / "cat" / "img0.png")
    x = image_folder.FAMILY.preprocess([image], normed)
    assert torch.allclose(x, (image_folder.FAMILY.preprocess([image], plain) - mean) / std)


def test_a_store_of_an_image_folder_is_byte_identical_for_one_seed(tmp_path):
    root = write_split_folders(tmp_path / "data")

    def store(path):
        config = EpisodeConfig.model_validate(
            {"task": task(root).model_dump(),
             "store": {"path": str(path), "train_episodes": 300, "val_episodes": 10, "test_episodes": 10, "shard_episodes": 200}}
        )
        made = precompute(config, progress=False)
        return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*.parquet"))}, made

    (a, store_a), (b, _) = store(tmp_path / "a"), store(tmp_path / "b")
    assert a == b and len(a) == 5
    with store_a.reader("train", 5) as reader:
        batch = next(reader)
    assert batch.support_x.shape == (5, 2, 3, 8, 8) and batch.query_x.shape == (5, 4, 3, 8, 8)


# strictness -------------------------------------------------------------------------------------


def test_a_missing_split_file_names_it(tmp_path):
    write_split_files(tmp_path)
    (tmp_path / "val.txt").unlink()
    with pytest.raises(DatasetError, match=f"{tmp_path}/val.txt: missing"):
        image_folder.load(task(tmp_path, split="files", images="images"))


def test_a_missing_split_folder_names_it(tmp_path):
    write_split_folders(tmp_path)
    shutil.rmtree(tmp_path / "test")
    with pytest.raises(DatasetError, match=f"{tmp_path}/test: missing"):
        image_folder.load(task(tmp_path))


def test_a_listed_class_that_is_absent_names_file_and_class(tmp_path):
    write_split_files(tmp_path)
    shutil.rmtree(tmp_path / "images" / "gnu")
    with pytest.raises(DatasetError, match="val.txt:2: class gnu is listed but .*images/gnu does not exist"):
        image_folder.load(task(tmp_path, split="files", images="images"))


def test_a_class_with_too_few_images_names_the_class(tmp_path):
    write_split_folders(tmp_path)
    (tmp_path / "train" / "dog" / "img3.png").unlink()
    (tmp_path / "train" / "dog" / "img2.png").unlink()
    with pytest.raises(DatasetError, match="class dog has 2 images, fewer than task.shots \\+ task.queries = 3"):
        image_folder.load(task(tmp_path))


def test_a_split_with_fewer_classes_than_ways(tmp_path):
    with pytest.raises(DatasetError, match="split val has 2 classes, task.ways is 3"):
        image_folder.load(task(write_split_folders(tmp_path), ways=3))


def test_an_unreadable_image_names_the_file(tmp_path):
    write_split_folders(tmp_path)
    bad = tmp_path / "test" / "hen" / "img1.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=f"{bad}: unreadable image"):
        image_folder.load(task(tmp_path))


def test_an_image_of_the_wrong_mode_names_the_file(tmp_path):
    write_split_folders(tmp_path)
    odd = tmp_path / "val" / "fox" / "img0.png"
    Image.fromarray(np.zeros((10, 10), np.uint8), "L").save(odd)
    with pytest.raises(DatasetError, match=f"{odd}: image mode is L, task.file_modes allows \\['RGB'\\] \\(list L in task.file_modes"
                                           " to convert such files to RGB\\)"):
        image_folder.load(task(tmp_path))
    assert image_folder.load(task(tmp_path, file_modes=["RGB", "L"])).pixels.shape[1] == 3


def test_stray_files_and_folders_are_named(tmp_path):
    write_split_folders(tmp_path)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="cat/notes.txt: not a PNG or JPEG file \\(class cat\\)"):
        image_folder.load(task(tmp_path))
    (tmp_path / "train" / "cat" / "notes.txt").unlink()
    (tmp_path / "train" / "cat" / "more").mkdir()
    with pytest.raises(DatasetError, match="cat/more: a folder inside class cat"):
        image_folder.load(task(tmp_path))
    (tmp_path / "train" / "cat" / "more").rmdir()
    (tmp_path / "train" / "loose.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="train/loose.png: a file where class folders are expected"):
        image_folder.load(task(tmp_path))


def test_a_class_in_two_split_files(tmp_path):
    write_split_files(tmp_path)
    (tmp_path / "test.txt").write_text("hen\nibis\ncat\n")
    with pytest.raises(DatasetError, match="test.txt: class cat is also in train.txt"):
        image_folder.load(task(tmp_path, split="files", images="images"))


def store_config(root: Path, path: Path, **store) -> EpisodeConfig:
    return EpisodeConfig.model_validate({"task": task(root).model_dump(), "store": {"path": str(path), **store}})


def test_dataset_errors_come_before_anything_is_written(tmp_path, monkeypatch):
    """The last image is broken: every other one is decoded (a chunk at a time) before the error, and
    still neither a new store nor the store it would replace, nor the node's table cache, is touched."""
    monkeypatch.setattr(images, "CHUNK_BYTES", 2 * 3 * 8 * 8)
    monkeypatch.setenv(node_table.CACHE_ENV, str(tmp_path / "cache"))
    write_split_folders(tmp_path / "data")
    replaced = precompute(store_config(tmp_path / "data", tmp_path / "old", train_episodes=50), progress=False)
    before = {p: p.read_bytes() for p in sorted(tmp_path.joinpath("old").rglob("*")) if p.is_file()}
    cache = sorted(p.name for p in (tmp_path / "cache").iterdir())
    bad = tmp_path / "data" / "test" / "ibis" / f"img{PER_CLASS - 1}.png"
    bad.write_bytes(b"broken")
    with pytest.raises(DatasetError, match=f"{bad}: unreadable image"):
        precompute(store_config(tmp_path / "data", tmp_path / "s"), progress=False)
    assert not (tmp_path / "s").exists()
    with pytest.raises(DatasetError, match=f"{bad}: unreadable image"):
        precompute(store_config(tmp_path / "data", tmp_path / "old"), force=True, progress=False)
    assert {p: p.read_bytes() for p in sorted(tmp_path.joinpath("old").rglob("*")) if p.is_file()} == before
    assert open_store(replaced.path).episodes("train") == 50
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cache  # no scratch file left


def test_a_table_decoded_into_a_file_is_the_table_decoded_in_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "CHUNK_BYTES", 3 * 3 * 8 * 8 + 1)  # 3 images a chunk
    config = task(write_split_folders(tmp_path / "data"))
    in_memory, mapped = image_folder.load(config), image_folder.load(config, tmp_path / "table.npy")
    assert isinstance(mapped.pixels, np.memmap) and not isinstance(in_memory.pixels, np.memmap)
    assert np.array_equal(mapped.pixels, in_memory.pixels) and np.array_equal(mapped.classes, in_memory.classes)
    assert mapped.class_names == in_memory.class_names


def test_precompute_never_holds_the_table_in_memory(tmp_path, monkeypatch):
    """Decoding and writing images.parquet go a chunk / row group at a time: the memory precompute
    allocates at its peak (tracemalloc sees numpy's buffers) stays far below the table's size, while
    decoding into memory needs all of it."""
    monkeypatch.setattr(images, "CHUNK_BYTES", 8 * 3 * 48 * 48)
    monkeypatch.setattr(images, "ROW_GROUP_BYTES", 8 * 3 * 48 * 48)
    root = tmp_path / "data"
    for split, names in SPLIT_CLASSES.items():
        write_class_folders(root / split, {n: 40 for n in names}, size=48)
    table_bytes = 7 * 40 * 3 * 48 * 48

    def config(path: Path) -> EpisodeConfig:
        store = {"path": str(path), "train_episodes": 20, "val_episodes": 2, "test_episodes": 2}
        return EpisodeConfig.model_validate({"task": task(root, image_size=48).model_dump(), "store": store})

    precompute(config(tmp_path / "warm-up"), progress=False)  # modules pyarrow and PIL import on first use
    tracemalloc.start()
    try:
        store = precompute(config(tmp_path / "s"), progress=False)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        in_memory = TaskDistribution.load(config(tmp_path / "s").task)
        peak_in_memory = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < table_bytes / 4 and peak_in_memory > table_bytes
    assert np.array_equal(store.distribution.table.pixels, in_memory.table.pixels)


def test_the_readme_example_precomputes_on_a_folder_in_its_layout(tmp_path):
    """The YAML of README.md's "Your own data set", its root pointed at a generated folder."""
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme[readme.index("## Your own data set") :]
    start = section.index("```yaml") + len("```yaml")
    raw = yaml.safe_load(section[start : section.index("```", start)])
    for split, count in {"train": 5, "val": 5, "test": 5}.items():
        write_class_folders(tmp_path / "mine" / split, {f"{split}{i}": 16 for i in range(count)})
    raw["task"]["root"] = str(tmp_path / "mine")
    raw["store"] |= {"path": str(tmp_path / raw["store"]["path"]), "train_episodes": 10, "val_episodes": 2, "test_episodes": 2}
    config = EpisodeConfig.model_validate(raw)
    store = precompute(config, progress=False)
    assert config.task.augment is not None and config.task.normalize is not None
    with store.reader("train", 2, augment=config.task.augment) as reader:
        assert next(reader).support_x.shape == (2, 5, 3, 84, 84)


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="split: list needs task.split_list"):
        ImageFolderTask(root="x", split="list")
    with pytest.raises(ValueError, match="task.split_list='nope': no such list"):
        ImageFolderTask(root="x", split="list", split_list="nope")
    with pytest.raises(ValueError, match="task.normalize: 1 channels, mode RGB has 3"):
        ImageFolderTask(root="x", normalize={"mean": [0.5], "std": [0.5]})
