"""Batch-norm modes: which examples a network's BatchNorm takes its statistics from.

``transductive`` (the MAML paper's, and the papers' numbers): every forward pass
normalizes with the statistics of the batch it is given, so a query's output
depends on the other queries of the call. ``support``: queries are normalized
with the statistics of the support set under the same (adapted) parameters, so a
query's output depends on the support set and itself only; one query at a time
gives what the whole query set at once gives.
"""
from __future__ import annotations

from typing import Literal, Protocol

import torch

from pipeline.types import Params

NormMode = Literal["transductive", "support"]
NORM_MODES: tuple[NormMode, ...] = ("transductive", "support")


class StackedNetwork(Protocol):
    """What ``query_outputs`` needs of a network: a stacked forward pass whose statistics can come from a prefix."""

    def apply_tasks(self, params: Params, x: torch.Tensor, stats: int | None = None) -> torch.Tensor: ...


def query_outputs(network: StackedNetwork, params: Params, support_x: torch.Tensor, query_x: torch.Tensor) -> torch.Tensor:
    """Outputs ``[T, Q, out]`` of the queries ``query_x[T, Q, ...]`` under ``params`` in the network's norm mode.

    ``support`` mode runs support and queries in one pass, ``support_x[T, S, ...]``
    first, with every BatchNorm's statistics taken over the S support examples of
    each task; networks without a ``norm`` field (the MLP) have no statistics and
    run the queries alone.
    """
    if getattr(network, "norm", "transductive") == "transductive":
        return network.apply_tasks(params, query_x)
    shots = support_x.shape[1]
    return network.apply_tasks(params, torch.cat([support_x, query_x], dim=1), stats=shots)[:, shots:]
