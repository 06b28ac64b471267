"""The episode-store part of a run config: a ``task`` section (one of the registered families) and a ``store`` section.

A config is frozen after validation and refuses unknown keys; every error names
the key and the bad value. Each family's own section lives in its module (tasks/families/).
"""
from __future__ import annotations

import math
from typing import Literal

from pydantic import Field

from tasks.families import TaskConfig
from tasks.family import Strict

ROW_GROUP = 1000
"""Episodes per Parquet row group: the unit a reader hands to one worker."""


class StoreConfig(Strict):
    """Where and how many episodes to precompute."""

    path: str = Field(..., description="local folder or s3://bucket/prefix")
    seed: int = Field(0, ge=0, lt=2**63)
    train_episodes: int = Field(100_000, ge=1)
    val_episodes: int = Field(200, ge=0)
    test_episodes: int = Field(600, ge=0)
    shard_episodes: int = Field(10_000, ge=1, description="episodes per Parquet shard")
    eval_pixels: bool = Field(True, description="store val/test episodes with pixels rather than indices")
    device_table: Literal["auto", "cpu"] = Field(
        "cpu", description="auto: a GPU worker holds the image table on its device and gathers episodes there"
    )

    def train_row_groups(self) -> int:
        """Row groups of the train split (each shard of ``shard_episodes`` rounds up): at most one worker each."""
        full, rest = divmod(self.train_episodes, self.shard_episodes)
        return full * math.ceil(self.shard_episodes / ROW_GROUP) + math.ceil(rest / ROW_GROUP)


class EpisodeConfig(Strict):
    """The part of a run config that defines the episode store."""

    task: TaskConfig
    store: StoreConfig
