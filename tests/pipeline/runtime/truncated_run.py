"""The small L2L run (one server step per truncation) the runtime tests train, in process and on Ray."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig, validate


def l2l_config(tmp_path: Path, **train) -> RunConfig:
    """Quadratics of dimension 3; trajectories of 6 steps in 3 truncations of 2; 2 workers with 2 episodes each;
    tracked in ``tmp_path/mlflow.db``; ``train`` overrides the train section."""
    return validate(
        {
            "name": "test-l2l-truncated",
            "seed": 2,
            "task": {"name": "quadratic", "dim": 3},
            "store": {"path": str(tmp_path / "episodes"), "train_episodes": 40, "val_episodes": 4, "test_episodes": 4, "shard_episodes": 20},
            "algorithm": {"name": "l2l", "unroll": 6, "truncation": 2, "update_per": "truncation"},
            "optimizer": {"lr": 0.01},
            "train": {"meta_batch": 4, "workers": 2, "val_episodes": 4, "test_episodes": 4, "log_every": 1, **train},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"},
        }
    )
