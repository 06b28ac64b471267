"""Training-time augmentation (task.augment): seeded by episode, train split only, never stored."""
import json

import numpy as np
import pytest
import torch

from tasks import augment
from tasks.config import EpisodeConfig
from tasks.family import Augment
from tasks.store.parquet import open_store, precompute
from tests.helpers import write_class_folders

AUGMENT = Augment.model_validate({"crop": {"scale": [0.3, 1.0]}, "flip": True, "color_jitter": {}})


def store_config(tmp_path, path, augment=None):
    root = tmp_path / "data"
    if not root.exists():
        for split, names in {"train": ["a", "b", "c"], "val": ["d", "e"], "test": ["f", "g"]}.items():
            write_class_folders(root / split, dict.fromkeys(names, 3), size=12)
    task = {"name": "image_folder", "root": str(root), "ways": 2, "shots": 1, "queries": 2, "image_size": 12, "augment": augment}
    store = {"path": str(path), "train_episodes": 1500, "val_episodes": 8, "test_episodes": 8, "shard_episodes": 1000}
    return EpisodeConfig.model_validate({"task": task, "store": store})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("augment")
    return precompute(store_config(tmp, tmp / "s"), progress=False)


def test_same_store_and_position_give_the_same_pixels_and_a_resumed_reader_sees_them(store):
    with store.reader("train", 150, worker=1, num_workers=2, augment=AUGMENT) as reader:  # shard 1: 500 episodes
        first = [next(reader) for _ in range(2)]
        position = json.loads(json.dumps(reader.position))
        rest = [next(reader) for _ in range(3)]
    with store.reader("train", 150, worker=1, num_workers=2, augment=AUGMENT) as again:
        assert all(torch.equal(a.support_x, next(again).support_x) for a in first)
    with open_store(store.path).reader("train", 150, worker=1, num_workers=2, start=position, augment=AUGMENT) as resumed:
        for a in rest:
            b = next(resumed)
            assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_x, b.query_x)
    with store.reader("train", 150, worker=1, num_workers=2) as plain:
        assert not torch.equal(next(plain).support_x, first[0].support_x)


def test_the_next_epoch_draws_anew(store):
    with store.reader("train", 500, worker=1, num_workers=2, augment=AUGMENT) as reader:  # shard 1: 500 episodes
        epoch0, epoch1 = next(reader), next(reader)
    with store.reader("train", 500, worker=1, num_workers=2) as plain:
        assert torch.equal(next(plain).support_y, epoch1.support_y)
    differ = (epoch0.support_x != epoch1.support_x).flatten(1).any(1)
    assert bool(differ.all())


def test_flip_alone_turns_each_image_into_itself_or_its_mirror(store):
    flip = Augment(flip=True)
    with store.reader("train", 64) as plain, store.reader("train", 64, augment=flip) as flipped:
        a, b = next(plain), next(flipped)
    images, mirrored = torch.cat([a.support_x, a.query_x], 1), torch.cat([b.support_x, b.query_x], 1)
    same = (images == mirrored).flatten(2).all(-1)
    turned = (images.flip(-1) == mirrored).flatten(2).all(-1)
    assert bool((same | turned).all()) and 0.3 < float(turned.float().mean()) < 0.7
    assert torch.equal(a.support_y, b.support_y)


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_episodes_are_never_augmented(store, split):
    with pytest.raises(ValueError, match=f"augmentation applies to the training episodes of image sets, not {split}"):
        store.reader(split, 4, augment=AUGMENT)


def test_augmentation_is_not_part_of_the_store(tmp_path, store):
    """A run with task.augment reads the store made without it: same shards, same config identity."""
    raw = store.config.model_dump(mode="json")
    raw["task"]["augment"] = AUGMENT.model_dump()
    raw["store"]["path"] = str(tmp_path / "s")
    made = precompute(EpisodeConfig.model_validate(raw), progress=False)
    assert "augment" not in made.manifest["config"]["task"]
    shards = {s["file"]: s["sha256"] for split in made.manifest["splits"].values() for s in split["shards"]}
    assert shards == {s["file"]: s["sha256"] for split in store.manifest["splits"].values() for s in split["shards"]}
    raw["store"]["path"] = store.path
    assert open_store(store.path, EpisodeConfig.model_validate(raw)).episodes("train") == 1500


def test_each_image_draws_its_own_parameters_and_the_draws_are_fixed_by_the_seed():
    images = torch.randint(0, 256, (2, 3, 3, 12, 12), dtype=torch.uint8).expand(2, 3, 3, 12, 12).clone()
    images[:, 1:] = images[:, :1]  # every image of the batch the same
    seeds = augment.episode_seeds(0, np.array([0, 0]), np.array([0, 0]), np.array([0, 1]))
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    out = augment.apply(AUGMENT, images, seeds)
    assert torch.equal(torch.rand(1), before)  # the global generator is not touched
    assert out.shape == images.shape and out.dtype == torch.uint8
    flat = out.flatten(0, 1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(6) for j in range(i))
    assert torch.equal(out, augment.apply(AUGMENT, images, seeds))


def test_full_crop_without_jitter_or_flip_is_the_identity():
    images = torch.randint(0, 256, (1, 4, 3, 12, 12), dtype=torch.uint8)
    same = Augment.model_validate({"crop": {"scale": [1.0, 1.0], "ratio": [1.0, 1.0]}})
    assert torch.equal(augment.apply(same, images, [3]), images)


def test_jitter_factors_stay_in_range():
    images = torch.full((1, 50, 1, 4, 4), 100, dtype=torch.uint8)
    out = augment.apply(Augment.model_validate({"color_jitter": {"brightness": 0.5, "contrast": 0, "saturation": 0}}), images, [1])
    values = out[0, :, 0, 0, 0].float()
    assert values.min() >= 50 and values.max() <= 150 and values.std() > 10


def test_config_refuses_bad_ranges():
    with pytest.raises(ValueError, match="crop: need 0 < scale low <= high <= 1"):
        Augment.model_validate({"crop": {"scale": [0.9, 0.2]}})
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        Augment.model_validate({"color_jitter": {"contrast": -0.1}})
