"""Export a trained meta-learner to a directory and load it back without the training paths.

The directory holds ``weights.safetensors``, ``config.json`` (the run config) and
``export.json`` (format version, algorithm, sha256 of the weights, test metrics), and for
a learner that adapts from a state meta-training carried (pipeline.types.CarriedEvaluation:
Reptile with ``algorithm.eval_state: carried``) ``eval_state.safetensors``, that state, its
sha256 in ``export.json`` (``eval_state_sha256``); an export without it adapts from a fresh start.
Loading checks them all and never unpickles anything; a ``module`` network is rebuilt
by importing the factory recorded in ``config.json`` (``model.factory``, ``model.kwargs``). A loaded learner predicts each
query independently of the others in the call by default: networks with BatchNorm
run in ``support`` norm mode (pipeline/nets/norm.py), whatever mode they were trained in.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

from pipeline.build import build_learner
from pipeline.config import RunConfig, validate
from pipeline.errors import ExportError
from pipeline.evaluation import adapt_from, eval_state
from pipeline.nets.module import factory_source, import_factory
from pipeline.nets.norm import NORM_MODES, NormMode
from pipeline.optim.torch_optim import TorchOptimizer
from pipeline.runtime.checkpoint import sha256_file
from pipeline.types import Carry, Params, Predictor
from tasks.families import family
from tasks.family import ImageFamily

FORMAT_VERSION = 1
WEIGHTS, CONFIG, META, STATE = "weights.safetensors", "config.json", "export.json", "eval_state.safetensors"


def export(
    params: Params, config: RunConfig, out_dir: str | Path, metrics: dict[str, float] | None = None, state: Carry | None = None
) -> Path:
    """Write ``params`` and ``config`` to ``out_dir`` in the export format, with ``state`` when given (what every task
    adapts from: pipeline.evaluation.eval_state); returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in params.items()}, str(out / WEIGHTS))
    (out / CONFIG).write_text(json.dumps(config.model_dump(mode="json"), indent=1))
    meta = {
        "format_version": FORMAT_VERSION,
        "algorithm": config.algorithm.name,
        "task": config.task_spec.family,
        "weights_sha256": sha256_file(out / WEIGHTS),
        "metrics": metrics or {},
    }
    (out / STATE).unlink(missing_ok=True)  # an earlier export's into the same folder
    if state is not None:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(out / STATE))
        meta["eval_state_sha256"] = sha256_file(out / STATE)
    (out / META).write_text(json.dumps(meta, indent=1))
    return out


def factory_code(export_dir: str | Path) -> list[Path]:
    """The code an export needs beyond metapipe's: the folder (or file) of a ``module`` network's factory, if outside ``pipeline``.

    The MLflow pyfunc model carries it (``code_paths``), so the served model rebuilds the module
    in any folder. Raises ValueError naming the factory when its code cannot be found.
    """
    model = json.loads((Path(export_dir) / CONFIG).read_text()).get("model", {})
    if model.get("network") != "module":
        return []
    source = factory_source(model["factory"])
    metapipe = Path(__file__).resolve().parents[1]
    return [] if source.resolve() == metapipe else [source]


