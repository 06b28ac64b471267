"""Figures logged under ``plots/``: the learning curve from the run's own metric history, and a learner's figures."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
from matplotlib.figure import Figure  # noqa: E402

from pipeline.tracking.tracker import Tracker  # noqa: E402

CURVE_KEYS = ("train/loss", "train/accuracy", "val/accuracy", "val/mse")
"""The series drawn in the learning curve, one panel each, when the run logged them."""


def log_learning_curve(tracker: Tracker, scratch: Path) -> None:
    """Draw ``plots/learning_curve.png`` from every step the run logged (a resumed run's earlier ones too).

    Nothing is logged when the run has no step yet. Raises TrackingError when the
    history cannot be read (queued writes are delivered first).
    """
    series = {key: tracker.metric_history(key) for key in CURVE_KEYS}
    series = {key: points for key, points in series.items() if points}
    if not series:
        return
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        ax.plot([step for step, _ in points], [value for _, value in points])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    log_figure(tracker, "learning_curve", fig, scratch)


def log_figure(tracker: Tracker, name: str, figure: Figure, scratch: Path) -> None:
    """Save ``figure`` as ``scratch/name.png`` (80 dpi), close it and log it under ``plots/``."""
    path = scratch / f"{name}.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    tracker.log_artifact(path, "plots")
