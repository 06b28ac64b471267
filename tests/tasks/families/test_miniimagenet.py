from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.distribution import TaskDistribution
from tasks.errors import DatasetError
from tasks.families import miniimagenet
from tasks.families.miniimagenet import MiniImageNetTask

SPLIT_CLASSES = {"train": ["n01", "n02", "n03", "n04", "n05"], "val": ["n06"], "test": ["n07", "n08"]}
PER_CLASS = 4


def write_miniimagenet(root: Path) -> Path:
    """A tiny Mini-ImageNet: 8 classes x 4 JPEGs of 90x100, in the Ravi & Larochelle layout."""
    base = root / "miniimagenet"
    (base / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, labels in SPLIT_CLASSES.items():
        lines = ["filename,label"]
        for label in labels:
            for i in range(PER_CLASS):
                name = f"{label}{i:08d}.jpg"
                Image.fromarray(rng.integers(0, 256, (90, 100, 3), dtype=np.uint8)).save(base / "images" / name)
                lines.append(f"{name},{label}")
        (base / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def root(tmp_path):
    return write_miniimagenet(tmp_path)


def test_loads_every_image_at_84x84_rgb_with_csv_splits(root):
    task = MiniImageNetTask(data_root=str(root), ways=2, shots=1, queries=2)
    table = miniimagenet.load(task)
    assert table.pixels.shape == (8 * PER_CLASS, 3, 84, 84)
    assert table.class_names[0] == "train/n01" and table.class_names[-1] == "test/n08"
    splits = miniimagenet.split_classes(task, table)
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "val": 1, "test": 2}


def test_episodes_come_from_their_split_only(root):
    task = MiniImageNetTask(data_root=str(root), ways=2, shots=1, queries=2)
    distribution = TaskDistribution.load(task)
    fields = distribution.sample("test", np.random.default_rng(0), 50)
    assert set(np.unique(fields["classes"])) == {6, 7}
    episodes = distribution.episodes("train", np.random.default_rng(0), 3)
    assert episodes.support_x.shape == (3, 2, 3, 84, 84) and episodes.query_x.shape == (3, 4, 3, 84, 84)


def test_a_missing_image_names_the_file(root):
    (root / "miniimagenet" / "images" / "n0300000002.jpg").unlink()
    with pytest.raises(DatasetError, match="n0300000002.jpg: image listed in the CSV is missing"):
        miniimagenet.load(MiniImageNetTask(data_root=str(root)))


def test_a_missing_csv_names_the_file(root):
    (root / "miniimagenet" / "val.csv").unlink()
    with pytest.raises(DatasetError, match="val.csv: missing"):
        miniimagenet.load(MiniImageNetTask(data_root=str(root)))


def test_a_class_in_two_splits_is_an_error(root):
    with (root / "miniimagenet" / "test.csv").open("a") as f:
        f.write("n0100000000.jpg,n01\n")
    with pytest.raises(DatasetError, match="test.csv: class n01 is also in train.csv"):
        miniimagenet.load(MiniImageNetTask(data_root=str(root)))


def test_a_bad_header_names_the_file(root):
    (root / "miniimagenet" / "train.csv").write_text("file,class\nx.jpg,n01\n")
    with pytest.raises(DatasetError, match="train.csv: header is"):
        miniimagenet.load(MiniImageNetTask(data_root=str(root)))


def test_missing_images_folder_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="miniimagenet/images: missing"):
        miniimagenet.load(MiniImageNetTask(data_root=str(tmp_path)))
