"""The run config: one YAML file, typed and validated before any cluster work.

Unknown keys are errors, every error names the dotted key and the value, and a
validated config is frozen. ``--set a.b=value`` overrides are applied to the raw
YAML before validation, so they are checked exactly like the file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import Discriminator, Field, Tag, ValidationError, model_validator

from tasks.config import EpisodeConfig, Strict


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names key, value and file."""


class MLPModel(Strict):
    """Fully connected network with ReLU (the sinusoid MLP of the MAML paper is 1-40-40-1).

    ``activation`` is read by the L2L digits optimizee (the paper's MLP is sigmoid).
    """

    network: Literal["mlp"] = "mlp"
    hidden: tuple[int, ...] = (40, 40)
    activation: Literal["relu", "sigmoid"] = "relu"


class Conv4Model(Strict):
    """The Conv4 of the MAML paper: 4 x (3x3 conv, BatchNorm, ReLU), then a linear head.

    Omniglot uses 64 filters and stride-2 convolutions; Mini-ImageNet 32 filters and 2x2 max-pool.
    """

    network: Literal["conv4"] = "conv4"
    filters: int = Field(64, ge=1)
    downsample: Literal["stride", "maxpool"] = "stride"


def tag_or(key: str, default: str) -> Discriminator:
    """A union discriminator on ``key`` that falls back to ``default`` when the key is left out."""

    def pick(value: Any) -> str:
        if isinstance(value, dict):
            return value.get(key, default)
        return getattr(value, key, default)

    return Discriminator(pick)


ModelConfig = Annotated[
    Union[Annotated[MLPModel, Tag("mlp")], Annotated[Conv4Model, Tag("conv4")]], tag_or("network", "mlp")
]


class GradientMetaLearner(Strict):
    """Settings shared by the gradient-based initialization learners."""

    inner_lr: float = Field(0.01, gt=0)
    inner_steps: int = Field(1, ge=1)
    eval_inner_steps: int | None = Field(None, ge=1, description="inner steps at evaluation; default inner_steps")
    learn_inner_lr: bool = Field(False, description="Meta-SGD: one learnable inner learning rate per parameter")
    batching: Literal["auto", "loop", "stacked", "vmap"] = Field(
        "auto", description="how tasks of a meta-batch are batched (see bench/throughput.py)"
    )
    task_chunk: int | None = Field(
        None, ge=1, description="tasks per stacked pass; default 8 for conv4 on a CPU, else the whole meta-batch"
    )


class MAMLAlgorithm(GradientMetaLearner):
    """MAML (Finn et al. 2017); ``first_order: true`` drops the second-order terms."""

    name: Literal["maml"] = "maml"
    first_order: bool = False


class ReptileAlgorithm(GradientMetaLearner):
    """Reptile (Nichol et al. 2018): meta-gradient = theta - mean adapted theta."""

    name: Literal["reptile"] = "reptile"
    inner_optimizer: Literal["sgd", "adam"] = "sgd"


class L2LAlgorithm(Strict):
    """The LSTM optimizer of Andrychowicz et al. 2016 (pipeline/algorithms/l2l.py)."""

    name: Literal["l2l"] = "l2l"
    hidden: int = Field(20, ge=1, description="LSTM hidden units per layer")
    layers: int = Field(2, ge=1)
    unroll: int = Field(100, ge=1, description="optimizee steps T per trajectory (one meta_grad call)")
    truncation: int = Field(20, ge=1, description="truncated BPTT every this many steps")
    output_scale: float = Field(0.1, gt=0)
    preprocess_p: float = Field(10.0, gt=0)
    checkpoint: bool = Field(False, description="recompute each LSTM update in backward (less memory)")


