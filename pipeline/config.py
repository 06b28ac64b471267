"""The run config: one YAML file, typed and validated before any cluster work.

Unknown keys are errors, every error names the dotted key and the value, and a
validated config is frozen. ``--set a.b=value`` overrides are applied to the raw
YAML before validation, so they are checked exactly like the file.
"""
from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, Union

import yaml
from pydantic import (
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.errors import ConfigError
from tasks.config import EpisodeConfig
from tasks.families import FAMILIES, spec
from tasks.family import ImageFamily, Kind, Strict, TaskSpec

if TYPE_CHECKING:
    from pipeline.algorithms.maml import Network


class ModelSection(Strict):
    """What every model section declares: the inputs its network takes (checked by ``RunConfig``) and how it builds.

    The networks' modules are imported inside ``build`` (they import torch; this module stays light).
    """

    inputs: ClassVar[str] = "flat"
    """What one example must be: ``flat`` (a feature vector) or ``image`` ([C, H, W])."""

    @abstractmethod
    def build(self, task: TaskSpec) -> Network:
        """The network of this section sized for ``task`` (its input shape and outputs)."""

    @property
    def min_image_size(self) -> int:
        """Smallest image side the network accepts."""
        return 1


NormField = Field(
    "transductive",
    description="BatchNorm statistics of query passes: each batch's own (the papers') or the support set's (pipeline/nets/norm.py)",
)


class MLPModel(ModelSection):
    """Fully connected network with ReLU (the sinusoid MLP of the MAML paper is 1-40-40-1).

    ``activation`` is read by the L2L digits optimizee (the paper's MLP is sigmoid).
    """

    network: Literal["mlp"] = "mlp"
    hidden: tuple[Annotated[int, Field(ge=1)], ...] = (40, 40)
    activation: Literal["relu", "sigmoid"] = "relu"

    def build(self, task: TaskSpec) -> Network:
        """``input features -> hidden... -> outputs`` (sinusoid: 1-40-40-1)."""
        from pipeline.nets.mlp import MLP

        return MLP((task.input_shape[0], *self.hidden, task.outputs))


class Conv4Model(ModelSection):
    """The Conv4 of the MAML paper: 4 x (3x3 conv, BatchNorm, ReLU), then a linear head.

    Omniglot uses 64 filters and stride-2 convolutions; Mini-ImageNet 32 filters and 2x2 max-pool.
    """

    inputs: ClassVar[str] = "image"
    network: Literal["conv4"] = "conv4"
    filters: int = Field(64, ge=1)
    downsample: Literal["stride", "maxpool"] = "stride"
    norm: Literal["transductive", "support"] = NormField
    norm_scale: bool = Field(
        True,
        description="BatchNorm scale (gamma) parameters; false: offset only, cbfinn/maml's tf.contrib.layers.batch_norm"
        " (scale=False). true is the Reptile, ProtoNets and Meta-LSTM references' (and torch's)",
    )

    @property
    def min_image_size(self) -> int:
        """Smallest image side the four blocks leave at least one pixel of (2x2 max-pool floors)."""
        return 16 if self.downsample == "maxpool" else 1

    def build(self, task: TaskSpec) -> Network:
        """The MAML paper's Conv4 for ``[C, H, W]`` images and ``outputs`` classes."""
        from pipeline.nets.conv4 import Conv4

        channels, size, _ = task.input_shape
        return Conv4(channels, size, task.outputs, self.filters, self.downsample, norm=self.norm, norm_scale=self.norm_scale)


class ResNet12Model(ModelSection):
    """ResNet-12 (MetaOptNet / learn2learn form; pipeline/nets/resnet12.py), run as a module through functional_call."""

    inputs: ClassVar[str] = "image"
    network: Literal["resnet12"] = "resnet12"
    widths: tuple[int, int, int, int] = Field((64, 160, 320, 640), description="the four residual blocks' widths")
    drop_prob: float = Field(0.0, ge=0, lt=1, description="DropBlock rate in blocks 3 and 4 (MetaOptNet: 0.1); 0 = off")
    block_size: int = Field(5, ge=1, description="DropBlock's square side")
    norm: Literal["transductive", "support"] = NormField

    @model_validator(mode="after")
    def _widths(self) -> ResNet12Model:
        if min(self.widths) < 1:
            raise ValueError(f"model.widths: every width must be at least 1, got {list(self.widths)}")
        return self

    @property
    def min_image_size(self) -> int:
        """Four 2x2 max-pools must leave at least one pixel."""
        return 16

    def build(self, task: TaskSpec) -> Network:
        """ResNet-12 (pipeline/nets/resnet12.py) through the module path, for ``[C, H, W]`` images and ``outputs`` classes."""
        from pipeline.nets.module import ModuleNet

        kwargs = {"in_channels": task.input_shape[0], "ways": task.outputs, "widths": list(self.widths),
                  "drop_prob": self.drop_prob, "block_size": self.block_size}
        return ModuleNet("pipeline.nets.resnet12:ResNet12", kwargs, self.norm)


class ModuleModel(ModelSection):
    """Any ``torch.nn.Module``: ``factory`` (``"package.module:callable"``) called with ``kwargs`` (pipeline/nets/module.py).

    Checked when the config is validated: the factory must import, return a module with
    parameters, and (``RunConfig``) map one example of the task to its outputs.
    """

    inputs: ClassVar[str] = "any"
    network: Literal["module"] = "module"
    factory: str = Field(description="'package.module:callable', importable on the driver, every worker and where exports load")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory (JSON values)")
    norm: Literal["transductive", "support"] = NormField

    @model_validator(mode="after")
    def _factory_builds(self) -> ModuleModel:
        from pipeline.nets.module import build_module  # imported here: it imports torch

        try:
            build_module(self.factory, self.kwargs)
        except (ValueError, TypeError) as e:
            raise ValueError(f"model.factory: {e}") from None
        return self

    def build(self, task: TaskSpec) -> Network:
        """The user's module: ``factory(**kwargs)`` (its inputs and outputs are checked by ``RunConfig``)."""
        from pipeline.nets.module import ModuleNet

        return ModuleNet(self.factory, dict(self.kwargs), self.norm)


def tag_or(key: str, default: str) -> Discriminator:
    """A union discriminator on ``key`` that falls back to ``default`` when the key is left out."""

    def pick(value: Any) -> str:
        if isinstance(value, dict):
            return value.get(key, default)
        return getattr(value, key, default)

    return Discriminator(pick)


MODELS = {"mlp": MLPModel, "conv4": Conv4Model, "resnet12": ResNet12Model, "module": ModuleModel}
"""``model.network`` -> its section, which builds the network (``ModelSection.build``)."""

ModelConfig = Annotated[Union[tuple(Annotated[m, Tag(n)] for n, m in MODELS.items())], tag_or("network", "mlp")]  # noqa: UP007


class AlgorithmSection(Strict):
    """What every algorithm section declares about the runs it can serve (checked by ``RunConfig``).

    ``task_kinds``: the task kinds it meta-learns on (tasks/family.py ``TaskSpec.kind``);
    ``networks``: the ``model.network`` values it trains, or None when it builds its own
    networks and ignores the model section; ``needs_images``: whether examples must be images;
    ``model_problem``: what else it needs of the model section.
    """

    task_kinds: ClassVar[frozenset[Kind]] = frozenset({"regression", "classification"})
    networks: ClassVar[frozenset[str] | None] = frozenset(MODELS)
    needs_images: ClassVar[bool] = False

    def model_problem(self, model: ModelSection) -> str | None:
        """Why this algorithm's settings cannot run with ``model`` (one of ``networks``), naming both keys; None when they can."""
        return None


class GradientMetaLearner(AlgorithmSection):
    """Settings shared by the gradient-based initialization learners (MAML, Reptile)."""

    inner_lr: float = Field(0.01, gt=0)
    inner_steps: int = Field(1, ge=1)
    eval_inner_steps: int | None = Field(None, ge=1, description="inner steps at evaluation; default inner_steps")
    adapt_params: tuple[str, ...] | None = Field(
        None, min_length=1, description='ANIL: globs over parameter names the inner loop adapts (e.g. ["head.*"]); default all'
    )


class MAMLAlgorithm(GradientMetaLearner):
    """MAML (Finn et al. 2017); ``first_order: true`` drops the second-order terms; ``learn_inner_lr`` is Meta-SGD."""

    name: Literal["maml"] = "maml"
    first_order: bool = False
    learn_inner_lr: bool = Field(False, description="Meta-SGD: one learnable inner learning rate per parameter")
    batching: Literal["auto", "loop", "stacked", "vmap"] = Field(
        "auto", description="how tasks of a meta-batch are batched (see bench/throughput.py)"
    )
    task_chunk: int | None = Field(
        None, ge=1, description="tasks per stacked pass; default 8 for conv4 on a CPU, else the whole meta-batch"
    )
    inner_loss: Literal["sum_over_shots", "mean"] = Field(
        "sum_over_shots",
        description="inner-loop loss: each support example's loss / shots, summed (cbfinn/maml's xent: N x the mean"
        " for N-way classification; the mean for regression), or the mean",
    )
    checkpoint: bool = Field(False, description="recompute each inner step in backward (torch.utils.checkpoint): less memory")
    adapt_norm: bool = Field(
        False,
        description="adapt the BatchNorm parameters in the inner loop; false: meta-learned only (cbfinn/maml's batch_norm"
        " variables are not in its inner step's weights)",
    )

    @model_validator(mode="after")
    def _checkpoint_batching(self) -> MAMLAlgorithm:
        if self.checkpoint and self.batching == "vmap":
            raise ValueError("algorithm.checkpoint: true needs algorithm.batching loop, stacked or auto, not vmap")
        return self


class ReptileAlgorithm(GradientMetaLearner):
    """Reptile (Nichol et al. 2018): meta-gradient = theta - mean adapted theta."""

    name: Literal["reptile"] = "reptile"
    inner_optimizer: Literal["sgd", "adam"] = "sgd"
    train_shots: int | None = Field(
        None, ge=1,
        description="classification: meta-train each task on this many examples per class, taken from its support"
        " then query examples (openai's --train-shots); default the support set",
    )
    inner_batch: int | None = Field(
        None, ge=1,
        description="examples per inner step in meta-training, drawn as openai's mini-batches (shuffled, without"
        " replacement, reshuffled each pass); default all of them; evaluation adapts on the whole support set",
    )
    batching: Literal["auto", "loop", "stacked"] = Field(
        "auto", description="how tasks of a meta-batch are batched (auto: stacked on a GPU, else loop)"
    )
    inner_state: Literal["per_task", "carried"] = Field(
        "per_task",
        description="the inner Adam's moments and step count in meta-training: fresh for every task, or carried"
        " from task to task through each worker's tasks in order, across server steps (openai/supervised-reptile's)",
    )
    eval_state: Literal["fresh", "carried"] | None = Field(
        None,
        description="the inner Adam state every meta-test task (validation, test, evaluate, exports, serving) adapts"
        " from: a fresh one, or a copy of the state meta-training carried, worker slot 0's (openai's evaluate);"
        " test tasks never change it. Default: carried with inner_state carried, else fresh",
    )

    @model_validator(mode="after")
    def _carried_adam(self) -> ReptileAlgorithm:
        if self.inner_state == "carried" and self.inner_optimizer != "adam":
            raise ValueError(
                f"algorithm.inner_state: carried needs algorithm.inner_optimizer: adam (got {self.inner_optimizer!r}:"
                " SGD has no state to carry)"
            )
        if self.eval_state == "carried" and self.inner_state != "carried":
            raise ValueError(
                f"algorithm.eval_state: carried needs algorithm.inner_state: carried (got {self.inner_state!r}: no inner"
                " Adam state outlives a task to evaluate from)"
            )
        if self.inner_state == "carried" and self.batching == "stacked":
            raise ValueError(
                "algorithm.inner_state: carried adapts a worker's tasks one after the other; algorithm.batching"
                " must be auto or loop, not stacked"
            )
        return self


class L2LAlgorithm(AlgorithmSection):
    """The LSTM optimizer of Andrychowicz et al. 2016 (pipeline/algorithms/l2l.py)."""

    task_kinds: ClassVar[frozenset[Kind]] = frozenset({"optimizee"})
    networks: ClassVar[frozenset[str] | None] = frozenset({"mlp"})

    name: Literal["l2l"] = "l2l"
    hidden: int = Field(20, ge=1, description="LSTM hidden units per layer")
    layers: int = Field(2, ge=1)
    unroll: int = Field(100, ge=1, description="optimizee steps T per trajectory")
    truncation: int = Field(20, ge=1, description="truncated BPTT every this many steps")
    update_per: Literal["truncation", "trajectory"] = Field(
        "truncation",
        description="one server step per truncation, the optimizees carried on to the next (the paper's and"
        " deepmind/learning-to-learn's; train.steps counts truncations), or per whole trajectory (the sum of its"
        " truncations' gradients)",
    )
    output_scale: float = Field(0.1, gt=0)
    preprocess_p: float = Field(10.0, gt=0)
    checkpoint: bool = Field(False, description="recompute each LSTM update in backward (less memory)")


class MetaLSTMAlgorithm(AlgorithmSection):
    """The Meta-learner LSTM of Ravi & Larochelle 2017 (pipeline/algorithms/meta_lstm.py)."""

    task_kinds: ClassVar[frozenset[Kind]] = frozenset({"classification"})
    networks: ClassVar[frozenset[str] | None] = frozenset({"conv4", "resnet12", "module"})

    name: Literal["meta_lstm"] = "meta_lstm"
    inner_steps: int = Field(12, ge=1, description="learner updates per episode (paper: 12 for 1-shot, 8 for 5-shot)")
    eval_inner_steps: int | None = Field(None, ge=1, description="updates at evaluation; default inner_steps")
    hidden: int = Field(20, ge=1, description="hidden units of the first (plain) LSTM layer")
    preprocess_p: float = Field(10.0, gt=0)
    forget_bias: tuple[float, float] = Field((4.0, 6.0), description="uniform range of the initial forget-gate bias")
    input_bias: tuple[float, float] = Field((-5.0, -4.0), description="uniform range of the initial input-gate bias")
    gate_input: Literal["pre_sigmoid", "post_sigmoid"] = Field(
        "pre_sigmoid", description="previous gate fed back: before the sigmoid (authors' code) or after (the paper)"
    )
    grad_over_batch: bool = Field(
        True, description="divide the learner's mean-loss gradient by the support size again (authors' code)"
    )
    eval_norm: Literal["running", "batch"] = Field(
        "running", description="meta-test queries: running BatchNorm statistics of the support passes, or their own batch"
    )
    norm_momentum: float = Field(0.9, gt=0, le=1, description="running-statistics momentum (weight of the new batch)")

    def model_problem(self, model: ModelSection) -> str | None:
        """``eval_norm: running`` takes the statistics of the hand-written Conv4's BatchNorm, and says itself how queries are normalized."""
        if self.eval_norm != "running":
            return None
        if model.network != "conv4":
            return (
                f"algorithm.eval_norm: running needs model.network conv4 (running statistics of its hand-written"
                f" BatchNorm), got model.network {model.network!r}; set algorithm.eval_norm: batch"
            )
        if getattr(model, "norm", None) == "support":
            return (
                "algorithm.eval_norm: running normalizes meta-test queries with running statistics, so model.norm:"
                " support does not apply; set model.norm: transductive, or algorithm.eval_norm: batch"
            )
        return None

    @model_validator(mode="after")
    def _ranges(self) -> MetaLSTMAlgorithm:
        for key in ("forget_bias", "input_bias"):
            low, high = getattr(self, key)
            if low > high:
                raise ValueError(f"algorithm.{key}: low must not exceed high, got {[low, high]}")
        return self


class MetaNetAlgorithm(AlgorithmSection):
    """Meta Networks of Munkhdalai & Yu 2017 (pipeline/algorithms/metanet.py); defaults follow the paper's Omniglot setup.

    It builds its own conv networks (the fields below): the ``model`` section is not used.
    """

    task_kinds: ClassVar[frozenset[Kind]] = frozenset({"classification"})
    networks: ClassVar[frozenset[str] | None] = None
    needs_images: ClassVar[bool] = True

    name: Literal["metanet"] = "metanet"
    conv_layers: int = Field(5, ge=1, description="3x3 conv + 2x2 max-pool blocks per trunk (b and u)")
    filters: int = Field(64, ge=1)
    hidden: int = Field(64, ge=1, description="width of the base learner's augmented hidden layer")
    representation: int = Field(64, ge=1, description="width of the representation r (u's augmented layer)")
    generator_hidden: int = Field(20, ge=1, description="hidden units of the generators d (LSTM) and m (MLP)")
    rep_steps: int = Field(5, ge=1, description="T: support chunks whose representation-loss gradients d reads")
    preprocess_p: float = Field(7.0, gt=0, description="gradient preprocessing p (the authors' logAndSign k=7)")
    attention_scale: float = Field(1.0, gt=0, description="multiplies the cosines before the attention softmax")
    contrastive_margin: float = Field(1.0, gt=0, description="margin of the several-shot representation loss")
    fast_layers: Literal["all", "last"] = Field(
        "all", description="fast weights on every conv and fc layer (authors' code) or on the last layers only"
    )
    norm: Literal["none", "group"] = Field("none", description="trunk normalization: none (authors' code) or GroupNorm")
    shuffle_support: bool = Field(True, description="shuffle each support set in training (authors' episode generator)")
    task_chunk: int | None = Field(
        None, ge=1, description="episodes per backward pass (gradients summed): the same gradient, less memory;"
        " default 1 on a CPU (a seventh of the memory at the same training speed there), the whole meta-batch on a GPU"
    )


class ProtoNetAlgorithm(AlgorithmSection):
    """Prototypical Networks (Snell et al. 2017; pipeline/algorithms/protonet.py): no inner loop, no hyperparameters.

    The embedding is ``model``'s Conv4 without its head; the authors' Omniglot encoder is
    ``downsample: maxpool`` with 64 filters (configs/omniglot_protonet_5w1s.yaml).
    """

    task_kinds: ClassVar[frozenset[Kind]] = frozenset({"classification"})
    networks: ClassVar[frozenset[str] | None] = frozenset({"conv4"})

    name: Literal["protonet"] = "protonet"


ALGORITHMS = {
    "maml": MAMLAlgorithm,
    "reptile": ReptileAlgorithm,
    "l2l": L2LAlgorithm,
    "meta_lstm": MetaLSTMAlgorithm,
    "metanet": MetaNetAlgorithm,
    "protonet": ProtoNetAlgorithm,
}
"""``algorithm.name`` -> its section; the builders are in pipeline/build.py."""

AlgorithmConfig = Annotated[Union[tuple(Annotated[a, Tag(n)] for n, a in ALGORITHMS.items())], tag_or("name", "maml")]  # noqa: UP007


class OptimizerConfig(Strict):
    """The parameter server's optimizer on the meta-parameters: Adam, or SGD (Reptile's outer step, openai/supervised-reptile)."""

    name: Literal["adam", "sgd"] = Field("adam", description="sgd: theta - lr * grad; with Reptile, theta + lr * (mean phi - theta)")
    lr: float = Field(0.001, gt=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam only")
    eps: float = Field(1e-8, gt=0, description="adam only")
    clip_norm: float | None = Field(None, gt=0, description="clip the global gradient norm")
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    lr_final: float = Field(0.0, ge=0, description="linear: the rate reached at train.steps (openai's meta_step_size_final)")

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
    gpus_per_worker: float = Field(
        1.0, ge=0, description="GPU (or share of one) each worker reserves and computes on where the cluster has GPUs; 0: CPU"
    )
    mode: Literal["sync", "async"] = "sync"
    max_staleness: int = Field(2, ge=0, description="async: pushes older than this many versions are rejected")
    val_every: int = Field(100, ge=1)
    val_episodes: int = Field(100, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    test_episodes: int = Field(600, ge=1)
    log_every: int = Field(10, ge=1)
    max_bad_grads: int = Field(10, ge=1, description="stop after this many non-finite gradients in a row")
    dtype: Literal["float32", "float64", "bfloat16"] = Field(
        "float32", description="workers' compute; bfloat16: autocast over float32 parameters (the server's stay float32)"
    )
    cpus_per_worker: float | None = Field(None, gt=0, description="default: an equal share of the cluster's CPUs")
    resources_per_worker: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict, description="custom Ray resources, e.g. {node_slot: 1}")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy of the server and the workers"
    )
    placement_timeout_s: float = Field(300.0, gt=0, description="how long to wait for the cluster to place every worker")
    call_timeout_s: float = Field(
        600.0, gt=0, description="a worker call (a step, an evaluation share) running longer is taken for hung: it is replaced"
    )

    @model_validator(mode="after")
    def _one_gpu_per_worker(self) -> TrainConfig:
        if 0 < self.gpus_per_worker < 1e-4:
            raise ValueError(
                f"train.gpus_per_worker: Ray reserves GPUs in steps of 0.0001, got {self.gpus_per_worker:g}; use 0 (CPU) or more"
            )
        if self.gpus_per_worker > 1:
            raise ValueError(
                f"train.gpus_per_worker: a worker computes on one GPU, so more than 1 would reserve GPUs it leaves idle"
                f" (got {self.gpus_per_worker:g}); use more train.workers, or a fraction (0.25: four workers per GPU)"
            )
        return self

    @property
    def param_dtype(self) -> str:
        """The workers' parameter and episode dtype: float64, else float32 (bfloat16 is autocast over float32)."""
        return "float64" if self.dtype == "float64" else "float32"


class TrackingConfig(Strict):
    """MLflow: embedded SQLite by default, a server URI in production."""

    uri: str | None = Field(None, description="default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = "metapipe"
    outage_timeout_s: float = Field(3600.0, gt=0, description="how long the run's end waits for an unreachable MLflow to return")
    system_metrics_s: float | None = Field(
        10.0, gt=0, description="seconds between samples of each node's CPU, memory and GPU use (system/*); null: none"
    )


class RunConfig(EpisodeConfig):
    """A whole run: the episode store plus model, algorithm, optimizer, training and tracking."""

    name: str = "metapipe"
    description: str | None = Field(
        None, max_length=200, description="one line saying what the run is (``python -m pipeline configs`` lists it)"
    )
    seed: int = Field(0, ge=0, lt=2**63, description="seeds parameters and the run (torch and numpy take it)")
    model: ModelConfig = Field(default_factory=MLPModel)
    algorithm: AlgorithmConfig = Field(default_factory=MAMLAlgorithm)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_network(cls, raw: Any) -> Any:
        """A run that leaves ``model.network`` out gets the network its task's inputs call for: conv4 for images, else mlp."""
        if not (isinstance(raw, dict) and isinstance(raw.get("task"), dict) and isinstance(raw.get("model", {}), dict)):
            return raw
        model = raw.get("model", {})
        if "network" not in model and isinstance(FAMILIES.get(raw["task"].get("name")), ImageFamily):
            return {**raw, "model": {"network": "conv4", **model}}
        return raw

    @field_validator("description")
    @classmethod
    def _one_line(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or "\n" in value.strip()):
            raise ValueError("must be one non-empty line")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        """Every cross-section rule, in one place: what passes here builds and runs."""
        if self.train.meta_batch < self.train.workers:
            raise ValueError(
                f"train.meta_batch ({self.train.meta_batch}) must be at least train.workers ({self.train.workers})"
            )
        groups = self.store.train_row_groups()
        if groups < self.train.workers:
            raise ValueError(
                f"train.workers ({self.train.workers}): the store's {self.store.train_episodes} training episodes make"
                f" {groups} row groups of at most 1000, one per worker at most; raise store.train_episodes"
            )
        for split in ("val", "test"):
            if getattr(self.store, f"{split}_episodes") < 1:
                raise ValueError(f"store.{split}_episodes: a run validates and tests on its store's {split} split; needs at least 1, got 0")
        problem = incompatibility(self.task, self.model, self.algorithm) or network_problem(self)
        if problem:
            raise ValueError(problem)
        return self

    @property
    def task_spec(self) -> TaskSpec:
        """What the task family declares about ``task`` (kind, input shape, outputs, loss)."""
        return spec(self.task)


def incompatibility(task: Any, model: ModelSection, algorithm: AlgorithmSection) -> str | None:
    """Why ``task``, ``model`` and ``algorithm`` cannot run together, naming the key; None when they can.

    Reads only what each section declares: the task family's ``TaskSpec``, the model's
    ``inputs`` and the algorithm's ``task_kinds``, ``networks``, ``needs_images`` and ``model_problem``.
    """
    task_spec = spec(task)
    shape = "x".join(map(str, task_spec.input_shape))
    task_name = repr(task_spec.family)
    if task_spec.kind not in algorithm.task_kinds:
        kinds = " or ".join(sorted(algorithm.task_kinds))
        return f"algorithm.name: {algorithm.name} meta-learns {kinds} tasks; task.name={task_name} is {task_spec.kind}"
    if algorithm.needs_images and not task_spec.is_image:
        return f"algorithm.name: {algorithm.name} needs an image task; task.name={task_name} has inputs of shape {shape}"
    train_shots = getattr(algorithm, "train_shots", None)
    if train_shots is not None:
        if task_spec.kind != "classification":
            return f"algorithm.train_shots: {algorithm.name} takes training shots per class from classification tasks; task.name={task_name} is {task_spec.kind}"
        available = task.shots + task.queries
        if train_shots > available:
            return f"algorithm.train_shots: {train_shots} is more than the task's shots + queries = {available} examples per class"
    if algorithm.networks is None:
        return None
    if model.network not in algorithm.networks:
        return f"model.network: {algorithm.name} trains {' or '.join(sorted(algorithm.networks))}, got {model.network!r}"
    if model.inputs == "image" and not task_spec.is_image:
        return f"model.network: {model.network} needs image inputs [C, H, W]; task.name={task_name} has inputs of shape {shape}"
    if model.inputs == "image" and task_spec.input_shape[1] < model.min_image_size:
        size = model.min_image_size
        return f"task.image_size: this model.network needs images of at least {size}x{size}, got {task_spec.input_shape[1]}"
    if model.inputs == "flat" and not task_spec.is_flat and task_spec.kind != "optimizee":
        return f"model.network: {model.network} needs flat inputs; task.name={task_name} has inputs of shape {shape} (use conv4)"
    problem = algorithm.model_problem(model)
    if problem:
        return problem
    if isinstance(model, MLPModel) and model.activation == "sigmoid" and not isinstance(algorithm, L2LAlgorithm):
        return f"model.activation: sigmoid is used only by l2l's MLP optimizee; {algorithm.name} networks use relu"
    return None


def network_problem(config: RunConfig) -> str | None:
    """What only the built network can tell, naming the key; None when fine.

    A ``module`` network must map two examples of the task's input shape to ``[2, outputs]``;
    every glob of ``algorithm.adapt_params`` must match a parameter name, and one not of
    BatchNorm when ``algorithm.adapt_norm`` is false.
    """
    patterns = getattr(config.algorithm, "adapt_params", None)
    if config.algorithm.networks is None or not (patterns or isinstance(config.model, ModuleModel)):
        return None
    import torch  # imported here, as the algorithms and the builders (they import this module)

    from pipeline.algorithms.maml import adapted_names, unmatched_patterns

    network = config.model.build(config.task_spec)
    if isinstance(config.model, ModuleModel):
        task = config.task_spec
        params = network.init(0)
        try:
            with torch.no_grad():
                shape = tuple(network.apply(params, torch.zeros(2, *task.input_shape)).shape)
        except Exception as e:  # noqa: BLE001 - the user's forward: any failure is reported as this factory's
            return f"model.factory: {config.model.factory!r} fails on a batch of shape {[2, *task.input_shape]}: {type(e).__name__}: {e}"
        if shape != (2, task.outputs):
            return (
                f"model.factory: {config.model.factory!r} maps inputs {[2, *task.input_shape]} to {list(shape)};"
                f" task.name={task.family!r} needs [2, {task.outputs}]"
            )
    if not patterns:
        return None
    names = list(network.init(0))
    unmatched = unmatched_patterns(names, patterns)
    if unmatched:
        return (
            f"algorithm.adapt_params: {', '.join(map(repr, unmatched))} match no parameter of model.network"
            f" {config.model.network} (its parameters: {', '.join(names)})"
        )
    if not getattr(config.algorithm, "adapt_norm", True) and set(adapted_names(names, patterns)) <= network.batch_norm_names():
        return (
            f"algorithm.adapt_params: {list(patterns)} match only BatchNorm parameters, and algorithm.adapt_norm: false"
            " keeps those out of the inner loop: nothing would adapt; set algorithm.adapt_norm: true or widen adapt_params"
        )
    return None


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


UNION_TAGS = {"task": set(FAMILIES), "model": set(MODELS), "algorithm": set(ALGORITHMS)}
"""Sections that are unions, and their tags (pydantic puts the tag in an error's location)."""


def key_path(loc: tuple[Any, ...]) -> str:
    """The dotted key of a pydantic error location, without the union tag (``task.omniglot.ways`` -> ``task.ways``)."""
    parts = list(loc)
    if len(parts) > 1 and parts[1] in UNION_TAGS.get(str(parts[0]), ()):
        del parts[1]
    return ".".join(str(p) for p in parts)


def _format_errors(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in error.errors():
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        msg = e["msg"].removeprefix("Value error, ")
        key = key_path(e["loc"])
        named = not key or msg.startswith(key)  # the rules of a section or of the run name their own keys
        lines.append(f"  {msg}{shown}" if named else f"  {key}: {msg}{shown}")
    return "\n".join(lines)


def validate(raw: dict[str, Any], source: str = "<dict>") -> RunConfig:
    """Validate a raw mapping into a frozen RunConfig, or raise ConfigError naming each bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: expected a YAML mapping at the top, got {type(raw).__name__}")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def read_with_bases(path: Path, chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], list[Path]]:
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
    merged, bases = read_with_bases(base, (*chain, path))

    def merge(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
        out = dict(low)
        for key, value in high.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    return merge(merged, raw), [base, *bases]


def _read(path: str | Path, overrides: list[str] | None) -> tuple[dict[str, Any], str]:
    """The file with its bases merged and ``--set`` overrides applied, and how errors name its source."""
    path = Path(path)
    raw, bases = read_with_bases(path)
    source = f"{path} (with base {', '.join(str(b) for b in bases)})" if bases else str(path)
    return apply_overrides(raw, overrides or []), source


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config and its ``base:`` files, apply ``--set`` overrides and validate it."""
    return validate(*_read(path, overrides))


def load_episode_config(path: str | Path, overrides: list[str] | None = None) -> EpisodeConfig:
    """Read a config for the episode store alone: a task base (``configs/tasks/*.yaml``) or a whole run config.

    A file with only ``task`` and ``store`` sections is validated as such; any other
    file is validated as a run config (every section and rule), whose episode part is
    what the store needs. Raises ConfigError naming the file, key and value.
    """
    raw, source = _read(path, overrides)
    if set(raw) - {"task", "store"}:
        return validate(raw, source)
    try:
        return EpisodeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
