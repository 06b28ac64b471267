import shutil
import zipfile

import numpy as np
import pytest

from tasks.errors import DatasetError
from tasks.families import omniglot
from tasks.families.omniglot import OmniglotTask
from tests.helpers import DRAWINGS, drawing, small_omniglot_task, write_omniglot


def test_real_omniglot_has_32460_drawings_of_1623_characters_at_28x28(omniglot_table):
    assert omniglot_table.pixels.shape == (32460, 1, 28, 28)
    assert len(omniglot_table.class_names) == 1623
    assert np.all(omniglot_table.sizes == 20)
    # ink is high: the mean ink fraction of Omniglot is about 8%
    assert 0.05 < omniglot_table.pixels.mean() / 255 < 0.12
    assert omniglot_table.class_names[0] == "Alphabet_of_the_Magi/character01"


def test_real_split_is_1100_100_423_characters_disjoint_and_fixed(omniglot_table):
    task = OmniglotTask()
    splits = omniglot.split_classes(task, omniglot_table)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1100, "val": 100, "test": 423}
    together = np.concatenate(list(splits.values()))
    assert sorted(together.tolist()) == list(range(1623))
    assert all(np.array_equal(a, b) for a, b in zip(splits.values(), omniglot.split_classes(task, omniglot_table).values()))
    other = omniglot.split_classes(OmniglotTask(split_seed=2), omniglot_table)
    assert not np.array_equal(splits["test"], other["test"])


@pytest.mark.parametrize("layout", ["zip", "torchvision", "folder"])
def test_every_layout_loads_the_same_table(tmp_path, small_omniglot, layout):
    root = write_omniglot(tmp_path, layout)
    table = omniglot.load(small_omniglot_task(root))
    reference = omniglot.load(small_omniglot_task(small_omniglot))
    assert table.pixels.shape == (12 * DRAWINGS, 1, 28, 28)
    assert np.array_equal(table.pixels, reference.pixels) and table.class_names == reference.class_names
    assert omniglot.locate(root)[0] == layout


def test_data_root_comes_from_the_environment(monkeypatch, small_omniglot):
    monkeypatch.setenv("METAPIPE_DATA", str(small_omniglot))
    assert omniglot.load(small_omniglot_task(None)).pixels.shape[0] == 12 * DRAWINGS


def test_missing_data_names_the_places_looked_at(tmp_path):
    with pytest.raises(DatasetError, match=f"Omniglot not found under {tmp_path}/omniglot.*images_background.zip"):
        omniglot.load(small_omniglot_task(tmp_path))


def copy_of(small_omniglot, tmp_path):
    shutil.copytree(small_omniglot, tmp_path / "data")
    return tmp_path / "data", tmp_path / "data" / "omniglot" / "omniglot-py" / "images_background"


def test_a_missing_character_folder_is_an_error(tmp_path, small_omniglot):
    root, background = copy_of(small_omniglot, tmp_path)
    shutil.rmtree(background / "Beta" / "character02")
    with pytest.raises(DatasetError, match="found 11 character folders, expected 12.*class is missing"):
        omniglot.load(small_omniglot_task(root))


def test_a_missing_drawing_names_its_character_folder(tmp_path, small_omniglot):
    root, background = copy_of(small_omniglot, tmp_path)
    next((background / "Alpha" / "character03").iterdir()).unlink()
    with pytest.raises(DatasetError, match="Alpha/character03: 5 drawings, expected 6"):
        omniglot.load(small_omniglot_task(root))


def test_an_unreadable_image_names_the_file(tmp_path, small_omniglot):
    root, background = copy_of(small_omniglot, tmp_path)
    bad = sorted((background / "Alpha" / "character01").iterdir())[2]
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=f"{bad}: unreadable image"):
        omniglot.load(small_omniglot_task(root))


def test_an_odd_sized_image_names_the_file(tmp_path, small_omniglot):
    root, background = copy_of(small_omniglot, tmp_path)
    odd = sorted((background / "Beta" / "character04").iterdir())[0]
    drawing(1, size=(100, 105)).save(odd)
    with pytest.raises(DatasetError, match=f"{odd}: image is 100x105, Omniglot drawings are 105x105"):
        omniglot.load(small_omniglot_task(root))


def test_a_stray_file_is_a_layout_error(tmp_path, small_omniglot):
    root, background = copy_of(small_omniglot, tmp_path)
    (background / "Alpha" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="unexpected file .*notes.txt"):
        omniglot.load(small_omniglot_task(root))


def test_a_zip_member_outside_the_layout_names_the_zip(tmp_path):
    root = write_omniglot(tmp_path, "zip")
    with zipfile.ZipFile(root / "omniglot" / "images_evaluation.zip", "a") as archive:
        archive.writestr("images_evaluation/Gamma/extra.png", b"")
    with pytest.raises(DatasetError, match="images_evaluation.zip: unexpected member images_evaluation/Gamma/extra.png"):
        omniglot.load(small_omniglot_task(root))


def test_split_sizes_follow_the_config(small_omniglot):
    task = small_omniglot_task(small_omniglot)
    splits = omniglot.split_classes(task, omniglot.load(task))
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "val": 2, "test": 4}


def test_config_refuses_splits_that_leave_no_test_characters():
    with pytest.raises(ValueError, match="must leave test characters"):
        OmniglotTask(characters=12, train_characters=10, val_characters=2)
