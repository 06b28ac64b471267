"""A user's own image folder through `python -m pipeline train` (real processes, local Ray): MAML with
augmentation and normalization, exported and loaded; the Meta-LSTM and ProtoNets alike."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

import pipeline
from tests.helpers import write_class_folders

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
ALGORITHMS = {
    "maml": {"name": "maml", "inner_lr": 0.1, "inner_steps": 1},
    "meta_lstm": {"name": "meta_lstm", "inner_steps": 2, "hidden": 4},
    "protonet": {"name": "protonet"},
}


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_an_image_folder_trains_end_to_end(tmp_path, algorithm):
    for split, names in {"train": ["ant", "bee", "cow"], "val": ["doe", "elk"], "test": ["fly", "gar"]}.items():
        write_class_folders(tmp_path / "mine" / split, dict.fromkeys(names, 4), size=20, suffix=".jpg")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": f"image-folder-{algorithm}",
        "task": {"name": "image_folder", "root": str(tmp_path / "mine"), "ways": 2, "shots": 1, "queries": 2,
                 "image_size": 16, "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
                 "augment": {"crop": {"scale": [0.6, 1.0]}, "flip": True, "color_jitter": {}}},
        "store": {"path": "episodes/mine", "train_episodes": 200, "val_episodes": 4, "test_episodes": 6, "shard_episodes": 100},
        "model": {"network": "conv4", "filters": 4},
        "algorithm": ALGORITHMS[algorithm],
        "train": {"meta_batch": 2, "val_every": 2, "checkpoint_every": 2, "val_episodes": 4, "test_episodes": 6},
    }))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["train", str(config), "--steps", "4", "--export", "exported"]
    trained = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert re.search(r"^run_id: \w+$", trained.stdout, re.MULTILINE)
    assert re.search(r"^test accuracy \d+\.\d+% \+- \d+\.\d+% \(95% CI, 6 episodes\)$", trained.stdout, re.MULTILINE), trained.stdout[-2000:]
    learner = pipeline.load(tmp_path / "exported")
    x = learner.preprocess([Image.open(tmp_path / "mine" / "test" / "fly" / "img0.jpg")])
    assert x.shape == (1, 3, 16, 16) and float(x.min()) < 0  # normalized: (x - 0.5) / 0.25