class MetaLSTMAlgorithm(Strict):
    """The Meta-learner LSTM of Ravi & Larochelle 2017 (pipeline/algorithms/meta_lstm.py)."""

    name: Literal["meta_lstm"] = "meta_lstm"
    inner_steps: int = Field(12, ge=1, description="learner updates per episode (paper: 12 for 1-shot, 8 for 5-shot)")
    eval_inner_steps: int | None = Field(None, ge=1, description="updates at evaluation; default inner_steps")
    hidden: int = Field(20, ge=1, description="hidden units of the first (plain) LSTM layer")
    preprocess_p: float = Field(10.0, gt=0)
    forget_bias: tuple[float, float] = Field((4.0, 6.0), description="uniform range of the initial forget-gate bias")
    input_bias: tuple[float, float] = Field((-5.0, -4.0), description="uniform range of the initial input-gate bias")


class MetaNetAlgorithm(Strict):
    """Meta Networks of Munkhdalai & Yu 2017 (pipeline/algorithms/metanet.py); defaults follow the paper's Omniglot setup."""

    name: Literal["metanet"] = "metanet"
    conv_layers: int = Field(5, ge=1, description="3x3 conv + 2x2 max-pool blocks per trunk (b and u)")
    filters: int = Field(64, ge=1)
    hidden: int = Field(64, ge=1, description="width of the base learner's augmented hidden layer")
    representation: int = Field(64, ge=1, description="width of the representation r (u's augmented layer)")
    generator_hidden: int = Field(20, ge=1, description="hidden units of the generators d (LSTM) and m (MLP)")
    rep_steps: int = Field(5, ge=1, description="T: support chunks whose representation-loss gradients d reads")
    preprocess_p: float = Field(10.0, gt=0)
    attention_scale: float = Field(1.0, gt=0, description="multiplies the cosines before the attention softmax")
    contrastive_margin: float = Field(1.0, gt=0, description="margin of the several-shot representation loss")


AlgorithmConfig = Annotated[
    Union[
        Annotated[MAMLAlgorithm, Tag("maml")],
        Annotated[ReptileAlgorithm, Tag("reptile")],
        Annotated[L2LAlgorithm, Tag("l2l")],
        Annotated[MetaLSTMAlgorithm, Tag("meta_lstm")],
        Annotated[MetaNetAlgorithm, Tag("metanet")],
    ],
    tag_or("name", "maml"),
]


