"""Build the meta-learner a run config names; the only place that maps names to algorithms."""
from __future__ import annotations

import importlib

from pipeline.config import RunConfig
from pipeline.types import MetaLearner

_MODULES = {
    "maml": "pipeline.algorithms.maml",
    "reptile": "pipeline.algorithms.reptile",
    "l2l": "pipeline.algorithms.l2l",
    "meta_lstm": "pipeline.algorithms.meta_lstm",
    "metanet": "pipeline.algorithms.metanet",
}


def build_learner(config: RunConfig) -> MetaLearner:
    """The meta-learner of ``config.algorithm`` for ``config.task`` and ``config.model``.

    Each algorithm module exposes ``from_config(config) -> MetaLearner``.
    """
    module = importlib.import_module(_MODULES[config.algorithm.name])
    return module.from_config(config)
