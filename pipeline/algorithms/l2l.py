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

Truncation (``algorithm.update_per``): a trajectory of ``unroll`` steps is cut
into segments of ``truncation`` steps; at a segment's end the gradient of that
segment's losses is taken and the optimizee and LSTM states are detached
(truncated BPTT). ``TruncatedL2L`` (update_per: truncation, the paper's and
deepmind/learning-to-learn's train.py / meta.py: one Adam step per unroll of 20,
``num_steps / unroll_length`` unrolls per epoch on the same optimizees) makes one
server step per segment: ``begin`` starts a trajectory's state (the *carry*:
optimizee parameters, their gradient and loss, LSTM state, step), and
``truncation_grad`` runs the next segment from it under the current LSTM weights
and returns the next carry, detached, until the trajectory ends. ``L2L``
(update_per: trajectory) unrolls the whole trajectory in one ``meta_grad`` call
and sums its segments' gradients into one server step: the truncated gradient of
exactly the quantity ``meta_loss`` returns, so with ``truncation >= unroll`` it
equals ``autograd.grad(meta_loss)``.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal, Protocol

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from pipeline.nets import init, lstm
from pipeline.optim.base import GradientTransformation, State, Tree, tree_map
from pipeline.types import Carry, Metrics, Params, Predictor
from tasks.episodes import Episodes

LSTMState = tuple[torch.Tensor, ...]
"""Per-coordinate state ``(h0, c0, h1, c1, ...)``, each ``[n_coordinates, hidden]``."""


# ---- the learned update rule: pipeline.nets.lstm's cell over every coordinate ----


def init_lstm(seed: int, hidden: int = 20, layers: int = 2, inputs: int = 2, dtype: torch.dtype = torch.float32) -> Params:
    """LSTM weights ``lstm{k}.weight_ih``, ``lstm{k}.weight_hh``, ``lstm{k}.bias`` and a linear ``out`` head.

    Uniform in +-1/sqrt(hidden) like ``torch.nn.LSTM``; deterministic in ``seed``.
    """
    if hidden < 1 or layers < 1:
        raise ValueError(f"init_lstm: hidden and layers must be >= 1, got hidden={hidden}, layers={layers}")
    gen = init.generator(seed)
    params: Params = {}
    width = inputs
    for k in range(layers):
        cell = lstm.init_cell(width, hidden, gen, dtype)
        params.update({f"lstm{k}.{name}": w for name, w in zip(("weight_ih", "weight_hh", "bias"), cell)})
        width = hidden
    params["out.weight"] = init.uniform((1, hidden), 1.0 / math.sqrt(hidden), gen, dtype)
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


def zero_state(like: torch.Tensor, coordinates: int, hidden: int, layers: int) -> LSTMState:
    """Zero hidden and cell states ``[coordinates, hidden]`` of ``layers`` layers (separate tensors), like ``like``."""
    return tuple(like.new_zeros(coordinates, hidden) for _ in range(2 * layers))


def init_state(params: Params, coordinates: int) -> LSTMState:
    """Zero hidden and cell state for ``coordinates`` coordinates."""
    weight = params["lstm0.weight_hh"]
    return zero_state(weight, coordinates, weight.shape[1], lstm_layers(params))


