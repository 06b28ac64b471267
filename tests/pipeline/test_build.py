"""The registry builds each algorithm from the papers' configs in configs/."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.algorithms.maml import MAML
from pipeline.algorithms.protonet import ProtoNet
from pipeline.algorithms.reptile import CarriedReptile, Reptile
from pipeline.build import build_learner, build_network
from pipeline.config import load_config, load_episode_config, validate
from pipeline.nets.conv4 import Conv4
from pipeline.nets.mlp import MLP

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ALGORITHM_CONFIGS = {
    "sinusoid_maml.yaml": ("sinusoid.yaml", MAML, MLP),
    "sinusoid_reptile.yaml": ("sinusoid.yaml", Reptile, MLP),
    "omniglot_maml_5w1s.yaml": ("omniglot-5w1s.yaml", MAML, Conv4),
    "omniglot_fomaml_5w1s.yaml": ("omniglot-5w1s.yaml", MAML, Conv4),
    "omniglot_maml_5w5s.yaml": ("omniglot-5w5s.yaml", MAML, Conv4),
    "omniglot_maml_20w1s.yaml": ("omniglot-20w1s.yaml", MAML, Conv4),
    "miniimagenet_maml_5w1s.yaml": ("miniimagenet-5w1s-240k.yaml", MAML, Conv4),
    "omniglot_protonet_5w1s.yaml": ("omniglot-5w1s.yaml", ProtoNet, Conv4),
    "omniglot_reptile_5w1s.yaml": ("omniglot-5w1s.yaml", Reptile, Conv4),
}


@pytest.mark.parametrize("name", list(ALGORITHM_CONFIGS))
def test_config_validates_and_builds_its_learner(name):
    store_config, algorithm, network = ALGORITHM_CONFIGS[name]
    config = load_config(CONFIGS / name)
    learner = build_learner(config)
    assert isinstance(learner, algorithm) and isinstance(learner.network, network)
    # the same task and store sections as the store's own config, so precomputed episodes are shared
    shared = load_episode_config(CONFIGS / "tasks" / store_config)
    assert config.task == shared.task and config.store == shared.store


def test_paper_settings():
    omniglot = build_learner(load_config(CONFIGS / "omniglot_maml_5w1s.yaml"))
    assert (omniglot.inner_lr, omniglot.inner_steps, omniglot.eval_inner_steps, omniglot.inner_loss_scale) == (0.4, 1, 10, 5.0)
    assert not omniglot.first_order and omniglot.network == Conv4(1, 28, 5, 64, "stride", norm_scale=False)
    assert not omniglot.adapt_norm  # cbfinn/maml's batch-norm: no scale, offsets meta-learned only
    assert build_learner(load_config(CONFIGS / "omniglot_fomaml_5w1s.yaml")).first_order
    five_shot = load_config(CONFIGS / "omniglot_maml_5w5s.yaml")  # the 1-shot settings, K=5: cbfinn's step is N x the mean's
    assert build_learner(five_shot) == omniglot and five_shot.task.shots == 5 and five_shot.train.meta_batch == 32
    mini = build_learner(load_config(CONFIGS / "miniimagenet_maml_5w1s.yaml"))
    assert mini.network == Conv4(3, 84, 5, 32, "maxpool", norm_scale=False) and (mini.inner_steps, mini.eval_inner_steps) == (5, 10)
    sine = load_config(CONFIGS / "sinusoid_maml.yaml")
    assert (sine.algorithm.inner_lr, sine.train.meta_batch, sine.task.shots) == (0.01, 25, 10)
    assert build_learner(sine).loss == "mse"
    reptile = build_learner(load_config(CONFIGS / "omniglot_reptile_5w1s.yaml"))
    assert isinstance(reptile, CarriedReptile) and (reptile.inner_optimizer, reptile.train_shots, reptile.inner_batch) == ("adam", 10, 10)
    assert type(build_learner(load_config(CONFIGS / "sinusoid_reptile.yaml"))) is Reptile  # SGD: nothing to carry


def test_overrides_reach_the_learner():
    config = load_config(CONFIGS / "omniglot_maml_5w1s.yaml", ["algorithm.inner_lr=0.1", "algorithm.batching=loop"])
    learner = build_learner(config)
    assert learner.inner_lr == 0.1 and learner.batching == "loop"


def test_networks_are_sized_by_the_task_spec():
    omni = validate({"task": {"name": "omniglot", "ways": 20}, "store": {"path": "x"}, "model": {"network": "conv4"}})
    assert build_network(omni) == Conv4(1, 28, 20, 64, "stride")
    mini = validate(
        {
            "task": {"name": "miniimagenet"},
            "store": {"path": "x"},
            "model": {"network": "conv4", "filters": 32, "downsample": "maxpool"},
        }
    )
    assert build_network(mini) == Conv4(3, 84, 5, 32, "maxpool")
    sine = validate({"task": {"name": "sinusoid"}, "store": {"path": "x"}, "model": {"hidden": [40, 40]}})
    assert build_network(sine) == MLP((1, 40, 40, 1))
    digits = validate({"task": {"name": "digits"}, "store": {"path": "x"}, "algorithm": {"name": "l2l"}, "model": {"hidden": [20]}})
    assert build_learner(digits).optimizee.in_features == 64 and build_learner(digits).optimizee.classes == 10
