"""The registry builds each algorithm from the papers' configs in configs/."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.algorithms.maml import MAML
from pipeline.algorithms.reptile import Reptile
from pipeline.build import build_learner
from pipeline.config import load_config
from pipeline.nets.networks import MLP, Conv4

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALGORITHM_CONFIGS = {
    "sinusoid_maml.yaml": ("sinusoid.yaml", MAML, MLP),
    "sinusoid_reptile.yaml": ("sinusoid.yaml", Reptile, MLP),
    "omniglot_maml_5w1s.yaml": ("omniglot_5w1s.yaml", MAML, Conv4),
    "omniglot_fomaml_5w1s.yaml": ("omniglot_5w1s.yaml", MAML, Conv4),
    "omniglot_maml_20w1s.yaml": ("omniglot_20w1s.yaml", MAML, Conv4),
    "miniimagenet_maml_5w1s.yaml": (None, MAML, Conv4),
}


@pytest.mark.parametrize("name", list(ALGORITHM_CONFIGS))
def test_config_validates_and_builds_its_learner(name):
    store_config, algorithm, network = ALGORITHM_CONFIGS[name]
    config = load_config(CONFIGS / name)
    learner = build_learner(config)
    assert isinstance(learner, algorithm) and isinstance(learner.network, network)
    if store_config is not None:
        # the same task and store sections as the store's own config, so precomputed episodes are shared
        shared = load_config(CONFIGS / store_config)
        assert config.task == shared.task and config.store == shared.store


def test_paper_settings():
    omniglot = build_learner(load_config(CONFIGS / "omniglot_maml_5w1s.yaml"))
    assert (omniglot.inner_lr, omniglot.inner_steps, omniglot.eval_inner_steps) == (0.4, 1, 3)
    assert not omniglot.first_order and omniglot.network == Conv4(1, 28, 5, 64, "stride")
    assert build_learner(load_config(CONFIGS / "omniglot_fomaml_5w1s.yaml")).first_order
    mini = build_learner(load_config(CONFIGS / "miniimagenet_maml_5w1s.yaml"))
    assert mini.network == Conv4(3, 84, 5, 32, "maxpool") and (mini.inner_steps, mini.eval_inner_steps) == (5, 10)
    sine = load_config(CONFIGS / "sinusoid_maml.yaml")
    assert (sine.algorithm.inner_lr, sine.train.meta_batch, sine.task.shots) == (0.01, 25, 10)
    assert build_learner(sine).loss == "mse"


def test_overrides_reach_the_learner():
    config = load_config(CONFIGS / "omniglot_maml_5w1s.yaml", ["algorithm.inner_lr=0.1", "algorithm.batching=loop"])
    learner = build_learner(config)
    assert learner.inner_lr == 0.1 and learner.batching == "loop"
    with pytest.raises(ValueError, match="vmap"):
        build_learner(load_config(CONFIGS / "sinusoid_reptile.yaml", ["algorithm.batching=vmap"]))
