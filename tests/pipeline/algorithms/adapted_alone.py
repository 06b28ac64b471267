"""The reference a learner's batched ``evaluate`` is tested against: ``adapt`` on each episode alone."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.types import MetaLearner, Params
from tasks.episodes import Episodes


def adapted_alone(learner: MetaLearner, params: Params, episodes: Episodes) -> dict[str, torch.Tensor]:
    """Per-episode query ``loss`` and ``accuracy`` ``[len(episodes)]``, each episode adapted by ``learner.adapt``."""
    losses, accuracies = [], []
    for i in range(len(episodes)):
        with torch.no_grad():
            logits = learner.adapt(params, episodes.support_x[i], episodes.support_y[i])(episodes.query_x[i])
        losses.append(F.cross_entropy(logits, episodes.query_y[i]))
        accuracies.append((logits.argmax(-1) == episodes.query_y[i]).to(logits.dtype).mean())
    return {"loss": torch.stack(losses), "accuracy": torch.stack(accuracies)}
