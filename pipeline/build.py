"""The plug-in registry of the pipeline's algorithms: ``algorithm.name`` -> meta-learner.

The one place that maps algorithm names to code (networks are built by their config
sections, ``ModelSection.build`` in pipeline/config.py; task families have their
registry in tasks/families/__init__.py). A builder reads its config section and the task's
``TaskSpec`` (what the task family declares: kind, input shape, outputs, loss),
never the task's name, so any family with the right spec serves any network and
algorithm that accepts it. Which combinations can run is decided before any work,
by ``pipeline.config.incompatibility``; a config that validates always builds.

Adding an algorithm: its module (pipeline/algorithms/), its config section in
pipeline/config.py (``ALGORITHMS``), and one builder entry here. Adding a network:
its module (pipeline/nets/) and its config section in ``MODELS``, with a ``build`` method.
"""
from __future__ import annotations

from typing import Callable

import torch

from pipeline.algorithms.l2l import (
    L2L,
    MLPClassifier,
    Optimizee,
    Quadratic,
    TruncatedL2L,
)
from pipeline.algorithms.maml import MAML, Network
from pipeline.algorithms.meta_lstm import MetaLSTM
from pipeline.algorithms.metanet import MetaNet
from pipeline.algorithms.protonet import ProtoNet
from pipeline.algorithms.reptile import CarriedReptile, Reptile
from pipeline.config import (
    L2LAlgorithm,
    MAMLAlgorithm,
    MetaLSTMAlgorithm,
    MetaNetAlgorithm,
    MLPModel,
    ReptileAlgorithm,
    RunConfig,
)
from pipeline.types import MetaLearner
from tasks.family import TaskSpec


def build_network(config: RunConfig) -> Network:
    """The network of ``config.model`` sized for ``config.task`` (its input shape and outputs)."""
    return config.model.build(config.task_spec)


def _dtype(config: RunConfig) -> torch.dtype:
    return getattr(torch, config.train.param_dtype)  # bfloat16 is the workers' autocast over float32 parameters


def _maml(config: RunConfig) -> MAML:
    algo: MAMLAlgorithm = config.algorithm
    return MAML(
        network=build_network(config),
        loss=config.task_spec.loss,
        inner_lr=algo.inner_lr,
        inner_steps=algo.inner_steps,
        eval_inner_steps=algo.eval_inner_steps,
        first_order=algo.first_order,
        learn_inner_lr=algo.learn_inner_lr,
        batching=algo.batching,
        task_chunk=algo.task_chunk,
        inner_loss_scale=inner_loss_scale(algo, config.task_spec),
        adapt_params=algo.adapt_params,
        checkpoint=algo.checkpoint,
        adapt_norm=algo.adapt_norm,
    )


def inner_loss_scale(algo: MAMLAlgorithm, task: TaskSpec) -> float:
    """What ``algorithm.inner_loss`` multiplies the mean support loss by: ``ways`` for ``sum_over_shots`` on
    N-way classification (cbfinn/maml's inner gradient), else 1 (its regression loss is the mean)."""
    return float(task.outputs) if algo.inner_loss == "sum_over_shots" and task.loss == "cross_entropy" else 1.0


def _reptile(config: RunConfig) -> Reptile:
    algo: ReptileAlgorithm = config.algorithm
    settings = {
        "network": build_network(config),
        "loss": config.task_spec.loss,
        "inner_lr": algo.inner_lr,
        "inner_steps": algo.inner_steps,
        "eval_inner_steps": algo.eval_inner_steps,
        "inner_optimizer": algo.inner_optimizer,
        "batching": algo.batching,
        "train_shots": algo.train_shots,
        "inner_batch": algo.inner_batch,
        "adapt_params": algo.adapt_params,
    }
    if algo.inner_state == "carried":  # meta-test from the carried state (openai's) unless eval_state says fresh
        return CarriedReptile(**settings, eval_state=algo.eval_state or "carried")
    return Reptile(**settings)


def optimizee(config: RunConfig) -> Optimizee:
    """What L2L optimizes: a quadratic, or the ``model`` MLP classifying the task's flat inputs."""
    task = config.task_spec
    if task.loss == "quadratic":
        return Quadratic()
    model: MLPModel = config.model
    return MLPClassifier(task.input_shape[0], task.outputs, tuple(model.hidden), model.activation, task.batch_size)


def _l2l(config: RunConfig) -> L2L:
    algo: L2LAlgorithm = config.algorithm
    return (TruncatedL2L if algo.update_per == "truncation" else L2L)(
        optimizee=optimizee(config),
        hidden=algo.hidden,
        layers=algo.layers,
        unroll=algo.unroll,
        truncation=algo.truncation,
        output_scale=algo.output_scale,
        preprocess_p=algo.preprocess_p,
        checkpoint=algo.checkpoint,
        dtype=_dtype(config),
    )


def _meta_lstm(config: RunConfig) -> MetaLSTM:
    algo: MetaLSTMAlgorithm = config.algorithm
    return MetaLSTM(
        network=build_network(config),
        inner_steps=algo.inner_steps,
        eval_inner_steps=algo.eval_inner_steps,
        hidden=algo.hidden,
        preprocess_p=algo.preprocess_p,
        forget_bias=tuple(algo.forget_bias),
        input_bias=tuple(algo.input_bias),
        gate_input=algo.gate_input,
        grad_over_batch=algo.grad_over_batch,
        eval_norm=algo.eval_norm,
        norm_momentum=algo.norm_momentum,
        dtype=_dtype(config),
    )


def _metanet(config: RunConfig) -> MetaNet:
    algo: MetaNetAlgorithm = config.algorithm
    channels, size, _ = config.task_spec.input_shape
    return MetaNet(
        ways=config.task_spec.outputs,
        in_channels=channels,
        image_size=size,
        conv_layers=algo.conv_layers,
        filters=algo.filters,
        hidden=algo.hidden,
        representation=algo.representation,
        generator_hidden=algo.generator_hidden,
        rep_steps=algo.rep_steps,
        preprocess_p=algo.preprocess_p,
        attention_scale=algo.attention_scale,
        contrastive_margin=algo.contrastive_margin,
        fast_layers=algo.fast_layers,
        norm=algo.norm,
        shuffle_support=algo.shuffle_support,
        task_chunk=algo.task_chunk,
        seed=config.seed,
        dtype=_dtype(config),
    )


def _protonet(config: RunConfig) -> ProtoNet:
    return ProtoNet(network=build_network(config), ways=config.task_spec.outputs)


ALGORITHMS: dict[str, Callable[[RunConfig], MetaLearner]] = {
    "maml": _maml,
    "reptile": _reptile,
    "l2l": _l2l,
    "meta_lstm": _meta_lstm,
    "metanet": _metanet,
    "protonet": _protonet,
}
"""``algorithm.name`` -> builder ``(run config) -> meta-learner``."""


def build_learner(config: RunConfig) -> MetaLearner:
    """The meta-learner of ``config.algorithm`` for ``config.task`` and ``config.model``.

    ``config`` must be validated (``pipeline.config.validate``): then every builder succeeds.
    """
    return ALGORITHMS[config.algorithm.name](config)
