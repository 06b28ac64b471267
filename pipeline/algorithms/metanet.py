"""Meta Networks (Munkhdalai & Yu, ICML 2017) as a functional meta-learner.

Two conv networks with slow weights: the base learner b (slow weights W) and the
representation learner u (slow weights Q). Their last layers are augmented
with fast weights. Per episode (Algorithm 1 of the paper):

1. u's representation loss on T chunks of the support set gives T gradients of
   u's augmented layer; the LSTM generator d turns them into task-level fast
   weights Q*.
2. Each support example's task-loss gradient of b's augmented layers goes
   through the MLP generator m to example-level fast weights W*_i, stored in
   memory M; its representation r'_i = u(Q, Q*, x'_i) is stored in memory R.
3. Each query reads W* = softmax(cos(R, r))^T M with its representation r and
   is classified by b with W and W*. The meta-loss is the mean query loss; its
   gradient reaches W, Q and the generators d and m.

As in the authors' code, the gradients fed to d and m are meta-information:
inputs computed on detached tensors, so no second-order terms are formed.
u's augmented layer is its output, the representation read by cosine
attention: like b's softmax layer (and as in the authors' code) its two
branches are added before any nonlinearity, so the representation is not
confined to the positive orthant and Q* always reaches it.
The convolutional trunks use per-example layer normalization (GroupNorm with
one group) rather than BatchNorm, so one query's prediction never depends on
the others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from pipeline.algorithms.fast_weights import (
    attention_read,
    augmented_linear,
    init_lstm_generator,
    init_mlp_generator,
    lstm_generate,
    mlp_generate,
)
from pipeline.types import Metrics, Params
from tasks.episodes import Episodes


@dataclass(frozen=True)
class Memory:
    """What a MetaNet keeps of a batch of support sets: task fast weights Q*, keys R, values M."""

    task_fast: torch.Tensor
    """Q*: fast weight of u's augmented layer, ``[B, representation, features]``."""
    keys: torch.Tensor
    """R: support representations r'_i, ``[B, S, representation]``."""
    values: torch.Tensor
    """M: flat example-level fast weights W*_i of b's two augmented layers, ``[B, S, P]``."""


