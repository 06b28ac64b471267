"""Meta Networks (Munkhdalai & Yu, ICML 2017) as a functional meta-learner.

Two conv networks with slow weights: the base learner b (slow weights W) and the
representation learner u (slow weights Q). Their layers are augmented with
fast weights. Per episode (Algorithm 1 of the paper):

1. u's representation loss on T chunks of the support set gives T gradients of
   u's augmented layers; the LSTM generators d turn them into task-level fast
   weights Q*.
2. Each support example's task-loss gradient of b's augmented layers goes
   through the MLP generators m to example-level fast weights W*_i, stored in
   memory M; its representation r'_i = u(Q, Q*, x'_i) is stored in memory R.
3. Each query reads W* = softmax(cos(R, r))^T M with its representation r and
   is classified by b with W and W*. The meta-loss is the mean query loss; its
   gradient reaches W, Q and the generators d and m.

As in the authors' code, the gradients fed to d and m are meta-information:
inputs computed on detached tensors, so no second-order terms are formed.
u's last augmented layer is its output, the representation read by cosine
attention: like b's softmax layer (and as in the authors' code) its two
branches are added before any nonlinearity.

Four settings follow the authors' Chainer code (MetaNetFull.py, utilsf.py and
generators.py of tsendeemts/metanet; read here in the copy chenyaxian/metanet
and by content) by default:

- ``fast_layers="all"``: every conv layer and every fully connected layer of
  both networks is augmented (a conv block is ``relu(conv(x, W)) +
  relu(conv(x, W*))``); conv gradients go through generators of their own
  (``d_conv``, ``m_conv``; the code's ``meta_lstm_l1`` and ``m_l1``), the fc
  ones through ``d`` and ``m`` (``meta_g_lstm_l1``, ``mc_l1``). ``"last"``
  augments u's representation layer and b's two fc layers only.
- ``preprocess_p=7``: ``logAndSign(grad, k=7)``, the same formula as the
  log/sign preprocessing of pipeline/nets/lstm.py with p = k.
- ``norm="none"``: the code's ``Block`` is conv + ReLU without
  normalization; ``"group"`` adds per-example layer normalization (GroupNorm,
  one group) after each convolution, on both branches.
- ``shuffle_support=True``: the code's episode generator shuffles each
  support set (``random.shuffle(support_set)``); the episode store keeps
  label order, so ``meta_grad`` permutes each support set, seeded by
  ``seed`` and the episode's own pixels (the same episode always gets the
  same order). The order matters only through the chunks d reads in turn.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.algorithms.fast_weights import (
    attention_read,
    augmented_linear,
    init_lstm_generator,
    init_mlp_generator,
    lstm_generate,
    mlp_generate,
)
from pipeline.algorithms.maml import task_accuracy
from pipeline.algorithms.meta_batch import episodes_per_pass, sliced_meta_grad
from pipeline.nets import init
from pipeline.nets.layers import conv_tasks
from pipeline.types import Metrics, Params
from tasks.episodes import Episodes


@dataclass(frozen=True)
class Memory:
    """What a MetaNet keeps of a batch of support sets: task fast weights Q*, keys R, values M."""

    task_fast: torch.Tensor
    """Q*: flat fast weights of u's augmented layers, ``[B, Pu]`` (layout ``MetaNet.fast_keys("u")``)."""
    keys: torch.Tensor
    """R: support representations r'_i, ``[B, S, representation]``."""
    values: torch.Tensor
    """M: flat example-level fast weights W*_i of b's augmented layers, ``[B, S, Pb]`` (``fast_keys("b")``)."""


