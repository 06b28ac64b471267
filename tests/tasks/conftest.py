"""Data set fixtures: the real Omniglot table (loaded once per session) and small generated data sets."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import omniglot
from tasks.config import OmniglotTask
from tasks.images import ImageTable

ALPHABETS = {"images_background": ["Alpha", "Beta"], "images_evaluation": ["Gamma"]}
CHARACTERS_PER_ALPHABET = 4
DRAWINGS = 6


def drawing(seed: int, size: tuple[int, int] = (105, 105)) -> Image.Image:
    """A binary image like Omniglot's: white paper (1) with a few black strokes (0)."""
    rng = np.random.default_rng(seed)
    paper = np.ones(size[::-1], dtype=bool)
    for _ in range(3):
        top, left = rng.integers(0, min(size) - 20, size=2)
        paper[top : top + rng.integers(3, 20), left : left + rng.integers(3, 20)] = False
    return Image.fromarray(paper)


def omniglot_files() -> dict[str, Image.Image]:
    """Relative path -> image of a small Omniglot in the original layout (12 characters x 6 drawings)."""
    files, ident = {}, 0
    for top, alphabets in ALPHABETS.items():
        for alphabet in alphabets:
            for c in range(1, CHARACTERS_PER_ALPHABET + 1):
                ident += 1
                for d in range(1, DRAWINGS + 1):
                    files[f"{top}/{alphabet}/character{c:02d}/{ident:04d}_{d:02d}.png"] = drawing(ident * 100 + d)
    return files


def write_omniglot(root: Path, layout: str) -> Path:
    """A small Omniglot under ``root/omniglot`` in ``layout`` (zip, torchvision or folder); returns root."""
    base = root / "omniglot"
    base.mkdir(parents=True, exist_ok=True)
    files = omniglot_files()
    if layout == "zip":
        for top in ALPHABETS:
            with zipfile.ZipFile(base / f"{top}.zip", "w") as archive:
                for name, image in files.items():
                    if name.startswith(top):
                        path = base / "tmp.png"
                        image.save(path)
                        archive.write(path, name)
            (base / "tmp.png").unlink()
        return root
    folder = base / "omniglot-py" if layout == "torchvision" else base
    for name, image in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)
    return root


def small_omniglot_task(root: Path, **changes) -> OmniglotTask:
    """The task config matching ``write_omniglot``: 12 characters (6 train, 2 val, 4 test), 6 drawings."""
    fields = dict(
        data_root=str(root) if root else None, characters=12, drawings=DRAWINGS, train_characters=6, val_characters=2,
        ways=5, shots=1, queries=2,
    )
    return OmniglotTask(**(fields | changes))


@pytest.fixture(scope="session")
def small_omniglot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Data root of a small Omniglot in torchvision's layout (do not modify; copy it to damage it)."""
    return write_omniglot(tmp_path_factory.mktemp("data"), "torchvision")


@pytest.fixture(scope="session")
def omniglot_table() -> ImageTable:
    """The real Omniglot (../shared/data/omniglot) decoded once per session (~10 s)."""
    return omniglot.load(OmniglotTask())


def small_omniglot_run(tmp_path: Path, name: str, **sections: dict) -> dict:
    """A raw run config on a fresh ``write_omniglot`` fixture: 6 steps of 2 episodes, SQLite MLflow in ``tmp_path``."""
    root = write_omniglot(tmp_path / "data", "folder")
    return {
        "name": name,
        "seed": 2,
        "task": small_omniglot_task(root).model_dump(),
        "store": {"path": str(tmp_path / "episodes"), "train_episodes": 40, "val_episodes": 4, "test_episodes": 4, "shard_episodes": 20},
        "train": {"steps": 6, "meta_batch": 2, "workers": 1, "val_every": 3, "val_episodes": 4, "test_episodes": 4, "checkpoint_every": 3, "log_every": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"},
        **sections,
    }
