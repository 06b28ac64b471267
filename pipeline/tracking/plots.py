"""Figures logged under ``plots/``: the learning curve, the episodes a run is fed, regression fits, a learner's figures."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib
import torch

from pipeline.tracking.tracker import Tracker
from tasks.episodes import Episodes
from tasks.grid import episode_grid

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after the backend is chosen
from matplotlib.figure import Figure  # noqa: E402

CURVE_KEYS = ("train/loss", "train/accuracy", "val/accuracy", "val/mse")
"""The series drawn in the learning curve, one panel each, when the run logged them."""

Series = dict[str, list[tuple[int, float]]]
"""Metric key -> ``(step, value)`` points, sorted by step."""

Adapt = Callable[[torch.Tensor, torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
"""``adapt(support_x, support_y) -> predict``: a trained learner adapting to one episode's support set."""


def learning_curve(series: Series) -> Figure | None:
    """One panel per key of ``series`` that has points (value over step); None when none has."""
    series = {key: points for key, points in series.items() if points}
    if not series:
        return None
    fig, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3), squeeze=False)
    for ax, (key, points) in zip(axes[0], series.items()):
        ax.plot([step for step, _ in points], [value for _, value in points])
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    return fig


def log_learning_curve(tracker: Tracker, scratch: Path) -> None:
    """Draw ``plots/learning_curve.png`` from every step the run logged (a resumed run's earlier ones too).

    Nothing is logged when the run has no step yet. Raises TrackingError when the
    history cannot be read (queued writes are delivered first).
    """
    figure = learning_curve({key: tracker.metric_history(key) for key in CURVE_KEYS})
    if figure is not None:
        log_figure(tracker, "learning_curve", figure, scratch)


def _is_image(episodes: Episodes) -> bool:
    return episodes.support_x.dim() == 5  # [B, N*K, C, H, W]


def _is_curve(episodes: Episodes) -> bool:
    """One-dimensional regression (sinusoids): x ``[B, K, 1]`` -> y ``[B, K, 1]``."""
    x, y = episodes.support_x, episodes.support_y
    return x.dim() == 3 and x.shape[-1] == 1 and y.is_floating_point() and y.dim() == 3 and y.shape[-1] == 1


def episodes_figure(splits: dict[str, Episodes]) -> Figure | None:
    """A few episodes of each split as the learner is fed them: image episodes as one row each (support images in
    label order, a gap, then queries; ``tasks.grid.episode_grid``), one-dimensional regression episodes as their
    support and query points. None for other tasks (optimizees, feature vectors)."""
    first = next(iter(splits.values()))
    if _is_image(first):
        grids = {split: episode_grid(episodes) for split, episodes in splits.items()}
        height = sum(8 * grid.height / grid.width + 0.4 for grid in grids.values())
        fig, axes = plt.subplots(len(splits), 1, figsize=(8, height), squeeze=False)
        for ax, (split, grid) in zip(axes[:, 0], grids.items()):
            ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
            ax.set_title(f"{split} episodes: support (label order) | queries", fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        return fig
    if not _is_curve(first):
        return None
    columns = max(len(e) for e in splits.values())
    fig, axes = plt.subplots(len(splits), columns, figsize=(2.6 * columns, 2.3 * len(splits)), squeeze=False)
    for row, (split, episodes) in enumerate(splits.items()):
        for i, ax in enumerate(axes[row]):
            if i >= len(episodes):
                ax.axis("off")
                continue
            ax.scatter(episodes.support_x[i, :, 0], episodes.support_y[i, :, 0], s=12, label="support")
            ax.scatter(episodes.query_x[i, :, 0], episodes.query_y[i, :, 0], s=12, marker="x", label="query")
            ax.set_title(f"{split} episode {i}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def regression_fits(episodes: Episodes, adapt: Adapt, count: int = 4) -> Figure | None:
    """MAML paper figure 2: for the first ``count`` one-dimensional regression episodes, the support points, the
    query points and the learner's prediction after adapting to the support set, over the episode's x range.
    None when the episodes are not one-dimensional regression."""
    if not _is_curve(episodes):
        return None
    count = min(count, len(episodes))
    fig, axes = plt.subplots(1, count, figsize=(3.2 * count, 2.8), squeeze=False)
    for i, ax in enumerate(axes[0]):
        e = episodes[i]
        xs = torch.cat([e.support_x[0, :, 0], e.query_x[0, :, 0]])
        grid = torch.linspace(float(xs.min()), float(xs.max()), 200).unsqueeze(1)
        with torch.no_grad():
            fitted = adapt(e.support_x[0], e.support_y[0])(grid.to(e.support_x)).float().cpu()
        e = e.to(torch.device("cpu"), torch.float32)
        ax.plot(grid[:, 0], fitted[:, 0], color="tab:green", label="after adapting")
        ax.scatter(e.support_x[0, :, 0], e.support_y[0, :, 0], s=14, label="support (K points)")
        ax.scatter(e.query_x[0, :, 0], e.query_y[0, :, 0], s=14, marker="x", color="tab:red", label="query (truth)")
        ax.set_title(f"test episode {i}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def log_figure(tracker: Tracker, name: str, figure: Figure, scratch: Path) -> None:
    """Save ``figure`` as ``scratch/name.png`` (80 dpi), close it and log it under ``plots/``."""
    path = scratch / f"{name}.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    tracker.log_artifact(path, "plots")