class OptimizerConfig(Strict):
    """The parameter server's Adam on the meta-parameters."""

    lr: float = Field(0.001, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    clip_norm: float | None = Field(None, gt=0, description="clip the global gradient norm")
    schedule: Literal["constant", "cosine"] = "constant"

    @model_validator(mode="after")
    def _betas(self) -> OptimizerConfig:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optimizer.betas must lie in [0, 1), got {list(self.betas)}")
        return self


class TrainConfig(Strict):
    """How long and how wide to meta-train."""

    steps: int = Field(1000, ge=1, description="meta-iterations (server updates)")
    meta_batch: int = Field(32, ge=1, description="episodes per meta-iteration, summed over workers")
    workers: int = Field(1, ge=1)
    gpus_per_worker: float = Field(1.0, ge=0, description="used only when the cluster has GPUs")
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(2, ge=0, description="async: pushes older than this many versions are rejected")
    val_every: int = Field(100, ge=1)
    val_episodes: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    test_episodes: int = Field(600, ge=1)
    log_every: int = Field(10, ge=1)
    max_bad_grads: int = Field(10, ge=1, description="stop after this many non-finite gradients in a row")
    dtype: Literal["float32", "float64"] = "float32"


class TrackingConfig(Strict):
    """MLflow: embedded SQLite by default, a server URI in production."""

    uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = "metapipe"
    outage_timeout_s: float = Field(3600.0, gt=0, description="how long the run's end waits for an unreachable MLflow to return")


class RunConfig(EpisodeConfig):
    """A whole run: the episode store plus model, algorithm, optimizer, training and tracking."""

    name: str = "metapipe"
    seed: int = 0
    model: ModelConfig = Field(default_factory=MLPModel)
    algorithm: AlgorithmConfig = Field(default_factory=MAMLAlgorithm)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.train.meta_batch < self.train.workers:
            raise ValueError(
                f"train.meta_batch ({self.train.meta_batch}) must be at least train.workers ({self.train.workers})"
            )
        if self.model.network == "conv4" and self.task.name not in ("omniglot", "miniimagenet"):
            raise ValueError(f"model.network: conv4 needs an image task, got task.name={self.task.name!r}")
        if self.algorithm.name == "l2l" and self.task.name not in ("quadratic", "digits"):
            raise ValueError(f"algorithm.name: l2l optimizes task.name quadratic or digits, got {self.task.name!r}")
        if self.algorithm.name == "meta_lstm" and self.model.network != "conv4":
            raise ValueError(f"algorithm.name: meta_lstm trains a conv4 learner, got model.network={self.model.network!r}")
        if self.model.network == "mlp" and self.model.activation == "sigmoid" and self.algorithm.name != "l2l":
            raise ValueError(
                f"model.activation: sigmoid is used only by l2l's MLP optimizee; {self.algorithm.name} networks use relu"
            )
        return self


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set algorithm.inner_lr=0.4")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"--set {item!r}: empty key")
    return key.split("."), yaml.safe_load(raw)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``dotted.key=value`` set (YAML syntax for the value)."""
    result = yaml.safe_load(yaml.safe_dump(raw))
    for item in overrides:
        path, value = parse_override(item)
        node = result
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(path[: depth + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return result


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in error.errors():
        key = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _UNION_TAGS))
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {key or '<root>'}: {msg}{shown}")
    return "\n".join(lines)


_UNION_TAGS = {"sinusoid", "quadratic", "omniglot", "miniimagenet", "mlp", "conv4", "maml", "reptile", "l2l", "meta_lstm", "digits", "metanet"}


def validate(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a raw mapping into a frozen RunConfig, or raise ConfigError naming each bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: expected a YAML mapping at the top, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def _read_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
    """The YAML mapping in ``path`` deep-merged over its ``base:`` file, and the base files read.

    ``base: FILE`` (top level) names another YAML mapping, relative to the file that
    names it, that may have a base of its own. Mappings merge key by key, the naming
    file's own values winning; any other value (list, number, string) replaces the
    base's. The ``base`` key is removed. ``chain``: the files that led here, to refuse a cycle.
    """
    named_by = f" (base of {chain[-1]})" if chain else ""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}{named_by}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}{named_by} is not valid YAML: {e}") from None
    if not chain:
        raw = raw or {}  # an empty run config is an empty mapping (a base must hold one)
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else type(raw).__name__
        raise ConfigError(f"invalid config {path}{named_by}: expected a YAML mapping at the top, got {got}")
    if "base" not in raw:
        return raw, []
    ref = raw.pop("base")
    if not isinstance(ref, str) or not ref.strip():
        raise ConfigError(f"invalid config {path}: base: expected a YAML file path relative to {path.parent}, got {ref!r}")
    base = path.parent / ref
    seen = [p.resolve() for p in (*chain, path)]
    if base.resolve() in seen:
        cycle = " -> ".join(str(p) for p in (*chain[seen.index(base.resolve()):], path, base))
        raise ConfigError(f"invalid config {path}: base: {ref!r} makes a cycle of bases: {cycle}")
    merged, bases = _read_with_bases(base, (*chain, path))

    def merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
        out = dict(low)
        for key, value in high.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    return merge(merged, raw), [base, *bases]


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config and its ``base:`` files, apply ``--set`` overrides and validate it."""
    path = Path(path)
    raw, bases = _read_with_bases(path)
    source = f"{path} (with base {', '.join(str(b) for b in bases)})" if bases else str(path)
    return validate(apply_overrides(raw, overrides or []), source)
