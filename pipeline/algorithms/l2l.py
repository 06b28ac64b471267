"""The LSTM optimizer of Andrychowicz et al. 2016 ("Learning to learn by gradient descent by gradient descent").

A small two-layer LSTM (20 hidden units) is shared by every coordinate of the
optimizee; each coordinate keeps its own hidden state. Its input is the
preprocessed gradient of that coordinate, its output (times 0.1) the step.
The meta-parameters are only the LSTM's weights, so their number does not
depend on the optimizee's size.

Meta-training unrolls the optimizee for ``unroll`` steps; the meta-loss is the
mean over the steps of the optimizee's loss after each update (the paper's sum
divided by T, which Adam does not notice). Optimizee gradients enter the LSTM
detached: no second derivatives, as the paper assumes.

Truncation and the stateless contract: ``meta_grad`` unrolls the whole
trajectory in one call, in segments of ``truncation`` steps. At a segment's end
the gradient of that segment's losses is taken and the optimizee and LSTM
states are detached (truncated BPTT); the segments' gradients are summed. The
sum is the truncated gradient of exactly the quantity ``meta_loss`` returns, so
with ``truncation >= unroll`` it equals ``autograd.grad(meta_loss)``. The paper
instead takes one Adam step per segment while the optimizee carries on; that
needs state across server steps, which the MetaLearner contract (and a
parameter server mixing workers' pushes) does not have. Here one server step =
one whole trajectory of ``unroll`` steps, whose gradient is the sum of its
``unroll / truncation`` segment gradients.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from pipeline.types import Metrics, Params, Predictor
from tasks.episodes import Episodes

LSTMState = tuple[torch.Tensor, ...]
"""Per-coordinate state ``(h0, c0, h1, c1, ...)``, each ``[n_coordinates, hidden]``."""


# ---- the coordinate-wise LSTM, as pure functions ----


def preprocess(grad: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """The paper's gradient preprocessing, ``[...] -> [..., 2]``.

    ``(log|g| / p, sgn g)`` where ``|g| >= e^-p``, else ``(-1, e^p g)``: scales
    spanning many orders of magnitude become inputs of order one.
    """
    threshold = math.exp(-p)
    big = grad.abs() >= threshold
    log_part = torch.log(grad.abs().clamp_min(threshold)) / p
    first = torch.where(big, log_part, torch.full_like(grad, -1.0))
    second = torch.where(big, torch.sign(grad), grad * math.exp(p))
    return torch.stack([first, second], dim=-1)


def init_lstm(seed: int, hidden: int = 20, layers: int = 2, inputs: int = 2, dtype: torch.dtype = torch.float32) -> Params:
    """LSTM weights ``lstm{k}.weight_ih``, ``lstm{k}.weight_hh``, ``lstm{k}.bias`` and a linear ``out`` head.

    Uniform in +-1/sqrt(hidden) like ``torch.nn.LSTM``; deterministic in ``seed``.
    """
    if hidden < 1 or layers < 1:
        raise ValueError(f"init_lstm: hidden and layers must be >= 1, got hidden={hidden}, layers={layers}")
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(hidden)

    def uniform(*shape: int) -> torch.Tensor:
        return ((torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(dtype)

    params: Params = {}
    width = inputs
    for k in range(layers):
        params[f"lstm{k}.weight_ih"] = uniform(4 * hidden, width)
        params[f"lstm{k}.weight_hh"] = uniform(4 * hidden, hidden)
        params[f"lstm{k}.bias"] = uniform(4 * hidden)
        width = hidden
    params["out.weight"] = uniform(1, hidden)
    params["out.bias"] = torch.zeros(1, dtype=dtype)
    return params


def lstm_layers(params: Params) -> int:
    """Number of stacked LSTM layers in ``params``."""
    layers = 0
    while f"lstm{layers}.weight_ih" in params:
        layers += 1
    if layers == 0:
        raise ValueError(f"not LSTM-optimizer weights: no 'lstm0.weight_ih' among keys {sorted(params)}")
    return layers


def init_state(params: Params, coordinates: int) -> LSTMState:
    """Zero hidden and cell state for ``coordinates`` coordinates."""
    hidden = params["lstm0.weight_hh"].shape[1]
    zeros = params["lstm0.weight_hh"].new_zeros(coordinates, hidden)
    return tuple(zeros for _ in range(2 * lstm_layers(params)))


def lstm_cell(
    x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step (gate order i, f, g, o as in ``torch.nn.LSTM``)."""
    gates = F.linear(x, weight_ih, bias) + F.linear(h, weight_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def lstm_update(
    params: Params, grad: torch.Tensor, state: LSTMState, *, p: float = 10.0, output_scale: float = 0.1
) -> tuple[torch.Tensor, LSTMState]:
    """The learned step for a gradient of any shape, and the new per-coordinate state.

    ``grad`` is flattened into coordinates; ``state`` has one row per coordinate.
    """
    x = preprocess(grad.reshape(-1), p)
    new_state = []
    for k in range(len(state) // 2):
        h, c = lstm_cell(
            x, state[2 * k], state[2 * k + 1], params[f"lstm{k}.weight_ih"], params[f"lstm{k}.weight_hh"], params[f"lstm{k}.bias"]
        )
        new_state += [h, c]
        x = h
    step = F.linear(x, params["out.weight"], params["out.bias"]).squeeze(-1) * output_scale
    return step.reshape(grad.shape), tuple(new_state)


# ---- optimizees: the functions the LSTM learns to minimize ----


@dataclass(frozen=True)
class Problem:
    """A batch of B optimization problems over flat parameters ``theta[B, P]``.

    ``loss(theta, t)`` is the per-problem loss ``[B]`` at step ``t`` (for
    mini-batched optimizees, on step ``t``'s mini-batch); ``predict(theta, x)``
    maps inputs to outputs with the optimized parameters.
    """

    theta0: torch.Tensor
    loss: Callable[[torch.Tensor, int], torch.Tensor]
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Optimizee(Protocol):
    """Builds the problems of a batch of episodes; randomness comes in through ``generator``."""

    def problem(self, x: torch.Tensor, y: torch.Tensor, steps: int, generator: torch.Generator) -> Problem:
        """Problems from ``x[B, ...]``, ``y[B, ...]``, able to run ``steps`` steps."""
        ...


@dataclass(frozen=True)
class Quadratic:
    """f(theta) = ||W theta - y||^2 with W ``[B, D, D]``, y ``[B, D]``; theta_0 ~ N(0, 1)."""

    def problem(self, x: torch.Tensor, y: torch.Tensor, steps: int, generator: torch.Generator) -> Problem:
        if x.dim() != 3 or y.dim() != 2 or x.shape[:2] != y.shape or x.shape[1] != x.shape[2]:
            raise ValueError(f"quadratic episodes need W[B, D, D] and y[B, D], got {list(x.shape)} and {list(y.shape)}")
        theta0 = torch.randn(y.shape, generator=generator, dtype=torch.float64).to(y.dtype)

        def loss(theta: torch.Tensor, t: int) -> torch.Tensor:
            return (torch.einsum("bij,bj->bi", x, theta) - y).square().sum(-1)

        def predict(theta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bij,bj->bi", w, theta)

        return Problem(theta0, loss, predict)


@dataclass(frozen=True)
class MLPClassifier:
    """An MLP classifier trained on mini-batches of its episode's support set (cross-entropy).

    The paper's MNIST optimizee is ``hidden=(20,)``, sigmoid, batch 128. Flat
    parameters hold ``[W0, b0, W1, b1, ...]`` with ``W`` as ``[out, in]``;
    initialization as ``torch.nn.Linear`` (uniform +-1/sqrt(fan_in)).
    """

    in_features: int
    classes: int
    hidden: tuple[int, ...] = (20,)
    activation: Literal["sigmoid", "relu"] = "sigmoid"
    batch_size: int = 128
    shapes: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.activation not in ("sigmoid", "relu"):
            raise ValueError(f"MLPClassifier.activation must be 'sigmoid' or 'relu', got {self.activation!r}")
        sizes = (self.in_features, *self.hidden, self.classes)
        object.__setattr__(self, "shapes", tuple((o, i) for i, o in zip(sizes[:-1], sizes[1:])))

    def size(self) -> int:
        """Number of parameters."""
        return sum(o * i + o for o, i in self.shapes)

    def logits(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``theta[B, P]``, ``x[B, N, in] -> [B, N, classes]``."""
        act = torch.sigmoid if self.activation == "sigmoid" else torch.relu
        offset = 0
        for layer, (o, i) in enumerate(self.shapes):
            w = theta[:, offset : offset + o * i].reshape(-1, o, i)
            b = theta[:, offset + o * i : offset + o * i + o]
            offset += o * i + o
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            if layer < len(self.shapes) - 1:
                x = act(x)
        return x

    def problem(self, x: torch.Tensor, y: torch.Tensor, steps: int, generator: torch.Generator) -> Problem:
        if x.dim() != 3 or x.shape[2] != self.in_features or y.shape != x.shape[:2]:
            raise ValueError(
                f"MLP optimizee needs x[B, N, {self.in_features}] and y[B, N], got {list(x.shape)} and {list(y.shape)}"
            )
        tasks, n = x.shape[:2]
        chunks = []
        for o, i in self.shapes:
            bound = 1.0 / math.sqrt(i)
            chunks.append((torch.rand(tasks, o * i + o, generator=generator, dtype=torch.float64) * 2 - 1) * bound)
        theta0 = torch.cat(chunks, dim=1).to(x.dtype)
        batch = min(self.batch_size, n)
        # one mini-batch (without replacement) per step, for every problem
        order = torch.rand(steps + 1, tasks, n, generator=generator).argsort(-1)[..., :batch]

        def loss(theta: torch.Tensor, t: int) -> torch.Tensor:
            idx = order[t]
            xb = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[2]))
            yb = torch.gather(y, 1, idx)
            logits = self.logits(theta, xb)
            return F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").reshape(tasks, -1).mean(1)

        return Problem(theta0, loss, self.logits)


def episode_generator(episodes: Episodes, salt: int = 0) -> torch.Generator:
    """A generator seeded from the episodes' content, so the same episodes give the same optimizee.

    The optimizee's initialization and mini-batch order are part of the task; tying
    them to the data keeps meta_loss a pure function without a global RNG.
    """
    digest = hashlib.blake2b(episodes.support_x.detach().cpu().contiguous().numpy().tobytes(), digest_size=8)
    digest.update(salt.to_bytes(8, "little", signed=True))
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") & (2**63 - 1))


# ---- unrolling ----


@torch.enable_grad()
def unroll(
    params: Params,
    problem: Problem,
    steps: int,
    *,
    truncation: int | None = None,
    segment_end: Callable[[torch.Tensor], None] | None = None,
    p: float = 10.0,
    output_scale: float = 0.1,
    checkpoint: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the learned optimizer for ``steps`` steps on ``problem``.

    Returns the detached loss curve ``[steps + 1, B]`` and the final ``theta[B, P]``.
    Every ``truncation`` steps (and at the end) ``segment_end`` receives that
    segment's share of the meta-loss (sum of mean losses after each update,
    divided by ``steps``), still attached to ``params``; then the optimizee and
    LSTM states are detached. ``checkpoint`` recomputes each LSTM update in the
    backward pass instead of storing its activations. Runs with autograd on even
    under ``torch.no_grad()``: the optimizee's own gradients need it.
    """
    if steps < 1:
        raise ValueError(f"unroll: steps must be >= 1, got {steps}")
    truncation = truncation or steps
    values = [params[k] for k in params]
    keys = list(params)

    def update(grad: torch.Tensor, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n_state = len(args) - len(keys)
        step, new_state = lstm_update(
            dict(zip(keys, args[n_state:])), grad, args[:n_state], p=p, output_scale=output_scale
        )
        return (step, *new_state)

    theta = problem.theta0.detach().requires_grad_()
    loss = problem.loss(theta, 0)
    (grad,) = torch.autograd.grad(loss.sum(), theta)
    curve = [loss.detach()]
    state = init_state(params, theta.numel())
    segment = theta.new_zeros(())
    for t in range(steps):
        if checkpoint:
            step, *state = _checkpoint(update, grad, *state, *values, use_reentrant=False)
        else:
            step, *state = update(grad, *state, *values)
        theta = theta + step.reshape(theta.shape)
        loss = problem.loss(theta, t + 1)
        (grad,) = torch.autograd.grad(loss.sum(), theta, retain_graph=True)
        grad = grad.detach()
        segment = segment + loss.mean() / steps
        curve.append(loss.detach())
        if (t + 1) % truncation == 0 or t + 1 == steps:
            if segment_end is not None:
                segment_end(segment)
            segment = theta.new_zeros(())
            theta = theta.detach().requires_grad_()
            state = [s.detach() for s in state]
    return torch.stack(curve), theta.detach()


# ---- the meta-learner ----


@dataclass(frozen=True)
class L2L:
    """The LSTM optimizer as a MetaLearner: meta-parameters are the LSTM's weights only."""

    optimizee: Optimizee
    hidden: int = 20
    layers: int = 2
    unroll: int = 100
    truncation: int = 20
    output_scale: float = 0.1
    preprocess_p: float = 10.0
    checkpoint: bool = False
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.unroll < 1 or self.truncation < 1:
            raise ValueError(f"L2L: unroll and truncation must be >= 1, got {self.unroll} and {self.truncation}")

    def init(self, seed: int) -> Params:
        """Fresh LSTM weights, deterministic in ``seed``."""
        return init_lstm(seed, self.hidden, self.layers, dtype=self.dtype)

    def _run(
        self, params: Params, episodes: Episodes, truncation: int, segment_end: Callable[[torch.Tensor], None] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        problem = self.optimizee.problem(episodes.support_x, episodes.support_y, self.unroll, episode_generator(episodes))
        return unroll(
            params,
            problem,
            self.unroll,
            truncation=truncation,
            segment_end=segment_end,
            p=self.preprocess_p,
            output_scale=self.output_scale,
            checkpoint=self.checkpoint,
        )

    @staticmethod
    def _metrics(meta_loss: float, curve: torch.Tensor) -> Metrics:
        return {"loss": meta_loss, "initial_loss": curve[0].mean().item(), "final_loss": curve[-1].mean().item()}

    def meta_loss(self, params: Params, episodes: Episodes) -> tuple[torch.Tensor, Metrics]:
        """Mean optimizee loss over the ``unroll`` steps and the episodes, untruncated (differentiable)."""
        parts: list[torch.Tensor] = []
        curve, _ = self._run(params, episodes, self.unroll, parts.append)
        loss = parts[0]
        return loss, self._metrics(loss.item(), curve)

    def meta_grad(self, params: Params, episodes: Episodes) -> tuple[Params, Metrics]:
        """Truncated-BPTT gradient of ``meta_loss``: the sum of its segments' gradients (see the module doc)."""
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        grads = {k: torch.zeros_like(v) for k, v in params.items()}
        total = [0.0]

        def accumulate(segment: torch.Tensor) -> None:
            total[0] += segment.item()
            for k, g in zip(leaves, torch.autograd.grad(segment, list(leaves.values()), allow_unused=True)):
                if g is not None:
                    grads[k] += g

        curve, _ = self._run(leaves, episodes, self.truncation, accumulate)
        return grads, self._metrics(total[0], curve)

    def adapt(self, params: Params, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Optimize the support set's problem for ``unroll`` steps; predict with the final parameters."""
        episode = Episodes(support_x[None], support_y[None], support_x[None], support_y[None])
        fixed = {k: v.detach() for k, v in params.items()}
        problem = self.optimizee.problem(episode.support_x, episode.support_y, self.unroll, episode_generator(episode))
        _, theta = unroll(fixed, problem, self.unroll, truncation=1, p=self.preprocess_p, output_scale=self.output_scale)

        def predict(x: torch.Tensor) -> torch.Tensor:
            return problem.predict(theta, x[None])[0]

        return predict

    def torch_optimizer(self, params: Params, model_params: Iterable[torch.Tensor], **kwargs: Any) -> torch.optim.Optimizer:
        """The trained optimizer ``params`` as a ``torch.optim.Optimizer`` over ``model_params`` (export)."""
        from pipeline.optim.torch_optim import LearnedOptimizer

        options = {"output_scale": self.output_scale, "preprocess_p": self.preprocess_p} | kwargs
        return LearnedOptimizer(model_params, params, **options)

    def curve(self, params: Params, problem: Problem, steps: int) -> torch.Tensor:
        """Loss curve ``[steps + 1, B]`` of the learned optimizer on ``problem`` (evaluation, no meta-gradient)."""
        fixed = {k: v.detach() for k, v in params.items()}
        curve, _ = unroll(fixed, problem, steps, truncation=1, p=self.preprocess_p, output_scale=self.output_scale)
        return curve
