"""The Meta-learner LSTM of Ravi & Larochelle 2017 ("Optimization as a model for few-shot learning").

The learner is the Conv4 of pipeline/nets/conv4.py or any module
(pipeline/nets/module.py: ``model.network: module`` or ``resnet12``). The meta-learner is
coordinate-wise, shared by every learner parameter:

1. a plain LSTM over the preprocessed, detached inputs of each coordinate,
   ``(log|L|/p, sgn L)`` of the task's loss and the same of its gradient;
2. the meta-LSTM cell, whose cell state IS the learner's parameter:
   ``theta_t = f_t * theta_{t-1} + i_t * (-grad_t)``, with
   ``f_t = sigmoid(a_t)``, ``a_t = W_F [h_t, theta_{t-1}, f'_{t-1}] + b_F`` and
   ``i_t = sigmoid(b_t)``, ``b_t = W_I [h_t, theta_{t-1}, i'_{t-1}] + b_I``.

Three settings follow the authors' code (twitter/meta-learning-lstm,
model/lstm/meta-learner-lstm.lua and lstm-helper.lua) by default:

- ``gate_input``: the previous gate fed back, ``f'_{t-1}``, is the
  pre-sigmoid ``a_{t-1}`` there (``fP = fS[s-1]``, stored before the sigmoid);
  ``"post_sigmoid"`` feeds ``f_{t-1}`` as the paper writes it.
- ``grad_over_batch``: the learner's gradient ``grad_t`` is that of the mean
  support loss divided once more by the batch size (``feval``'s
  ``gradParameters:div(inputs:size(1))`` after a size-averaged criterion);
  here the batch is the whole support set. ``False`` uses the mean loss's gradient.
- ``eval_norm``: meta-training normalizes with batch statistics, but at
  meta-test (``adapt``) the queries are normalized with running statistics
  (``learner.set('evaluate')``): reset to mean 0 and variance 1 for each
  episode, then updated at each of the learner's support passes,
  ``running = (1 - m) running + m batch`` with momentum ``m = 0.9``
  (``BN_momentum``) and the unbiased batch variance, as torch7's BatchNorm.
  A query's logits then depend on the support set only; it needs the
  hand-written Conv4 (whose BatchNorm takes given statistics). ``"batch"``
  normalizes the queries as in meta-training, in the network's ``norm`` mode
  (pipeline/nets/norm.py): as one batch (``transductive``) or with the
  support set's statistics (``support``: independent of the other queries).

Its initial cell state is the learner's learned initialization. The forget
bias starts high and the input bias low, so training starts near gradient
descent with a small step (f = 1, i = lr is exactly gradient descent). The
meta-loss is the query loss after ``inner_steps`` updates on the support set;
the gradients and losses fed to the meta-learner are detached (no second
derivatives), as the paper assumes.

Meta-parameters: ``init.<learner key>`` (the initialization), ``lstm.*`` (the
first layer) and ``metalstm.{WF,bF,WI,bI}`` (the gates).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.nn.functional as F

from pipeline.algorithms.maml import task_accuracy
from pipeline.algorithms.meta_batch import episodes_per_pass
from pipeline.nets import init, lstm
from pipeline.nets.conv4 import Conv4
from pipeline.nets.layers import Moments
from pipeline.nets.module import ModuleNet, for_evaluation
from pipeline.nets.norm import query_outputs
from pipeline.types import Metrics, Params, Predictor
from tasks.episodes import Episodes

if TYPE_CHECKING:
    from matplotlib.figure import Figure

INIT = "init."


@dataclass(frozen=True)
class GateTrace:
    """Gate values of every coordinate at every update: ``forget`` and ``input`` ``[steps, coordinates]``."""

    forget: torch.Tensor
    input: torch.Tensor


@dataclass(frozen=True)
class MetaLSTM:
    """The Meta-learner LSTM as a MetaLearner over a Conv4 or module learner (``eval_norm="running"``: Conv4 only)."""

    network: Conv4 | ModuleNet
    inner_steps: int = 12
    eval_inner_steps: int | None = None
    hidden: int = 20
    preprocess_p: float = 10.0
    forget_bias: tuple[float, float] = (4.0, 6.0)
    input_bias: tuple[float, float] = (-5.0, -4.0)
    gate_input: Literal["pre_sigmoid", "post_sigmoid"] = "pre_sigmoid"
    grad_over_batch: bool = True
    eval_norm: Literal["running", "batch"] = "running"
    norm_momentum: float = 0.9
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.inner_steps < 1:
            raise ValueError(f"MetaLSTM.inner_steps must be >= 1, got {self.inner_steps}")
        if self.gate_input not in ("pre_sigmoid", "post_sigmoid"):
            raise ValueError(f"MetaLSTM.gate_input must be 'pre_sigmoid' or 'post_sigmoid', got {self.gate_input!r}")
        if self.eval_norm not in ("running", "batch"):
            raise ValueError(f"MetaLSTM.eval_norm must be 'running' or 'batch', got {self.eval_norm!r}")
        if self.eval_norm == "running" and not isinstance(self.network, Conv4):
            raise ValueError(
                f"MetaLSTM.eval_norm 'running' needs the hand-written Conv4 (its BatchNorm takes given statistics),"
                f" got a {type(self.network).__name__}; use eval_norm 'batch'"
            )
        if not 0 < self.norm_momentum <= 1:
            raise ValueError(f"MetaLSTM.norm_momentum must lie in (0, 1], got {self.norm_momentum}")
        for name in ("forget_bias", "input_bias"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"MetaLSTM.{name}: low must not exceed high, got {[low, high]}")

    def init(self, seed: int) -> Params:
        """Learner initialization, first-layer LSTM (uniform +-0.01) and gates (biases from their ranges)."""
        gen = init.generator(seed)
        params = {INIT + k: v for k, v in self.network.init(gen, self.dtype).items()}
        h = self.hidden

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return init.uniform_between(shape, low, high, gen, self.dtype)

        params["lstm.weight_ih"] = uniform(-0.01, 0.01, 4 * h, 4)
        params["lstm.weight_hh"] = uniform(-0.01, 0.01, 4 * h, h)
        params["lstm.bias"] = uniform(-0.01, 0.01, 4 * h)
        params["metalstm.WF"] = uniform(-0.01, 0.01, h + 2)
        params["metalstm.WI"] = uniform(-0.01, 0.01, h + 2)
        params["metalstm.bF"] = uniform(*self.forget_bias, 1)
        params["metalstm.bI"] = uniform(*self.input_bias, 1)
        return params

    def learn(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor, steps: int, differentiable: bool = True
    ) -> tuple[Params, GateTrace, list[Moments]]:
        """Run ``steps`` meta-LSTM updates of the learner on B support sets ``x[B, N, C, H, W]``, ``y[B, N]``.

        Returns the learner's parameters (with a leading task dimension B), the
        gate trace and, with ``eval_norm="running"``, each BatchNorm's running
        statistics after the support passes (detached; else []). ``differentiable=False``
        (evaluation) drops the graph at every step.
        """
        tasks = support_x.shape[0]
        keys = [k[len(INIT) :] for k in params if k.startswith(INIT)]
        shapes = [params[INIT + k].shape for k in keys]
        sizes = [s.numel() for s in shapes]
        theta = torch.cat([params[INIT + k].reshape(1, -1).expand(tasks, -1) for k in keys], dim=1)  # [B, P]
        coordinates = theta.numel()
        h = theta.new_zeros(coordinates, self.hidden)
        c = theta.new_zeros(coordinates, self.hidden)
        f_prev = theta.new_zeros(coordinates)
        i_prev = theta.new_zeros(coordinates)
        scale = 1.0 / support_y.shape[1] if self.grad_over_batch else 1.0
        running: list[Moments] | None = None
        forget, inputs = [], []
        for _ in range(steps):
            if not theta.requires_grad:
                theta = theta.requires_grad_()
            loss, moments = self._loss(theta, keys, shapes, sizes, support_x, support_y)
            running = self._running(running, moments) if moments else None
            (grad,) = torch.autograd.grad(loss.sum(), theta, retain_graph=differentiable)
            grad = grad.detach().reshape(-1) * scale
            loss_in = loss.detach()[:, None].expand(tasks, theta.shape[1]).reshape(-1)
            x = torch.cat([lstm.preprocess(loss_in, self.preprocess_p), lstm.preprocess(grad, self.preprocess_p)], dim=1)
            h, c = lstm.cell(x, h, c, params["lstm.weight_ih"], params["lstm.weight_hh"], params["lstm.bias"])
            flat = theta.reshape(-1)
            f_logit = torch.cat([h, flat[:, None], f_prev[:, None]], 1) @ params["metalstm.WF"] + params["metalstm.bF"]
            i_logit = torch.cat([h, flat[:, None], i_prev[:, None]], 1) @ params["metalstm.WI"] + params["metalstm.bI"]
            f, i = torch.sigmoid(f_logit), torch.sigmoid(i_logit)
            theta = (f * flat - i * grad).reshape(tasks, -1)
            forget.append(f.detach())
            inputs.append(i.detach())
            f_prev, i_prev = (f_logit, i_logit) if self.gate_input == "pre_sigmoid" else (f, i)
            if not differentiable:
                theta, h, c, f_prev, i_prev = (t.detach() for t in (theta, h, c, f_prev, i_prev))
        trace = GateTrace(torch.stack(forget), torch.stack(inputs))
        return self._unflatten(theta, keys, shapes, sizes), trace, running or []

    def _running(self, running: list[Moments] | None, batch: list[Moments]) -> list[Moments]:
        """torch7 BatchNorm's running statistics after one more training pass (from mean 0, variance 1)."""
        m = self.norm_momentum
        updated = []
        for i, b in enumerate(batch):
            mean, var = (running[i].mean, running[i].var) if running else (torch.zeros_like(b.mean), torch.ones_like(b.var))
            unbiased = b.var.detach() * (b.count / max(b.count - 1, 1))
            updated.append(Moments((1 - m) * mean + m * b.mean.detach(), (1 - m) * var + m * unbiased, b.count))
        return updated

    def _unflatten(self, theta: torch.Tensor, keys: list[str], shapes: list[torch.Size], sizes: list[int]) -> Params:
        parts = theta.split(sizes, dim=1)
        return {k: p.reshape(theta.shape[0], *s) for k, p, s in zip(keys, parts, shapes)}

    def _loss(
        self, theta: torch.Tensor, keys: list[str], shapes: list[torch.Size], sizes: list[int], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, list[Moments]]:
        params = self._unflatten(theta, keys, shapes, sizes)
        if self.eval_norm == "running":
            logits, moments = self.network.apply_moments(params, x)
        else:
            logits, moments = self.network.apply_tasks(params, x), []
        return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").reshape(y.shape).mean(1), moments

    def meta_loss(self, params: Params, episodes: Episodes) -> tuple[torch.Tensor, Metrics]:
        """Mean query cross-entropy after ``inner_steps`` updates on each support set."""
        with torch.enable_grad():
            fast, trace, _ = self.learn(params, episodes.support_x, episodes.support_y, self.inner_steps)
        logits = query_outputs(self.network, fast, episodes.support_x, episodes.query_x)
        loss = F.cross_entropy(logits.flatten(0, 1), episodes.query_y.flatten())
        accuracy = (logits.argmax(-1) == episodes.query_y).float().mean().item()
        return loss, {
            "loss": loss.item(),
            "accuracy": accuracy,
            "forget_gate": trace.forget.mean().item(),
            "input_gate": trace.input.mean().item(),
        }

    def meta_grad(self, params: Params, episodes: Episodes) -> tuple[Params, Metrics]:
        """Autodiff of ``meta_loss`` (first-order in the learner's gradients by construction)."""
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            loss, metrics = self.meta_loss(leaves, episodes)
            grads = torch.autograd.grad(loss, list(leaves.values()))
        return dict(zip(leaves, grads)), metrics

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Learn on one support set (``eval_inner_steps`` updates); the predictor maps queries to logits.

        The queries are normalized with the running statistics of the support
        passes (``eval_norm="running"``) or as in meta-training (``"batch"``: the
        network's norm mode). A module learner runs in eval mode (dropout off).
        """
        learn = self._learned(params, support_x[None], support_y[None])

        def predict(x: torch.Tensor) -> torch.Tensor:
            return learn(x[None])[0]

        return predict

    def evaluate(self, params: Params, episodes: Episodes, chunk: int | None = None) -> dict[str, torch.Tensor]:
        """Per-episode query ``loss`` and ``accuracy``, each ``[len(episodes)]``: ``adapt``'s, ``chunk`` episodes per pass.

        Each episode is learned and its queries normalized on their own (per-episode batch or running
        statistics), so batching changes nothing but float rounding. Default ``chunk``: 1 on a CPU, where
        stacking episodes was measured slower (``python -m bench.evaluation``, README), 32 on a GPU (unmeasured).
        """
        chunk = episodes_per_pass(chunk, episodes.support_x.device, 1, 32)
        rows: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(episodes), chunk):
            part = episodes[start : start + chunk]
            logits = self._learned(params, part.support_x, part.support_y)(part.query_x)  # [B, Q, ways]
            rows.append({
                "loss": F.cross_entropy(logits.transpose(1, 2), part.query_y, reduction="none").mean(1),
                "accuracy": task_accuracy(logits, part.query_y),
            })
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def _learned(
        self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """Learn on B support sets ``[B, N, C, H, W]`` (``eval_inner_steps``, no graph kept); the returned function
        maps their queries ``[B, Q, C, H, W]`` to logits ``[B, Q, ways]`` (detached), normalized per ``eval_norm``."""
        learner = self.evaluating()
        fixed = {k: v.detach() for k, v in params.items()}
        with torch.enable_grad():
            fast, _, running = learner.learn(fixed, support_x, support_y, self.eval_inner_steps or self.inner_steps, False)
        network = learner.network

        @torch.no_grad()
        def logits(query_x: torch.Tensor) -> torch.Tensor:
            if self.eval_norm == "running":
                return network.apply_moments(fast, query_x, running)[0]
            return query_outputs(network, fast, support_x, query_x)

        return logits

    def evaluating(self) -> MetaLSTM:
        """This learner as evaluation runs it: a module learner in eval mode (``for_evaluation``: dropout off)."""
        return replace(self, network=for_evaluation(self.network))

    def gate_trace(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> GateTrace:
        """Gate values over the updates on one support set (the paper's gate figure)."""
        fixed = {k: v.detach() for k, v in params.items()}
        with torch.enable_grad():
            _, trace, _ = self.evaluating().learn(
                fixed, support_x[None], support_y[None], self.eval_inner_steps or self.inner_steps, False
            )
        return trace

    def figures(self, params: Params, episodes: Episodes) -> dict[str, Figure]:
        """The gate figure on the first of ``episodes`` (the driver logs it as plots/gates.png)."""
        return {"gates": plot_gates(self.gate_trace(params, episodes.support_x[0], episodes.support_y[0]))}


def plot_gates(trace: GateTrace) -> Figure:
    """The paper's gate figure: median and 10-90% band of the forget and input gates at each update."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, (name, values) in zip(axes, (("forget gate", trace.forget), ("input gate", trace.input))):
        steps = torch.arange(1, values.shape[0] + 1)
        low, mid, high = torch.quantile(values.double(), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), dim=1)
        ax.fill_between(steps, low, high, alpha=0.3)
        ax.plot(steps, mid)
        ax.set_xlabel("update")
        ax.set_title(name)
    figure.tight_layout()
    return figure