@dataclass(frozen=True)
class MetaNet:
    """MetaNet for ``ways``-way image classification; ``init``/``meta_loss``/``meta_grad``/``adapt``.

    Parameters: ``b.*`` (base learner: conv trunk, ``b.fc1`` and ``b.fc2``),
    ``u.*`` (representation learner: conv trunk, ``u.fc1``), ``d.*`` and
    ``m.*`` (LSTM and MLP generators of the fc layers' fast weights) and, with
    ``fast_layers="all"``, ``d_conv.*`` and ``m_conv.*`` (the conv layers').
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
    preprocess_p: float = 7.0
    attention_scale: float = 1.0
    contrastive_margin: float = 1.0
    fast_layers: Literal["all", "last"] = "all"
    norm: Literal["none", "group"] = "none"
    shuffle_support: bool = True
    task_chunk: int | None = None
    """Episodes per backward pass of ``meta_grad`` (gradients summed): the same gradient in less memory. None: 1 on
    a CPU (far less memory at the same training speed there: python -m bench.metanet_memory, README), the whole
    meta-batch on a GPU."""
    seed: int = 0
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for key in ("ways", "in_channels", "image_size", "conv_layers", "filters", "hidden", "representation",
                    "generator_hidden", "rep_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"MetaNet.{key} must be at least 1, got {getattr(self, key)}")
        for key in ("preprocess_p", "attention_scale", "contrastive_margin"):
            if not getattr(self, key) > 0:
                raise ValueError(f"MetaNet.{key} must be positive, got {getattr(self, key)}")
        if self.task_chunk is not None and self.task_chunk < 1:
            raise ValueError(f"MetaNet.task_chunk must be at least 1, got {self.task_chunk}")
        for key, allowed in (("fast_layers", ("all", "last")), ("norm", ("none", "group"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"MetaNet.{key} must be one of {allowed}, got {getattr(self, key)!r}")

    def features(self) -> int:
        """Width of a trunk's output: filters times the spatial size left after the 2x2 max-pools."""
        size = self.image_size
        for _ in range(self.conv_layers):
            size = math.ceil(size / 2)
        return self.filters * size * size

    def init(self, seed: int) -> Params:
        """Fresh meta-parameters, identical for the same seed."""
        gen = init.generator(seed)
        params: Params = {}
        for net in ("b", "u"):
            channels = self.in_channels
            for i in range(self.conv_layers):
                shape = (self.filters, channels, 3, 3)
                params[f"{net}.conv{i}.weight"] = init.kaiming_normal(shape, channels * 9, gen, self.dtype)
                if self.norm == "group":
                    params[f"{net}.norm{i}.weight"] = torch.ones(self.filters, dtype=self.dtype)
                    params[f"{net}.norm{i}.bias"] = torch.zeros(self.filters, dtype=self.dtype)
                channels = self.filters
        params["b.fc1"] = init.kaiming_normal((self.hidden, self.features()), self.features(), gen, self.dtype)
        params["b.fc2"] = init.kaiming_normal((self.ways, self.hidden), self.hidden, gen, self.dtype)
        params["u.fc1"] = init.kaiming_normal((self.representation, self.features()), self.features(), gen, self.dtype)
        params.update(init_lstm_generator("d", self.generator_hidden, gen, self.dtype))
        params.update(init_mlp_generator("m", self.generator_hidden, gen, self.dtype))
        if self.fast_layers == "all":
            params.update(init_lstm_generator("d_conv", self.generator_hidden, gen, self.dtype))
            params.update(init_mlp_generator("m_conv", self.generator_hidden, gen, self.dtype))
        return params

    def fast_keys(self, net: str) -> list[str]:
        """The augmented layers of ``net`` ("b" or "u"), in the order of their flat fast weights."""
        convs = [f"{net}.conv{i}.weight" for i in range(self.conv_layers)] if self.fast_layers == "all" else []
        return convs + (["b.fc1", "b.fc2"] if net == "b" else ["u.fc1"])

    def trunk(self, params: Params, net: str, x: torch.Tensor, fast: Params | None = None) -> torch.Tensor:
        """Conv trunk of ``net`` ("b" or "u"): ``x[T, N, C, H, W] -> [T, N, features]``.

        Each block: 3x3 conv (normalization per ``norm``), ReLU, 2x2 max-pool (ceil
        mode). ``fast`` (``{conv key: [T, F, C, 3, 3]}``) adds each task's fast
        branch ``relu(conv(x, W*))``. A conv weight in ``params`` may carry a
        leading task dimension too (per-task copies, for per-task gradients).
        """
        t, n = x.shape[:2]
        h = x
        for i in range(self.conv_layers):
            key = f"{net}.conv{i}.weight"
            out = self._activate(params, net, i, conv_tasks(h, params[key], 1))
            if fast is not None and key in fast:
                out = out + self._activate(params, net, i, conv_tasks(h, fast[key], 1))
            h = F.max_pool2d(out.flatten(0, 1), 2, ceil_mode=True).unflatten(0, (t, n))
        return h.flatten(2)

    def _activate(self, params: Params, net: str, i: int, h: torch.Tensor) -> torch.Tensor:
        """ReLU of a block's conv output ``[T, N, F, H, W]``, after per-example GroupNorm when ``norm="group"``."""
        if self.norm == "group":
            weight, bias = params[f"{net}.norm{i}.weight"], params[f"{net}.norm{i}.bias"]
            h = F.group_norm(h.flatten(0, 1), 1, weight, bias).unflatten(0, h.shape[:2])
        return F.relu(h)

    def write_memory(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Memory:
        """Steps 1-2: Q* and the memories R and M of a batch of support sets ``[B, S, C, H, W]``, ``[B, S]``."""
        self._check("support", support_x, support_y)
        support_x = support_x.to(params["b.fc1"].dtype)
        task_fast = self._generate(params, "d", "u", self._representation_grads(params, support_x, support_y))
        keys = self._represent(params, task_fast, support_x)
        values = self._generate(params, "m", "b", self._task_grads(params, support_x, support_y))
        return Memory(task_fast, keys, values)

    def read(self, params: Params, memory: Memory, query_x: torch.Tensor) -> torch.Tensor:
        """Step 3: logits ``[B, Q, ways]`` of queries ``[B, Q, C, H, W]`` from the memory of their tasks."""
        query_x = query_x.to(params["b.fc1"].dtype)
        batch, queries = query_x.shape[:2]
        fast = self._split("b", attention_read(memory.keys, memory.values, self.represent(params, memory, query_x),
                                               self.attention_scale))
        if self.fast_layers == "all":
            convs = {k: v.flatten(0, 1) for k, v in fast.items() if ".conv" in k}
            h = self.trunk(params, "b", query_x.flatten(0, 1).unsqueeze(1), convs).reshape(batch, queries, -1)
        else:
            h = self.trunk(params, "b", query_x)
        h = augmented_linear(h, params["b.fc1"], fast["b.fc1"])
        return augmented_linear(h, params["b.fc2"], fast["b.fc2"], activation=False)

    def represent(self, params: Params, memory: Memory, x: torch.Tensor) -> torch.Tensor:
        """Representations ``[B, Q, representation]`` of images ``[B, Q, C, H, W]`` under their task's Q*."""
        return self._represent(params, memory.task_fast, x.to(params["u.fc1"].dtype))

    def _represent(self, params: Params, task_fast: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        fast = self._split("u", task_fast)
        hu = self.trunk(params, "u", x, fast)
        return augmented_linear(hu, params["u.fc1"], fast["u.fc1"].unsqueeze(1), activation=False)

    def _split(self, net: str, flat: torch.Tensor) -> Params:
        """Flat fast weights ``[*lead, P]`` -> ``{key: [*lead, *shape]}`` in ``fast_keys(net)`` order."""
        shapes = [self._shape(k) for k in self.fast_keys(net)]
        parts = flat.split([math.prod(s) for s in shapes], dim=-1)
        return {k: p.unflatten(-1, s) for k, p, s in zip(self.fast_keys(net), parts, shapes)}

    def _shape(self, key: str) -> tuple[int, ...]:
        if key.endswith(".weight"):
            i = int(key.split(".conv")[1].split(".")[0])
            return (self.filters, self.in_channels if i == 0 else self.filters, 3, 3)
        return {"b.fc1": (self.hidden, self.features()), "b.fc2": (self.ways, self.hidden),
                "u.fc1": (self.representation, self.features())}[key]

    def _generate(self, params: Params, prefix: str, net: str, grads: torch.Tensor) -> torch.Tensor:
        """Flat fast weights from flat gradients: the conv slices through ``{prefix}_conv``, the fc ones through ``prefix``.

        ``d`` (LSTM) reads ``grads[B, T, Pu]`` over T and returns ``[B, Pu]``; ``m`` (MLP) maps ``[B, S, Pb]`` elementwise.
        """
        generate = lstm_generate if prefix == "d" else mlp_generate
        sizes = [math.prod(self._shape(k)) for k in self.fast_keys(net)]
        out = []
        for key, g in zip(self.fast_keys(net), grads.split(sizes, dim=-1)):
            out.append(generate(params, f"{prefix}_conv" if ".conv" in key else prefix, g, self.preprocess_p))
        return torch.cat(out, dim=-1)

    def meta_loss(self, params: Params, episodes: Episodes) -> tuple[torch.Tensor, Metrics]:
        """Mean cross-entropy of every query of every episode, read through its episode's memory."""
        losses, metrics = self._episode_losses(params, episodes)
        return losses.mean(), metrics

    def _episode_losses(self, params: Params, episodes: Episodes) -> tuple[torch.Tensor, Metrics]:
        """Each episode's mean query cross-entropy ``[B]``, and the batch's mean ``loss`` and ``accuracy``."""
        self._check("query", episodes.query_x, episodes.query_y)
        logits = self.read(params, self.write_memory(params, episodes.support_x, episodes.support_y), episodes.query_x)
        losses = F.cross_entropy(logits.transpose(1, 2), episodes.query_y, reduction="none").mean(1)  # [B, Q] -> [B]
        accuracy = (logits.argmax(-1) == episodes.query_y).to(torch.float64).mean()
        return losses, {"loss": losses.mean().item(), "accuracy": accuracy.item()}

    def meta_grad(self, params: Params, episodes: Episodes) -> tuple[Params, Metrics]:
        """Autodiff of ``meta_loss`` with respect to every meta-parameter (support sets shuffled per ``shuffle_support``).

        Backpropagates ``task_chunk`` episodes at a time (default: one on a CPU, all on a GPU) through
        ``sliced_meta_grad``: the gradient of the whole meta-batch's mean loss (to float rounding), with the
        autograd graph of one chunk alive at a time instead of the meta-batch's (episodes do not interact).
        """
        if self.shuffle_support:
            episodes = shuffle_support(episodes, self.seed)
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        size = episodes_per_pass(self.task_chunk, episodes.support_x.device, 1, len(episodes))
        return sliced_meta_grad(leaves, episodes, size, lambda part: self._episode_losses(leaves, part))

    def evaluate(self, params: Params, episodes: Episodes, chunk: int | None = None) -> dict[str, torch.Tensor]:
        """Per-episode query ``loss`` and ``accuracy``, each ``[len(episodes)]``: ``adapt``'s, the memories of
        ``chunk`` support sets written in one pass (episodes do not interact: batching changes float rounding
        only). Default ``chunk``: 1 on a CPU, where stacking episodes was measured slower (``python -m
        bench.evaluation --chunks``, README), 32 on a GPU (unmeasured)."""
        self._check("query", episodes.query_x, episodes.query_y)
        fixed = {k: v.detach() for k, v in params.items()}
        chunk = episodes_per_pass(chunk, episodes.support_x.device, 1, 32)
        rows: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(episodes), chunk):
            part = episodes[start : start + chunk]
            memory = self.write_memory(fixed, part.support_x, part.support_y)  # autograd inside: u's gradients
            with torch.no_grad():
                logits = self.read(fixed, memory, part.query_x)  # [B, Q, ways]
            rows.append({
                "loss": F.cross_entropy(logits.transpose(1, 2), part.query_y, reduction="none").mean(1),
                "accuracy": task_accuracy(logits, part.query_y),
            })
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> MetaNetPredictor:
        """Fill the memories from one support set ``[S, C, H, W]``, ``[S]``; the predictor reads them."""
        memory = self.write_memory(params, support_x.unsqueeze(0), support_y.unsqueeze(0))
        return MetaNetPredictor(self, params, memory)

    def _copies(self, params: Params, net: str, count: int) -> Params:
        """Detached per-task copies ``[count, *shape]`` of ``net``'s augmented slow weights, to differentiate."""
        return {k: params[k].detach().expand(count, *params[k].shape).clone().requires_grad_(True)
                for k in self.fast_keys(net)}

    def _representation_grads(self, params: Params, support_x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Flat gradients ``[B, T, Pu]`` of u's representation loss on T support chunks (each chunk's mean).

        One shot (each class once): cross-entropy through a fixed softmax layer.
        Several shots: contrastive loss of each example against the whole support set.
        """
        batch, support = labels.shape
        with torch.enable_grad():
            copies = self._copies(params, "u", batch)
            slow = {**{k: v.detach() for k, v in params.items()}, **copies}
            hu = self.trunk(slow, "u", support_x.detach())
            r = torch.matmul(hu, copies["u.fc1"].transpose(1, 2))  # [B, S, representation]
            if support == self.ways:
                head = _representation_head(self.ways, self.representation).to(r)
                logits = F.relu(r) @ head.T
                losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(batch, support)
            else:
                dist2 = (r[:, :, None] - r[:, None]).square().sum(-1)
                same = (labels[:, :, None] == labels[:, None]).to(dist2.dtype)
                apart = F.relu(self.contrastive_margin - (dist2 + 1e-12).sqrt()).square()
                losses = (same * dist2 + (1 - same) * apart).mean(-1)
            chunk_losses = losses @ self._chunks(support).to(losses).T  # [B, T]
            grads = []
            for t in range(chunk_losses.shape[1]):
                parts = torch.autograd.grad(chunk_losses[:, t].sum(), list(copies.values()),
                                            retain_graph=t < chunk_losses.shape[1] - 1)
                grads.append(torch.cat([g.flatten(1) for g in parts], dim=1))
        return torch.stack(grads, dim=1)

    def _task_grads(self, params: Params, support_x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Flat task-loss gradients ``[B, S, Pb]`` of b's augmented layers, one per support example."""
        batch, support = labels.shape
        with torch.enable_grad():
            copies = self._copies(params, "b", batch * support)
            slow = {**{k: v.detach() for k, v in params.items()}, **copies}
            hb = self.trunk(slow, "b", support_x.detach().flatten(0, 1).unsqueeze(1))  # [B*S, 1, features]
            logits = torch.matmul(F.relu(torch.matmul(hb, copies["b.fc1"].transpose(1, 2))), copies["b.fc2"].transpose(1, 2))
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
            parts = torch.autograd.grad(loss, list(copies.values()))
        return torch.cat([g.flatten(1) for g in parts], dim=1).unflatten(0, (batch, support))

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


def shuffle_support(episodes: Episodes, seed: int) -> Episodes:
    """Each episode's support set in a random order, a pure function of ``seed`` and the episode's pixels.

    The permutation's generator is seeded with a CRC-32 of ``seed`` and of the
    episode's support images quantized to 8 bits, so the same episode is
    always shuffled the same way, on any device.
    """
    orders = []
    for b in range(len(episodes)):
        pixels = (episodes.support_x[b].detach() * 255).round().to(torch.uint8).cpu().numpy().tobytes()
        # torch's CPU generator keeps 32 bits of its seed: the CRC runs over the run's seed, then the pixels
        gen = torch.Generator().manual_seed(zlib.crc32(pixels, zlib.crc32(seed.to_bytes(8, "little"))))
        orders.append(torch.randperm(episodes.support_y.shape[1], generator=gen))
    order = torch.stack(orders).to(episodes.support_y.device)
    support_x = torch.take_along_dim(episodes.support_x, order.view(*order.shape, 1, 1, 1), dim=1)
    return Episodes(support_x, torch.take_along_dim(episodes.support_y, order, dim=1), episodes.query_x, episodes.query_y)


@dataclass(frozen=True)
class MetaNetPredictor:
    """A MetaNet adapted to one support set: maps queries ``[Q, C, H, W]`` to logits ``[Q, ways]``."""

    learner: MetaNet
    params: Params
    memory: Memory

    def __call__(self, query_x: torch.Tensor) -> torch.Tensor:
        return self.learner.read(self.params, self.memory, query_x.unsqueeze(0)).squeeze(0)


def _representation_head(ways: int, representation: int) -> torch.Tensor:
    """The fixed softmax layer of the one-shot representation loss.

    Algorithm 1 updates the slow weights with the query loss only, which never
    reaches this layer (it stays at its initial value in the authors' code), so
    it is a constant of the architecture rather than a meta-parameter.
    """
    gen = torch.Generator().manual_seed(0)
    return torch.randn(ways, representation, generator=gen, dtype=torch.float64) / math.sqrt(representation)