@dataclass(frozen=True)
class MetaNet:
    """MetaNet for ``ways``-way image classification; ``init``/``meta_loss``/``meta_grad``/``adapt``.

    Parameters: ``b.*`` (base learner: conv trunk, ``b.fc1`` and ``b.fc2`` slow
    weights of the augmented layers), ``u.*`` (representation learner: conv trunk,
    ``u.fc1``), ``d.*`` (LSTM generator of Q*) and ``m.*`` (MLP generator of W*).
    """

    ways: int
    in_channels: int = 1
    image_size: int = 28
    conv_layers: int = 5
    filters: int = 64
    hidden: int = 64
    representation: int = 64
    generator_hidden: int = 20
    rep_steps: int = 5
    preprocess_p: float = 10.0
    attention_scale: float = 1.0
    contrastive_margin: float = 1.0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for key in ("ways", "in_channels", "image_size", "conv_layers", "filters", "hidden", "representation",
                    "generator_hidden", "rep_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"MetaNet.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("preprocess_p", "attention_scale", "contrastive_margin"):
            if not getattr(self, key) > 0:
                raise ValueError(f"MetaNet.{key} must be positive, got {getattr(self, key)}")

    def features(self) -> int:
        """Width of a trunk's output: filters times the spatial size left after the 2x2 max-pools."""
        size = self.image_size
        for _ in range(self.conv_layers):
            size = math.ceil(size / 2)
        return self.filters * size * size

    def init(self, seed: int) -> Params:
        """Fresh meta-parameters, identical for the same seed."""
        gen = torch.Generator().manual_seed(seed)
        params: Params = {}
        for net in ("b", "u"):
            channels = self.in_channels
            for i in range(self.conv_layers):
                shape = (self.filters, channels, 3, 3)
                params[f"{net}.conv{i}.weight"] = _kaiming(shape, channels * 9, gen, self.dtype)
                params[f"{net}.norm{i}.weight"] = torch.ones(self.filters, dtype=self.dtype)
                params[f"{net}.norm{i}.bias"] = torch.zeros(self.filters, dtype=self.dtype)
                channels = self.filters
        params["b.fc1"] = _kaiming((self.hidden, self.features()), self.features(), gen, self.dtype)
        params["b.fc2"] = _kaiming((self.ways, self.hidden), self.hidden, gen, self.dtype)
        params["u.fc1"] = _kaiming((self.representation, self.features()), self.features(), gen, self.dtype)
        params.update(init_lstm_generator("d", self.generator_hidden, gen, self.dtype))
        params.update(init_mlp_generator("m", self.generator_hidden, gen, self.dtype))
        return params

    def trunk(self, params: Params, net: str, x: torch.Tensor) -> torch.Tensor:
        """Conv trunk of ``net`` ("b" or "u"): ``x[..., C, H, W] -> [..., features]``.

        Each block: 3x3 conv, per-example normalization, ReLU, 2x2 max-pool (ceil mode).
        """
        lead = x.shape[:-3]
        h = x.reshape(-1, *x.shape[-3:])
        for i in range(self.conv_layers):
            h = F.conv2d(h, params[f"{net}.conv{i}.weight"], padding=1)
            h = F.relu(F.group_norm(h, 1, params[f"{net}.norm{i}.weight"], params[f"{net}.norm{i}.bias"]))
            h = F.max_pool2d(h, 2, ceil_mode=True)
        return h.reshape(*lead, -1)

    def write_memory(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Memory:
        """Steps 1-2: Q* and the memories R and M of a batch of support sets ``[B, S, C, H, W]``, ``[B, S]``."""
        self._check("support", support_x, support_y)
        support_x = support_x.to(params["b.fc1"].dtype)
        hu = self.trunk(params, "u", support_x)
        task_fast = lstm_generate(params, "d", self._representation_grads(params, hu, support_y), self.preprocess_p)
        keys = _representation(params, hu, task_fast)
        values = mlp_generate(params, "m", self._task_grads(params, self.trunk(params, "b", support_x), support_y),
                              self.preprocess_p)
        return Memory(task_fast, keys, values)

    def read(self, params: Params, memory: Memory, query_x: torch.Tensor) -> torch.Tensor:
        """Step 3: logits ``[B, Q, ways]`` of queries ``[B, Q, C, H, W]`` from the memory of their tasks."""
        query_x = query_x.to(params["b.fc1"].dtype)
        fast = attention_read(memory.keys, memory.values, self.represent(params, memory, query_x), self.attention_scale)
        split = self.hidden * self.features()
        fast1 = fast[..., :split].unflatten(-1, (self.hidden, self.features()))
        fast2 = fast[..., split:].unflatten(-1, (self.ways, self.hidden))
        h = augmented_linear(self.trunk(params, "b", query_x), params["b.fc1"], fast1)
        return augmented_linear(h, params["b.fc2"], fast2, activation=False)

    def represent(self, params: Params, memory: Memory, x: torch.Tensor) -> torch.Tensor:
        """Representations ``[B, Q, representation]`` of images ``[B, Q, C, H, W]`` under their task's Q*."""
        return _representation(params, self.trunk(params, "u", x.to(params["u.fc1"].dtype)), memory.task_fast)

    def meta_loss(self, params: Params, episodes: Episodes) -> tuple[torch.Tensor, Metrics]:
        """Mean cross-entropy of every query of every episode, read through its episode's memory."""
        self._check("query", episodes.query_x, episodes.query_y)
        logits = self.read(params, self.write_memory(params, episodes.support_x, episodes.support_y), episodes.query_x)
        loss = F.cross_entropy(logits.flatten(0, 1), episodes.query_y.flatten())
        accuracy = (logits.argmax(-1) == episodes.query_y).to(torch.float64).mean()
        return loss, {"loss": loss.item(), "accuracy": accuracy.item()}

    def meta_grad(self, params: Params, episodes: Episodes) -> tuple[Params, Metrics]:
        """Autodiff of ``meta_loss`` with respect to every meta-parameter."""
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        loss, metrics = self.meta_loss(leaves, episodes)
        grads = torch.autograd.grad(loss, list(leaves.values()))
        return dict(zip(leaves.keys(), grads)), metrics

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> MetaNetPredictor:
        """Fill the memories from one support set ``[S, C, H, W]``, ``[S]``; the predictor reads them."""
        memory = self.write_memory(params, support_x.unsqueeze(0), support_y.unsqueeze(0))
        return MetaNetPredictor(self, params, memory)

    def _representation_grads(self, params: Params, hu: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Gradients ``[B, T, representation, features]`` of u's representation loss on T support chunks.

        One shot (each class once): cross-entropy through a fixed softmax layer.
        Several shots: contrastive loss of each example against the whole support set.
        """
        weight, hu = params["u.fc1"].detach(), hu.detach()
        shots_one = labels.shape[1] == self.ways
        if shots_one:
            head = _representation_head(self.ways, self.representation).to(weight)

            def example_loss(w: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                logits = F.linear(F.relu(F.linear(h, w)), head)
                return F.cross_entropy(logits.unsqueeze(0), y.unsqueeze(0))

            per_example = vmap(vmap(grad(example_loss), in_dims=(None, 0, 0)), in_dims=(None, 0, 0))(weight, hu, labels)
        else:
            margin = self.contrastive_margin

            def example_loss(w: torch.Tensor, h: torch.Tensor, y: torch.Tensor, hs: torch.Tensor,
                             ys: torch.Tensor) -> torch.Tensor:
                r, rs = F.linear(h, w), F.linear(hs, w)
                dist2 = (rs - r).square().sum(-1)
                same = (ys == y).to(dist2.dtype)
                apart = F.relu(margin - (dist2 + 1e-12).sqrt()).square()
                return (same * dist2 + (1 - same) * apart).mean()

            per_example = vmap(vmap(grad(example_loss), in_dims=(None, 0, 0, None, None)),
                               in_dims=(None, 0, 0, 0, 0))(weight, hu, labels, hu, labels)
        return torch.einsum("ts,bs...->bt...", self._chunks(labels.shape[1]).to(weight), per_example)

    def _task_grads(self, params: Params, hb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Flat task-loss gradients ``[B, S, P]`` of b's augmented layers, one per support example."""
        w1, w2, hb = params["b.fc1"].detach(), params["b.fc2"].detach(), hb.detach()

        def example_loss(w1: torch.Tensor, w2: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = F.linear(F.relu(F.linear(h, w1)), w2)
            return F.cross_entropy(logits.unsqueeze(0), y.unsqueeze(0))

        per_example = vmap(grad(example_loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))
        g1, g2 = vmap(per_example, in_dims=(None, None, 0, 0))(w1, w2, hb, labels)
        return torch.cat((g1.flatten(2), g2.flatten(2)), dim=2)

    def _chunks(self, support: int) -> torch.Tensor:
        """``[T, S]`` averaging matrix of T contiguous chunks of the support set (T = min(rep_steps, S))."""
        steps = min(self.rep_steps, support)
        chunk = torch.arange(support) * steps // support
        weights = F.one_hot(chunk, steps).T.to(torch.float64)
        return weights / weights.sum(1, keepdim=True)

    def _check(self, field: str, x: torch.Tensor, y: torch.Tensor) -> None:
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 5 or tuple(x.shape[2:]) != expected:
            raise ValueError(f"MetaNet: {field}_x must be [B, N, {', '.join(map(str, expected))}], got {list(x.shape)}")
        if y.shape != x.shape[:2]:
            raise ValueError(f"MetaNet: {field}_y must be {list(x.shape[:2])}, got {list(y.shape)}")
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.ways):
            raise ValueError(
                f"MetaNet: {field}_y labels must lie in 0..{self.ways - 1}, got {int(y.min())}..{int(y.max())}"
            )


@dataclass(frozen=True)
class MetaNetPredictor:
    """A MetaNet adapted to one support set: maps queries ``[Q, C, H, W]`` to logits ``[Q, ways]``."""

    learner: MetaNet
    params: Params
    memory: Memory

    def __call__(self, query_x: torch.Tensor) -> torch.Tensor:
        return self.learner.read(self.params, self.memory, query_x.unsqueeze(0)).squeeze(0)


def _representation(params: Params, hu: torch.Tensor, task_fast: torch.Tensor) -> torch.Tensor:
    """u's augmented output layer on trunk features ``[B, S, features]`` with Q* ``[B, representation, features]``."""
    return augmented_linear(hu, params["u.fc1"], task_fast.unsqueeze(1), activation=False)


def _kaiming(shape: tuple[int, ...], fan_in: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * math.sqrt(2.0 / fan_in)).to(dtype)


def _representation_head(ways: int, representation: int) -> torch.Tensor:
    """The fixed softmax layer of the one-shot representation loss.

    Algorithm 1 updates the slow weights with the query loss only, which never
    reaches this layer (it stays at its initial value in the authors' code), so
    it is a constant of the architecture rather than a meta-parameter.
    """
    gen = torch.Generator().manual_seed(0)
    return torch.randn(ways, representation, generator=gen, dtype=torch.float64) / math.sqrt(representation)
