"""metapipe: distributed meta-training on Ray, tracked in MLflow.

``pipeline.load(DIR)`` loads an exported meta-learner (see pipeline/export/directory.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
"""The release (pyproject.toml reads it from here)."""

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.export.directory import ExportedLearner
    from pipeline.nets.norm import NormMode


def load(path: str | Path, norm: NormMode = "support") -> ExportedLearner:
    """Load an export directory: ``learner.adapt(support_x, support_y)(query_x)``.

    ``norm``: BatchNorm mode of the predictions; ``support`` (default) predicts each query
    independently of the others in the call (see pipeline/export/directory.py).
    """
    from pipeline.export.directory import load as load_export

    return load_export(path, norm)