class ExportedLearner:
    """A trained meta-learner: preprocess inputs, adapt to a support set, predict queries.

    ``norm``: the BatchNorm mode of its predictions (networks without BatchNorm ignore it);
    ``support`` (default) makes each query's prediction independent of the other queries.
    ``state``: the export's ``eval_state.safetensors`` (None without one); every task adapts from what the
    learner takes of it (pipeline.evaluation.eval_state; None: a fresh start).

    Raises ValueError when ``state`` is not a state this learner adapts from (a foreign one).
    """

    def __init__(
        self, config: RunConfig, params: Params, meta: dict[str, Any], norm: NormMode = "support", state: Carry | None = None
    ) -> None:
        self.config = config
        self.params = params
        self.meta = meta
        self.state = state
        if hasattr(config.model, "norm"):
            config = config.model_copy(update={"model": config.model.model_copy(update={"norm": norm})})
        self._learner = build_learner(config)
        self._start = eval_state(self._learner, state)

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        """PIL images as read from the data set's files -> the input tensor ``[N, C, H, W]``.

        Raises ValueError for a learner whose task has no images, or for an empty list.
        """
        task_family = family(self.config.task)
        if not isinstance(task_family, ImageFamily):
            raise ValueError(f"preprocess: task {self.config.task_spec.family!r} has no images; pass tensors to adapt()")
        return task_family.preprocess(images, self.config.task)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor) -> Predictor:
        """Adapt to one task's support set; the returned predictor maps queries to logits/outputs."""
        predict = adapt_from(self._learner, self.params, support_x, support_y, self._start)

        def predictor(query_x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return predict(query_x)

        return predictor

    def optimizer(self, params: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
        """The learned optimizer over ``params`` as a torch.optim.Optimizer; ``kwargs`` go to the learner's ``opt_fn``.

        Raises TypeError for an algorithm that learns an initialization (no ``opt_fn``).
        """
        opt_fn = getattr(self._learner, "opt_fn", None)
        if opt_fn is None:
            raise TypeError(f"algorithm {self.config.algorithm.name!r} learns an initialization, not an optimizer")
        return TorchOptimizer(params, opt_fn(self.params, **kwargs))


def load(path: str | Path, norm: NormMode = "support") -> ExportedLearner:
    """Load an export directory; refuses missing files, other format versions and altered weights.

    ``norm="support"`` (default): each query is predicted independently of the others in
    the call; ``"transductive"``: queries normalized with their own batch's statistics, as
    in MAML's training and the papers' numbers (predictions then depend on the call's batch).
    Raises ExportError naming the file, ValueError for another ``norm``.
    """
    if norm not in NORM_MODES:
        raise ValueError(f"load: norm must be one of {NORM_MODES}, got {norm!r}")
    root = Path(path)
    for name in (WEIGHTS, CONFIG, META):
        if not (root / name).is_file():
            raise ExportError(f"export file missing: {root / name}")
    try:
        meta = json.loads((root / META).read_text())
        raw = json.loads((root / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ExportError(f"{root}: invalid JSON in export metadata: {e}") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{root / META}: format_version {meta.get('format_version')!r}, this metapipe reads {FORMAT_VERSION}")
    if sha256_file(root / WEIGHTS) != meta.get("weights_sha256"):
        raise ExportError(f"{root / WEIGHTS}: sha256 does not match {META} (weights altered or truncated)")
    model = raw.get("model") if isinstance(raw, dict) else None
    if isinstance(model, dict) and model.get("network") == "module":
        try:  # the module is rebuilt from its recorded factory, never unpickled
            import_factory(str(model.get("factory")))
        except (ValueError, TypeError) as e:
            raise ExportError(
                f"{root / CONFIG}: model.factory {model.get('factory')!r} cannot be used here ({e}); install its"
                " package or put its folder on PYTHONPATH"
            ) from None
    state = None
    if "eval_state_sha256" in meta:  # older exports, and learners that adapt from a fresh start, have none
        if not (root / STATE).is_file():
            raise ExportError(f"export file missing: {root / STATE} ({META} names its sha256)")
        if sha256_file(root / STATE) != meta["eval_state_sha256"]:
            raise ExportError(f"{root / STATE}: sha256 does not match {META} (state altered or truncated)")
        state = load_file(str(root / STATE))
    config = validate(raw, str(root / CONFIG))
    try:
        return ExportedLearner(config, load_file(str(root / WEIGHTS)), meta, norm, state)
    except ValueError as e:
        if state is None:  # not the state's fault: let it say what it is
            raise
        raise ExportError(f"{root / STATE}: not a state this learner adapts from ({e})") from None  # the sha256 matched: written so
