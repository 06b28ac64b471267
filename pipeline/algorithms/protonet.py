"""Prototypical Networks (Snell, Swersky and Zemel 2017) as pure functions.

No inner loop: each class's prototype is the mean embedding of its support
examples, a query's logits are minus its squared Euclidean distances to the
prototypes, and the meta-loss is the mean query cross-entropy, differentiated
with respect to the embedding network. Follows the authors' code
(jakesnell/prototypical-networks, ``protonets/models/few_shot.py``: ``Protonet.loss``
and ``protonets/utils.py``: ``euclidean_dist``): support and query images of an
episode go through the encoder in one batch, prototypes are means, distances
squared, ``log_softmax(-distances)``.

Batch-norm follows the network's ``norm`` mode (pipeline/nets/norm.py):
``transductive`` normalizes support and queries with the statistics of their
whole batch, as the reference's training pass does, so a query's prediction
depends on the other queries of the call; ``support`` normalizes every example
with the support set's statistics (the support embeddings are then those of the
support set alone), so each query is predicted independently of the others. An
export predicts in ``support`` mode by default (pipeline/export/directory.py).

The embedding network is the built-in Conv4 without its head: ``Conv4.apply_tasks``
with an identity head returns the features the head would read (the flattened
4-block output for ``downsample: maxpool``, the reference's encoder; the spatial
mean for ``stride``). The meta-parameters are the Conv4's without ``head.*``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.algorithms.maml import task_accuracy
from pipeline.nets.conv4 import Conv4
from pipeline.types import Metrics, Params, Predictor
from tasks.episodes import Episodes

HEAD = "head."


@dataclass(frozen=True)
class ProtoNet:
    """Prototypical Networks over the trunk of ``network`` for ``ways``-way episodes."""

    network: Conv4
    ways: int

    def __post_init__(self) -> None:
        if self.ways < 2:
            raise ValueError(f"ProtoNet.ways must be at least 2, got {self.ways}")

    def init(self, seed: int, dtype: torch.dtype = torch.float32) -> Params:
        """The Conv4's initial parameters without its head (the same trunk weights as ``Conv4.init(seed)``)."""
        return {k: v for k, v in self.network.init(seed, dtype).items() if not k.startswith(HEAD)}

    def embed(self, params: Params, x: torch.Tensor, stats: int | None = None) -> torch.Tensor:
        """Embeddings ``[T, N, D]`` of stacked tasks ``x[T, N, C, H, W]`` (D = ``network.features()``).

        ``stats``: batch-norm statistics over each task's first ``stats`` examples (None: all N).
        """
        eye = torch.eye(self.network.features(), dtype=x.dtype, device=x.device)
        head = {HEAD + "weight": eye, HEAD + "bias": torch.zeros_like(eye[0])}
        return self.network.apply_tasks({**params, **head}, x, stats)

    def logits(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """Minus the squared Euclidean distance of each query to each class prototype: ``[T, Q, ways]``.

        ``support_x[T, S, C, H, W]`` with labels ``support_y[T, S]`` in ``0..ways-1`` (any
        order, every class present), ``query_x[T, Q, C, H, W]``; support and queries of a
        task are embedded in one batch, its batch-norm statistics those of the whole batch
        (``transductive``) or of the support set (``support`` norm mode). Raises ValueError
        when a class has no support example.
        """
        s = support_x.shape[1]
        stats = s if self.network.norm == "support" else None
        z = self.embed(params, torch.cat([support_x, query_x], dim=1), stats)
        z_support, z_query = z[:, :s], z[:, s:]
        onehot = F.one_hot(support_y, self.ways).to(z.dtype)  # [T, S, ways]
        counts = onehot.sum(1)  # [T, ways]
        if bool((counts == 0).any()):
            raise ValueError(f"ProtoNet: every one of the {self.ways} classes needs a support example")
        prototypes = onehot.transpose(1, 2) @ z_support / counts.unsqueeze(-1)  # [T, ways, D]
        return -(z_query.unsqueeze(2) - prototypes.unsqueeze(1)).square().sum(-1)

    def _losses(self, params: Params, episodes: Episodes) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean query cross-entropy of each task ``[T]`` and the query logits."""
        e = episodes
        out = self.logits(params, e.support_x, e.support_y, e.query_x)
        losses = F.cross_entropy(out.flatten(0, 1), e.query_y.flatten(), reduction="none").view(e.query_y.shape)
        return losses.mean(-1), out

    def meta_loss(self, params: Params, episodes: Episodes) -> tuple[torch.Tensor, Metrics]:
        """Mean query cross-entropy over the episodes, and ``loss`` / ``accuracy`` metrics."""
        losses, out = self._losses(params, episodes)
        accuracy = task_accuracy(out, episodes.query_y).mean().item()
        return losses.mean(), {"loss": losses.mean().item(), "accuracy": accuracy}

    def meta_grad(self, params: Params, episodes: Episodes) -> tuple[Params, Metrics]:
        """Gradient of ``meta_loss`` with respect to every parameter (plain backpropagation: no inner loop)."""
        loss, metrics = self.meta_loss(params, episodes)
        keys = list(params)
        return dict(zip(keys, torch.autograd.grad(loss, [params[k] for k in keys]))), metrics

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """The predictor of one task: query inputs ``[Q, C, H, W]`` -> logits ``[Q, ways]``.

        In ``transductive`` norm mode the queries of a call are normalized together with the
        support set (call it on the whole query set at once); in ``support`` mode each query's
        logits depend on the support set and itself only.
        """
        params = {k: v.detach() for k, v in params.items()}

        def predict(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return self.logits(params, support_x[None], support_y[None], query_x[None])[0]

        return predict

    def evaluate(self, params: Params, episodes: Episodes, chunk: int = 32) -> dict[str, torch.Tensor]:
        """Per-episode query ``loss`` and ``accuracy``, each ``[len(episodes)]``, ``chunk`` episodes per pass."""
        params = {k: v.detach() for k, v in params.items()}
        rows = []
        with torch.no_grad():
            for start in range(0, len(episodes), chunk):
                part = episodes[start : start + chunk]
                losses, out = self._losses(params, part)
                rows.append((losses, task_accuracy(out, part.query_y)))
        return {"loss": torch.cat([r[0] for r in rows]), "accuracy": torch.cat([r[1] for r in rows])}
