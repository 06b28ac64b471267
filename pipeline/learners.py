"""Build the meta-learner a run config names; the only place that maps names to algorithms."""
from __future__ import annotations

import importlib

from pipeline.config import RunConfig
from pipeline.types import MetaLearner

_MODULES = {
    "maml": "pipeline.maml",
    "reptile": "pipeline.reptile",
    "l2l": "pipeline.lstm_optimizer",
    "meta_lstm": "pipeline.meta_lstm",
    "metanet": "pipeline.metanet",
}


def build_learner(config: RunConfig) -> MetaLearner:
    """The meta-learner of ``config.algorithm`` for ``config.task`` and ``config.model``.

    Each algorithm module exposes ``from_config(config) -> MetaLearner``.
    """
    module = importlib.import_module(_MODULES[config.algorithm.name])
    return module.from_config(config)
