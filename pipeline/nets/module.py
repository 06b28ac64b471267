"""Any ``torch.nn.Module`` as a network over a dict of parameters, through ``torch.func.functional_call``.

``model: {network: module, factory: "package.module:callable", kwargs: {...}}``: the
factory, called with ``kwargs``, returns the module; its parameters are the
meta-parameters (``named_parameters`` names), its buffers stay fixed constants, and
every forward pass is ``functional_call(module, params | buffers, x, strict=True)``
(torch.func's functional_call; pytorch's functorch/examples/maml_omniglot/
maml-omniglot-transforms.py runs MAML this way). Nothing of the module is
rewritten but its BatchNorm layers' running statistics, removed with
``torch.func.replace_all_batch_norm_modules_`` as torch.func advises: every
BatchNorm then normalizes with batch statistics (``transductive``, MAML's), or,
in ``support`` norm mode, queries with the support set's (pipeline/nets/norm.py).
Either way a forward hook on each BatchNorm replaces its output, for the duration
of one call, with the normalization written out (as pipeline/nets/layers.py does:
native batch_norm under torch.func.vmap gives wrong second-order gradients). The module
runs in training mode in meta-training (dropout active in every pass, with its own
randomness per task under vmap) and in eval mode wherever a learner is evaluated or
predicts for a user (``for_evaluation``: validation, meta-test, exports, the served
model): dropout and DropBlock off, so evaluation is deterministic. BatchNorm
normalizes as the norm mode says in both modes (it has no running statistics).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.func import functional_call, replace_all_batch_norm_modules_
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline.nets.norm import NORM_MODES, NormMode
from pipeline.types import Params


def import_factory(factory: str) -> Callable[..., Any]:
    """The callable named ``"package.module:attribute"`` (the attribute may be dotted).

    Raises ValueError naming ``factory`` when it is malformed, cannot be imported or lacks the
    attribute, TypeError when the attribute is not callable.
    """
    module_name, sep, attribute = factory.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"factory {factory!r}: expected 'package.module:callable'")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"factory {factory!r}: cannot import {module_name!r} ({e})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"factory {factory!r}: module {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"factory {factory!r}: {attribute!r} is not callable")
    return target


def factory_source(factory: str) -> Path:
    """Where the code of ``factory`` lies: its top-level package's folder, or its module's file.

    What an MLflow "models from code" model must carry (``code_paths``) to rebuild the module
    in another process and folder. Raises ValueError naming ``factory`` when it cannot be found.
    """
    top = factory.partition(":")[0].split(".")[0]
    spec = importlib.util.find_spec(top) if top else None
    if spec is None or (spec.origin is None and not spec.submodule_search_locations):
        raise ValueError(f"factory {factory!r}: cannot find the code of {top!r}")
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin)


def build_module(factory: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """``factory(**kwargs)``, checked: a ``torch.nn.Module`` with at least one parameter.

    Raises ValueError naming ``factory`` (import problems, an exception in the call, no
    parameters), TypeError (not callable, not a module).
    """
    make = import_factory(factory)
    try:
        module = make(**kwargs)
    except Exception as e:  # noqa: BLE001 - the user's code: any failure is reported as this factory's
        raise ValueError(f"factory {factory!r} with kwargs {kwargs!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"factory {factory!r} returned a {type(module).__name__}, not a torch.nn.Module")
    if not any(True for _ in module.parameters()):
        raise ValueError(f"factory {factory!r} returned a module without parameters: nothing to meta-learn")
    return module


@contextlib.contextmanager
def batch_statistics(module: torch.nn.Module, stats: int | None) -> Iterator[None]:
    """While open, every BatchNorm of ``module`` normalizes with the statistics of its input's first ``stats`` examples.

    The input's examples are along dimension 0 (one task's batch); mean and biased variance
    are taken over them and every dimension after the channels', as BatchNorm does in
    training. None: over all examples. The output is computed by hand (see the module's docstring).
    """

    def hook(layer: _BatchNorm, args: tuple[torch.Tensor, ...], _: torch.Tensor) -> torch.Tensor:
        x = args[0]
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x[:stats], dim=dims, correction=0, keepdim=True)
        out = (x - mean) * torch.rsqrt(var + layer.eps)
        if layer.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = out * layer.weight.reshape(shape) + layer.bias.reshape(shape)
        return out

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, _BatchNorm)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def module_mode(module: torch.nn.Module, training: bool) -> Iterator[None]:
    """While open, ``module`` and its submodules are in training (``True``) or eval mode; their modes are restored after."""
    modes = {m: m.training for m in module.modules()}
    module.train(training)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


@dataclass(frozen=True)
class ModuleNet:
    """A user's ``torch.nn.Module`` behind the networks' interface: ``init``, ``apply``, ``apply_tasks``.

    ``factory``: ``"package.module:callable"``, importable wherever the network runs (the
    driver, every Ray worker, and where an export is loaded); ``kwargs``: its keyword arguments.
    ``training``: the module's mode in every forward pass (False: dropout and the like off;
    see ``for_evaluation``).
    """

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    norm: NormMode = "transductive"
    training: bool = True
    module: torch.nn.Module = field(init=False, repr=False, compare=False)
    shapes: dict[str, torch.Size] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.norm not in NORM_MODES:
            raise ValueError(f"ModuleNet.norm must be one of {NORM_MODES}, got {self.norm!r}")
        module = replace_all_batch_norm_modules_(build_module(self.factory, self.kwargs)).train()
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "shapes", {k: p.shape for k, p in module.named_parameters()})

    def init(self, seed: int | torch.Generator, dtype: torch.dtype = torch.float32) -> Params:
        """The parameters of a fresh ``factory(**kwargs)`` built under ``torch.manual_seed(seed)`` (the module's own init).

        A generator ``seed`` gives the seed drawn from it. The global RNG state is restored afterwards.
        """
        if isinstance(seed, torch.Generator):
            seed = int(torch.randint(0, 2**62, (1,), generator=seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = build_module(self.factory, self.kwargs)
        return {k: p.detach().to(dtype) for k, p in fresh.named_parameters()}

    def batch_norm_names(self) -> frozenset[str]:
        """The names of the parameters of the module's BatchNorm layers (``algorithm.adapt_norm: false`` keeps them out of the inner loop)."""
        return frozenset(
            f"{name}.{key}" if name else key
            for name, layer in self.module.named_modules() if isinstance(layer, _BatchNorm)
            for key, _ in layer.named_parameters(recurse=False)
        )

    def _buffers(self, like: torch.Tensor) -> Params:
        """The module's buffers on ``like``'s device, floating ones in its dtype."""
        return {
            k: b.to(like.device, like.dtype if b.is_floating_point() else b.dtype) for k, b in self.module.named_buffers()
        }

    def apply(self, params: Params, x: torch.Tensor, stats: int | None = None) -> torch.Tensor:
        """One task: ``module(x)`` with ``params``, ``x[N, ...]``; ``stats``: BatchNorm statistics from the first ``stats`` examples."""
        with batch_statistics(self.module, stats), module_mode(self.module, self.training):
            return functional_call(self.module, params | self._buffers(x), (x,), strict=True)

    def apply_tasks(self, params: Params, x: torch.Tensor, stats: int | None = None) -> torch.Tensor:
        """Stacked tasks ``x[T, N, ...] -> [T, N, ...]`` with torch.func.vmap; params shared or with a leading T."""
        dims = {k: 0 if v.dim() == len(self.shapes[k]) + 1 else None for k, v in params.items()}
        return torch.func.vmap(
            lambda p, xs: self.apply(p, xs, stats), in_dims=(dims, 0), randomness="different"
        )(params, x)


Net = TypeVar("Net")


def for_evaluation(network: Net) -> Net:
    """``network`` as evaluation and prediction run it: a ModuleNet with its module in eval mode (dropout,
    DropBlock off; the same built module, not a new one); the built-in networks, which have no dropout, unchanged."""
    if not isinstance(network, ModuleNet) or not network.training:
        return network
    evaluating = copy.copy(network)
    object.__setattr__(evaluating, "training", False)
    return evaluating
