"""The small runs of Truncated learners the runtime tests train, in process and on Ray: L2L (one server step per
truncation) and Reptile with its inner Adam carried from task to task."""
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


def carried_reptile_config(tmp_path: Path, **train) -> RunConfig:
    """Sinusoids; Reptile with a carried inner Adam (2 steps a task); 2 workers with 2 episodes each; tracked in
    ``tmp_path/mlflow.db``; ``train`` overrides the train section."""
    return validate(
        {
            "name": "test-reptile-carried",
            "seed": 2,
            "task": {"name": "sinusoid", "shots": 5, "queries": 5},
            "store": {"path": str(tmp_path / "episodes"), "train_episodes": 40, "val_episodes": 4, "test_episodes": 4, "shard_episodes": 20},
            "model": {"network": "mlp", "hidden": [8]},
            "algorithm": {"name": "reptile", "inner_optimizer": "adam", "inner_state": "carried", "inner_lr": 0.01, "inner_steps": 2},
            "optimizer": {"lr": 0.01},
            "train": {"meta_batch": 4, "workers": 2, "val_episodes": 4, "test_episodes": 4, "log_every": 1, **train},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"},
        }
    )
