"""The small sinusoid MAML run the runtime tests train, in process and on Ray."""
from __future__ import annotations

from pathlib import Path

from pipeline.config import RunConfig, validate


def sinusoid_config(tmp_path: Path, train_episodes: int = 2000, **train) -> RunConfig:
    """2 workers, meta-batch 8, tracked in ``tmp_path/mlflow.db``; ``train`` overrides the train section."""
    return validate(
        {
            "name": "test-sinusoid",
            "seed": 3,
            "task": {"name": "sinusoid", "shots": 10, "queries": 10},
            "store": {"path": str(tmp_path / "episodes"), "train_episodes": train_episodes, "val_episodes": 20, "test_episodes": 40, "shard_episodes": 500},
            "model": {"network": "mlp", "hidden": [40, 40]},
            "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
            "optimizer": {"lr": 0.01},
            "train": {"meta_batch": 8, "workers": 2, "val_episodes": 20, "test_episodes": 40, "log_every": 1, **train},
            "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"},
        }
    )
