"""The shipped benchmark bases (configs/tasks/) on small fixtures in each benchmark's layout: every class
of the public split list present with shots + queries images, precomputed to a store and read back."""
from pathlib import Path

import pytest

from pipeline.config import load_episode_config
from tasks.families import image_folder
from tasks.store.parquet import precompute
from tests.helpers import CONFIGS, write_class_folders

# base -> (the class folders' place under the data root, image suffix, image size of the fixture,
#          classes per split)
BENCHMARKS = {
    "cifar-fs-5w1s.yaml": ("cifar-fs/data", ".png", 32, (64, 16, 20)),
    "fc100-5w1s.yaml": ("fc100/data", ".png", 32, (60, 20, 20)),
    "tiered-imagenet-5w1s.yaml": ("tiered-imagenet", ".JPEG", 12, (351, 97, 160)),
    "cub-5w1s.yaml": ("CUB_200_2011/images", ".jpg", 12, (100, 50, 50)),
}


def shipped_classes(name: str) -> list[str]:
    return [c for split in image_folder.SPLITS for c in (image_folder.SHIPPED / name / f"{split}.txt").read_text().split()]


@pytest.mark.parametrize("base", sorted(BENCHMARKS))
def test_benchmark_base_precomputes_on_a_fixture_in_its_layout(tmp_path: Path, base: str):
    folder, suffix, size, counts = BENCHMARKS[base]
    overrides = [f"task.data_root={tmp_path / 'data'}", "task.queries=1", "task.image_size=8",
                 f"store.path={tmp_path / 'store'}", "store.train_episodes=20", "store.val_episodes=5", "store.test_episodes=5"]
    config = load_episode_config(CONFIGS / "tasks" / base, overrides)
    classes = shipped_classes(config.task.split_list)
    assert len(classes) == len(set(classes)) == sum(counts)
    write_class_folders(tmp_path / "data" / folder, dict.fromkeys(classes, 2), size=size, suffix=suffix)
    store = precompute(config, progress=False)
    splits = store.distribution.splits
    assert tuple(len(splits[s]) for s in image_folder.SPLITS) == counts
    assert store.manifest["image_table"]["images"] == 2 * sum(counts)
    with store.reader("train", 4) as reader:
        batch = next(reader)
    assert batch.support_x.shape == (4, 5, 3, 8, 8)
    assert len(store.read_split("test")) == 5
