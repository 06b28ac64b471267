"""Validated means runnable: every config over the registries' unions that ``validate()`` accepts builds its
learner and computes a meta-gradient on an episode of its task's shape; every one it refuses is a ConfigError.

Hypothesis draws task x model x algorithm sections (each from its own registry) with small sizes, including
combinations that cannot run (an MLP on images, MetaNet on sinusoids, Reptile with vmap or Meta-SGD rates).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.build import build_learner
from pipeline.config import ALGORITHMS, MODELS, RunConfig, validate
from pipeline.errors import ConfigError
from pipeline.types import Truncated
from tasks.distribution import TaskDistribution
from tasks.episodes import Episodes
from tasks.families import FAMILIES, family
from tasks.family import ImageFamily
from tasks.fewshot import labels

small = st.integers(1, 3)
TASKS = {
    "sinusoid": st.fixed_dictionaries({"shots": small, "queries": small}),
    "quadratic": st.fixed_dictionaries({"dim": small}),
    "omniglot": st.fixed_dictionaries(
        {"ways": st.integers(2, 3), "shots": small, "queries": small, "image_size": st.sampled_from([8, 12, 16]),
         "rotations": st.booleans()}
    ),
    "miniimagenet": st.fixed_dictionaries(
        {"ways": st.integers(2, 3), "shots": small, "queries": small, "image_size": st.sampled_from([8, 16])}
    ),
    "digits": st.fixed_dictionaries({"shots": st.integers(4, 12), "queries": small, "batch_size": st.integers(2, 4)}),
    "image_folder": st.fixed_dictionaries(
        {"root": st.just("data"), "ways": st.integers(2, 3), "shots": small, "queries": small,
         "image_size": st.sampled_from([8, 16]), "mode": st.sampled_from(["L", "RGB"])}
    ),
}
NETWORKS = {
    "mlp": st.fixed_dictionaries(
        {"hidden": st.lists(st.integers(-1, 4), min_size=1, max_size=2), "activation": st.sampled_from(["relu", "sigmoid"])}
    ),
    "conv4": st.fixed_dictionaries(
        {"filters": st.integers(2, 3), "downsample": st.sampled_from(["stride", "maxpool"]),
         "norm": st.sampled_from(["transductive", "support"])}
    ),
    "resnet12": st.fixed_dictionaries({"widths": st.just([2, 2, 2, 2]), "norm": st.sampled_from(["transductive", "support"])}),
    "module": st.fixed_dictionaries(
        {"factory": st.just("tests.pipeline.nets.user_module:ResidualGroupNormNet"),
         "kwargs": st.fixed_dictionaries({"in_channels": st.just(1), "ways": st.integers(2, 3), "width": st.just(2),
                                          "groups": st.just(1)})}
    ),
}
ALGORITHM_FIELDS = {
    "maml": st.fixed_dictionaries(
        {"inner_steps": small, "first_order": st.booleans(), "learn_inner_lr": st.booleans(),
         "batching": st.sampled_from(["auto", "loop", "stacked", "vmap"])}
    ),
    "reptile": st.fixed_dictionaries(
        {"inner_steps": small, "inner_optimizer": st.sampled_from(["sgd", "adam"]),
         "batching": st.sampled_from(["auto", "loop", "stacked", "vmap"])},
        optional={"learn_inner_lr": st.booleans(), "inner_state": st.sampled_from(["per_task", "carried"]),
                  "eval_state": st.sampled_from(["fresh", "carried"])},
    ),
    "l2l": st.fixed_dictionaries(
        {"hidden": st.integers(2, 3), "layers": st.integers(1, 2), "unroll": small, "truncation": small,
         "update_per": st.sampled_from(["truncation", "trajectory"])}
    ),
    "meta_lstm": st.fixed_dictionaries({"inner_steps": small, "hidden": st.integers(2, 3)}),
    "protonet": st.fixed_dictionaries({}),
    "metanet": st.fixed_dictionaries(
        {"conv_layers": st.integers(1, 2), "filters": st.integers(2, 3), "hidden": st.integers(2, 3),
         "representation": st.integers(2, 3), "generator_hidden": st.integers(2, 3), "rep_steps": st.integers(1, 2)}
    ),
}


def test_the_strategies_cover_every_registry_entry():
    assert set(TASKS) == set(FAMILIES) and set(NETWORKS) == set(MODELS) and set(ALGORITHM_FIELDS) == set(ALGORITHMS)


def section(key: str, options: dict) -> st.SearchStrategy[dict]:
    return st.sampled_from(sorted(options)).flatmap(lambda name: options[name].map(lambda fields: {key: name, **fields}))


RAW = st.fixed_dictionaries(
    {
        "task": section("name", TASKS),
        "model": section("network", NETWORKS),
        "algorithm": section("name", ALGORITHM_FIELDS),
        "train": st.fixed_dictionaries({"meta_batch": st.just(2), "dtype": st.just("float64")}),
    }
)


def episodes(config: RunConfig) -> Episodes:
    """Two episodes of the task's shape: sampled by the family itself, or random images for image families."""
    task = config.task
    if not isinstance(family(task), ImageFamily):
        return TaskDistribution.load(task).episodes("train", np.random.default_rng(0), 2)
    gen = torch.Generator().manual_seed(0)
    shape = config.task_spec.input_shape
    return Episodes(
        torch.rand(2, task.ways * task.shots, *shape, generator=gen),
        labels(2, task.ways, task.shots),
        torch.rand(2, task.ways * task.queries, *shape, generator=gen),
        labels(2, task.ways, task.queries),
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RAW)
def test_a_config_validate_accepts_builds_and_computes_a_meta_gradient(raw):
    try:
        config = validate({**raw, "store": {"path": "unused"}})
    except ConfigError as e:
        assert str(e).startswith("invalid config") and ".name." not in str(e).split("\n", 1)[1].split(":")[0]
        return
    learner = build_learner(config)
    params = {k: v.double().requires_grad_() for k, v in learner.init(config.seed).items()}  # as the worker does
    batch = episodes(config).to("cpu", torch.float64)
    if isinstance(learner, Truncated):  # one step per truncation: the worker's call
        grads, metrics, _ = learner.truncation_grad(params, batch, learner.begin(batch))
    else:
        grads, metrics = learner.meta_grad(params, batch)
    assert grads.keys() == params.keys() and all(g.shape == params[k].shape for k, g in grads.items())
    assert all(math.isfinite(float(v)) for v in metrics.values())


@given(RAW)
@settings(max_examples=60, deadline=None)
def test_error_keys_never_show_union_tags(raw):
    raw["task"]["ways"] = -1  # wrong for every family: an unknown key or a bound broken, under the task's name tag
    try:
        validate({**raw, "store": {"path": "unused"}})
    except ConfigError as e:
        first = str(e).split("\n")[1].strip()
        assert first.startswith("task.ways:"), first