def lstm_update(
    params: Params, grad: torch.Tensor, state: LSTMState, *, p: float = 10.0, output_scale: float = 0.1
) -> tuple[torch.Tensor, LSTMState]:
    """The learned step for a gradient of any shape, and the new per-coordinate state.

    ``grad`` is flattened into coordinates; ``state`` has one row per coordinate.
    """
    x = lstm.preprocess(grad.reshape(-1), p)
    new_state = []
    for k in range(len(state) // 2):
        h, c = lstm.cell(
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
        theta0 = init.normal(tuple(y.shape), 1.0, generator, y.dtype).to(y.device)  # drawn on the CPU: same on any device

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
        chunks = [init.uniform((tasks, o * i + o), 1.0 / math.sqrt(i), generator, x.dtype) for o, i in self.shapes]
        theta0 = torch.cat(chunks, dim=1).to(x.device)  # drawn on the CPU: the same optimizee on any device
        batch = min(self.batch_size, n)
        # one mini-batch (without replacement) per step, for every problem
        order = torch.rand(steps + 1, tasks, n, generator=generator).argsort(-1)[..., :batch].to(x.device)

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


@dataclass(frozen=True)
class Segment:
    """What ``run_segment`` returns: the segment's summed mean losses (attached to the LSTM weights), the detached
    losses after each update ``[stop - start, B]``, and the state at ``stop`` (detached): ``theta[B, P]``, its
    gradient and loss ``[B]``, and the LSTM state."""

    loss_sum: torch.Tensor
    losses: torch.Tensor
    theta: torch.Tensor
    grad: torch.Tensor
    loss: torch.Tensor
    state: LSTMState


@torch.enable_grad()
def run_segment(
    params: Params,
    problem: Problem,
    theta: torch.Tensor,
    grad: torch.Tensor,
    state: LSTMState,
    start: int,
    stop: int,
    *,
    p: float = 10.0,
    output_scale: float = 0.1,
    checkpoint: bool = False,
) -> Segment:
    """Optimizee steps ``start`` to ``stop - 1`` by the learned optimizer, from ``theta[B, P]`` at step ``start``
    with its gradient ``grad`` and the LSTM ``state`` (all taken as constants: truncated BPTT).

    ``checkpoint`` recomputes each LSTM update in the backward pass instead of
    storing its activations. Runs with autograd on even under ``torch.no_grad()``:
    the optimizee's own gradients need it.
    """
    keys = list(params)
    values = [params[k] for k in keys]

    def update(grad: torch.Tensor, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n_state = len(args) - len(keys)
        step, new_state = lstm_update(
            dict(zip(keys, args[n_state:])), grad, args[:n_state], p=p, output_scale=output_scale
        )
        return (step, *new_state)

    theta = theta.detach().requires_grad_()
    state = [s.detach() for s in state]
    total = theta.new_zeros(())
    losses = []
    for t in range(start, stop):
        if checkpoint:
            step, *state = _checkpoint(update, grad, *state, *values, use_reentrant=False)
        else:
            step, *state = update(grad, *state, *values)
        theta = theta + step.reshape(theta.shape)
        loss = problem.loss(theta, t + 1)
        (grad,) = torch.autograd.grad(loss.sum(), theta, retain_graph=True)
        grad = grad.detach()
        total = total + loss.mean()
        losses.append(loss.detach())
    return Segment(total, torch.stack(losses), theta.detach(), grad, losses[-1], tuple(s.detach() for s in state))


def start_trajectory(problem: Problem, hidden: int, layers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, LSTMState]:
    """``theta0[B, P]``, its gradient, its loss ``[B]`` and a zero LSTM state (one row per coordinate)."""
    theta = problem.theta0.detach().requires_grad_()
    with torch.enable_grad():
        loss = problem.loss(theta, 0)
        (grad,) = torch.autograd.grad(loss.sum(), theta)
    return theta.detach(), grad.detach(), loss.detach(), zero_state(theta, theta.numel(), hidden, layers)


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
    """Run the learned optimizer for ``steps`` steps on ``problem``, in segments of ``truncation`` (``run_segment``).

    Returns the detached loss curve ``[steps + 1, B]`` and the final ``theta[B, P]``.
    At each segment's end ``segment_end`` receives that segment's share of the
    meta-loss (sum of mean losses after each update, divided by ``steps``), still
    attached to ``params``. Raises ValueError for ``steps < 1``.
    """
    if steps < 1:
        raise ValueError(f"unroll: steps must be >= 1, got {steps}")
    truncation = truncation or steps
    hidden, layers = params["lstm0.weight_hh"].shape[1], lstm_layers(params)
    theta, grad, loss, state = start_trajectory(problem, hidden, layers)
    curve = [loss[None]]
    for start in range(0, steps, truncation):
        seg = run_segment(
            params, problem, theta, grad, state, start, min(start + truncation, steps),
            p=p, output_scale=output_scale, checkpoint=checkpoint,
        )
        if segment_end is not None:
            segment_end(seg.loss_sum / steps)
        curve.append(seg.losses)
        theta, grad, state = seg.theta, seg.grad, seg.state
    return torch.cat(curve), theta


# ---- the meta-learner ----


@dataclass(frozen=True)
class L2L:
    """The LSTM optimizer as a MetaLearner: meta-parameters are the LSTM's weights only; one server step per
    trajectory (``algorithm.update_per: trajectory``; ``TruncatedL2L`` steps per truncation)."""

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

    def problem(self, episodes: Episodes) -> Problem:
        """The optimizee problems of ``episodes`` (initialization and mini-batches seeded by their content)."""
        return self.optimizee.problem(episodes.support_x, episodes.support_y, self.unroll, episode_generator(episodes))

    def _run(
        self, params: Params, episodes: Episodes, truncation: int, segment_end: Callable[[torch.Tensor], None] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return unroll(
            params,
            self.problem(episodes),
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

    def opt_fn(
        self, params: Params, output_scale: float | None = None, preprocess_p: float | None = None
    ) -> GradientTransformation:
        """The trained LSTM ``params`` as an optimizer of any parameters (learned_optimization's ``opt_fn``).

        An ``init``/``update`` pair over a tensor or named tensors (each updated
        coordinate-wise with its own LSTM state; the weights follow the
        gradient's dtype and device), so ``pipeline.optim.torch_optim.TorchOptimizer``
        makes it a ``torch.optim.Optimizer``. ``output_scale`` and
        ``preprocess_p`` default to the learner's. Raises ValueError for weights
        of another shape of LSTM optimizer or a non-positive option.
        """
        scale = self.output_scale if output_scale is None else output_scale
        p = self.preprocess_p if preprocess_p is None else preprocess_p
        if not scale > 0 or not p > 0:
            raise ValueError(f"L2L.opt_fn: output_scale and preprocess_p must be positive, got {scale!r} and {p!r}")
        layers = lstm_layers(params)
        expected = {f"lstm{k}.{n}" for k in range(layers) for n in ("weight_ih", "weight_hh", "bias")} | {"out.weight", "out.bias"}
        if set(params) != expected:
            raise ValueError(
                f"L2L.opt_fn: weights keys {sorted(params)} are not those of a {layers}-layer LSTM optimizer "
                f"(missing {sorted(expected - set(params))}, unexpected {sorted(set(params) - expected)})"
            )
        weights = {k: v.detach().clone() for k, v in params.items()}

        def step(grad: torch.Tensor, state: LSTMState) -> tuple[torch.Tensor, LSTMState]:
            like = {k: v.to(device=grad.device, dtype=grad.dtype) for k, v in weights.items()}
            return lstm_update(like, grad, state, p=p, output_scale=scale)

        def init(tree: Tree) -> State:
            hidden = weights["lstm0.weight_hh"].shape[1]
            return tuple(tree_map(lambda t: t.new_zeros(t.numel(), hidden), tree) for _ in range(2 * layers))

        def update(grads: Tree, state: State) -> tuple[Tree, State]:
            if isinstance(grads, torch.Tensor):
                return step(grads, state)
            done = {k: step(g, tuple(s[k] for s in state)) for k, g in grads.items()}
            new_state = tuple({k: done[k][1][i] for k in done} for i in range(len(state)))
            return {k: d for k, (d, _) in done.items()}, new_state

        return GradientTransformation(init, update)

    def curve(self, params: Params, problem: Problem, steps: int) -> torch.Tensor:
        """Loss curve ``[steps + 1, B]`` of the learned optimizer on ``problem`` (evaluation, no meta-gradient)."""
        fixed = {k: v.detach() for k, v in params.items()}
        curve, _ = unroll(fixed, problem, steps, truncation=1, p=self.preprocess_p, output_scale=self.output_scale)
        return curve


@dataclass(frozen=True)
class TruncatedL2L(L2L):
    """L2L with one meta-gradient per truncation (``algorithm.update_per: truncation``): pipeline.types.Truncated.

    Follows deepmind/learning-to-learn's train.py (``num_unrolls = num_steps //
    unroll_length`` Adam steps per epoch, the optimizees carried on between them;
    new optimizees each epoch) and meta.py (the state after an unroll feeds the
    next, ``stop_gradient``-ed). The carry is a dict of detached tensors:
    ``theta[B, P]``, ``grad[B, P]`` (its gradient), ``loss[B]`` (its loss),
    ``state.{k}`` (``[B * P, hidden]``, h and c of each layer) and ``step``
    (a 0-d int64: optimizee steps done). The optimizee problem itself is rebuilt
    from the episodes (seeded by their content), so the same episodes must come
    with every truncation of a trajectory (``keeps_episodes``).
    """

    keeps_episodes: ClassVar[bool] = True

    def begin(self, episodes: Episodes) -> Carry:
        """The carry at step 0 of the trajectories of ``episodes``: theta_0, its gradient and loss, zero LSTM state."""
        theta, grad, loss, state = start_trajectory(self.problem(episodes), self.hidden, self.layers)
        return _carry(theta, grad, loss, state, 0)

    def truncation_grad(self, params: Params, episodes: Episodes, carry: Carry) -> tuple[Params, Metrics, Carry | None]:
        """The gradient of the next segment's mean loss (steps ``step + 1`` to ``min(step + truncation, unroll)``,
        averaged over the episodes) at ``params``, its metrics, and the carry after it (None: the trajectory ended).

        Metrics: ``loss`` (that mean), ``initial_loss`` and ``final_loss`` (mean
        loss before and after the segment). Raises ValueError for a carry of
        another trajectory length (``step`` not below ``unroll``).
        """
        start = int(carry["step"])
        if not 0 <= start < self.unroll:
            raise ValueError(f"TruncatedL2L: carry at step {start}, outside a trajectory of unroll={self.unroll} steps")
        stop = min(start + self.truncation, self.unroll)
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        state = tuple(carry[f"state.{k}"] for k in range(2 * self.layers))
        seg = run_segment(
            leaves, self.problem(episodes), carry["theta"], carry["grad"], state, start, stop,
            p=self.preprocess_p, output_scale=self.output_scale, checkpoint=self.checkpoint,
        )
        loss = seg.loss_sum / (stop - start)
        found = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), found)}
        metrics = {"loss": loss.item(), "initial_loss": carry["loss"].mean().item(), "final_loss": seg.loss.mean().item()}
        if stop == self.unroll:
            return grads, metrics, None
        return grads, metrics, _carry(seg.theta, seg.grad, seg.loss, seg.state, stop)


def _carry(theta: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, state: LSTMState, step: int) -> Carry:
    """A TruncatedL2L carry: the optimizee at optimizee step ``step`` and the LSTM state, as one flat dict of tensors."""
    carry = {"theta": theta, "grad": grad, "loss": loss, "step": torch.tensor(step, dtype=torch.int64)}
    return carry | {f"state.{k}": s for k, s in enumerate(state)}
