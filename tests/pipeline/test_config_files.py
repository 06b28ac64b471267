"""Run configs and their ``base:`` files: how bases merge, and the shipped configs in configs/."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config, load_episode_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

TASK = {"name": "omniglot", "ways": 5, "shots": 1, "queries": 15}
STORE = {"path": "episodes/omniglot-5w1s", "train_episodes": 200000, "seed": 0}


def write(path: Path, content: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


# --- how bases work ---------------------------------------------------------------------------


def test_base_is_relative_to_the_file_and_the_run_file_wins(tmp_path):
    write(tmp_path / "tasks" / "omniglot.yaml", {"task": TASK, "store": STORE, "train": {"steps": 7, "workers": 1}})
    run = write(
        tmp_path / "run.yaml",
        {"base": "tasks/omniglot.yaml", "name": "r", "store": {"train_episodes": 320000}, "train": {"steps": 9}},
    )
    config = load_config(run)
    assert config.name == "r" and config.task.ways == 5 and config.task.queries == 15
    # store and train merge key by key: the run file's keys win, the base's other keys stay
    assert (config.store.path, config.store.train_episodes) == ("episodes/omniglot-5w1s", 320000)
    assert (config.train.steps, config.train.workers) == (9, 1)


def test_a_base_may_have_a_base(tmp_path):
    write(tmp_path / "tasks" / "omniglot.yaml", {"task": TASK, "store": STORE})
    write(tmp_path / "tasks" / "big.yaml", {"base": "omniglot.yaml", "store": {"path": "episodes/big", "train_episodes": 9}})
    config = load_config(write(tmp_path / "run.yaml", {"base": "tasks/big.yaml", "task": {"shots": 5}}))
    assert (config.task.shots, config.task.queries) == (5, 15)
    assert (config.store.path, config.store.train_episodes, config.store.seed) == ("episodes/big", 9, 0)


def test_lists_replace_rather_than_merge(tmp_path):
    write(tmp_path / "base.yaml", {"task": TASK, "store": STORE, "optimizer": {"betas": [0.5, 0.6], "lr": 0.1}})
    config = load_config(write(tmp_path / "run.yaml", {"base": "base.yaml", "optimizer": {"betas": [0.9, 0.99]}}))
    assert config.optimizer.betas == (0.9, 0.99) and config.optimizer.lr == 0.1


def test_set_overrides_apply_after_the_bases(tmp_path):
    write(tmp_path / "base.yaml", {"task": TASK, "store": STORE})
    run = write(tmp_path / "run.yaml", {"base": "base.yaml", "store": {"train_episodes": 5}})
    config = load_config(run, ["store.train_episodes=7", "task.shots=2"])
    assert (config.store.train_episodes, config.task.shots, config.store.path) == (7, 2, "episodes/omniglot-5w1s")


def test_validation_errors_name_the_run_file_and_its_bases(tmp_path):
    base = write(tmp_path / "base.yaml", {"task": {**TASK, "wayz": 5}, "store": STORE})
    run = write(tmp_path / "run.yaml", {"base": "base.yaml"})
    with pytest.raises(ConfigError, match=rf"invalid config {run} \(with base {base}\):\n  task.wayz: Extra inputs"):
        load_config(run)


def test_missing_base_names_both_files(tmp_path):
    run = write(tmp_path / "run.yaml", {"base": "tasks/nope.yaml"})
    with pytest.raises(ConfigError, match=rf"cannot read config {tmp_path}/tasks/nope.yaml \(base of {run}\)"):
        load_config(run)


@pytest.mark.parametrize("content, got", [("- a\n- b\n", "list"), ("just text\n", "str"), ("", "an empty file")])
def test_base_that_is_not_a_mapping(tmp_path, content, got):
    write(tmp_path / "base.yaml", content)
    run = write(tmp_path / "run.yaml", {"base": "base.yaml"})
    with pytest.raises(ConfigError, match=rf"invalid config {tmp_path}/base.yaml \(base of {run}\): expected a YAML mapping at the top, got {got}"):
        load_config(run)


def test_base_that_is_not_valid_yaml(tmp_path):
    write(tmp_path / "base.yaml", "task: [unclosed\n")
    run = write(tmp_path / "run.yaml", {"base": "base.yaml"})
    with pytest.raises(ConfigError, match=rf"config {tmp_path}/base.yaml \(base of {run}\) is not valid YAML"):
        load_config(run)


@pytest.mark.parametrize("value", [3, None, "", ["a.yaml"]])
def test_base_must_be_a_path(tmp_path, value):
    run = write(tmp_path / "run.yaml", {"base": value, "task": TASK, "store": STORE})
    with pytest.raises(ConfigError, match=rf"invalid config {run}: base: expected a YAML file path relative to {tmp_path}"):
        load_config(run)


def test_cycle_of_bases(tmp_path):
    write(tmp_path / "a.yaml", {"base": "sub/b.yaml", "task": TASK})
    write(tmp_path / "sub" / "b.yaml", {"base": "../a.yaml", "store": STORE})
    run = write(tmp_path / "run.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="makes a cycle of bases: .*/a.yaml -> .*/sub/b.yaml -> .*/sub/../a.yaml"):
        load_config(run)
    me = write(tmp_path / "me.yaml", {"base": "me.yaml"})
    with pytest.raises(ConfigError, match=rf"invalid config {me}: base: 'me.yaml' makes a cycle of bases"):
        load_config(me)


def test_a_file_without_base_loads_as_before(tmp_path):
    config = load_config(write(tmp_path / "run.yaml", {"task": TASK, "store": STORE}))
    assert config.store.path == "episodes/omniglot-5w1s"
    with pytest.raises(ConfigError, match="expected a YAML mapping at the top, got list"):
        load_config(write(tmp_path / "list.yaml", "- 1\n"))


# --- the shipped configs ----------------------------------------------------------------------

# Every run config in configs/: the base file under configs/tasks/ holding its task and store, and the
# store path it reads. Runs with the same base share one precomputed store; a base differing only in
# store counts (the -320k and -240k ones) has a store path of its own.
RUNS = {
    "omniglot_maml_5w1s.yaml": ("omniglot-5w1s.yaml", "episodes/omniglot-5w1s"),
    "omniglot_fomaml_5w1s.yaml": ("omniglot-5w1s.yaml", "episodes/omniglot-5w1s"),
    "omniglot_protonet_5w1s.yaml": ("omniglot-5w1s.yaml", "episodes/omniglot-5w1s"),
    "omniglot_reptile_5w1s.yaml": ("omniglot-5w1s.yaml", "episodes/omniglot-5w1s"),
    "quickstart.yaml": ("omniglot-5w1s.yaml", "episodes/omniglot-5w1s"),
    "meta_lstm_omniglot_5w1s.yaml": ("omniglot-5w1s.yaml", "episodes/omniglot-5w1s"),
    "metanet_omniglot_5w1s.yaml": ("omniglot-5w1s-320k.yaml", "episodes/omniglot-5w1s-320k"),
    "meta_lstm_omniglot_5w5s.yaml": ("omniglot-5w5s.yaml", "episodes/omniglot-5w5s"),
    "omniglot_maml_5w5s.yaml": ("omniglot-5w5s.yaml", "episodes/omniglot-5w5s"),
    "omniglot_maml_20w1s.yaml": ("omniglot-20w1s.yaml", "episodes/omniglot-20w1s"),
    "metanet_omniglot_20w1s.yaml": ("omniglot-20w1s-320k.yaml", "episodes/omniglot-20w1s-320k"),
    "meta_lstm_miniimagenet_5w1s.yaml": ("miniimagenet-5w1s.yaml", "episodes/miniimagenet-5w1s"),
    "miniimagenet_maml_5w1s.yaml": ("miniimagenet-5w1s-240k.yaml", "episodes/miniimagenet-5w1s-240k"),
    "meta_lstm_miniimagenet_5w5s.yaml": ("miniimagenet-5w5s.yaml", "episodes/miniimagenet-5w5s"),
    "miniimagenet_maml_resnet12_5w1s.yaml": ("miniimagenet-5w1s-240k.yaml", "episodes/miniimagenet-5w1s-240k"),
    "miniimagenet_maml_resnet12_5w5s.yaml": ("miniimagenet-5w5s.yaml", "episodes/miniimagenet-5w5s"),
    "sinusoid_maml.yaml": ("sinusoid.yaml", "episodes/sinusoid"),
    "sinusoid_reptile.yaml": ("sinusoid.yaml", "episodes/sinusoid"),
    "l2l_quadratic.yaml": ("quadratic.yaml", "episodes/quadratic"),
    "l2l_digits_mlp.yaml": ("digits.yaml", "episodes/digits"),
    "cifarfs_maml_5w1s.yaml": ("cifar-fs-5w1s.yaml", "episodes/cifar-fs-5w1s"),
    "fc100_maml_5w1s.yaml": ("fc100-5w1s.yaml", "episodes/fc100-5w1s"),
    "tiered_imagenet_maml_5w1s.yaml": ("tiered-imagenet-5w1s.yaml", "episodes/tiered-imagenet-5w1s"),
    "cub_maml_5w1s.yaml": ("cub-5w1s.yaml", "episodes/cub-5w1s"),
}
BASES = sorted((CONFIGS / "tasks").glob("*.yaml"))


def test_every_run_config_is_listed():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(RUNS)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_config_takes_task_and_store_from_its_base(name):
    base, store_path = RUNS[name]
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert raw["base"] == f"tasks/{base}" and not {"task", "store"} & set(raw)
    config, alone = load_config(CONFIGS / name), load_episode_config(CONFIGS / "tasks" / base)
    assert (config.task, config.store) == (alone.task, alone.store) and config.store.path == store_path


def test_one_store_path_per_task_and_store():
    """Configs with the same task and store counts share a store path, and a path holds one store config."""
    paths: dict[str, set[str]] = {}
    identities: dict[str, set[str]] = {}
    for file in [*CONFIGS.glob("*.yaml"), *BASES]:
        config = load_episode_config(file)
        store = config.store.model_dump(mode="json")
        identity = yaml.safe_dump({"task": config.task.model_dump(mode="json"), "store": store | {"path": None}})
        paths.setdefault(identity, set()).add(config.store.path)
        identities.setdefault(config.store.path, set()).add(identity)
    assert all(len(p) == 1 for p in paths.values()), [sorted(p) for p in paths.values() if len(p) > 1]
    assert all(len(i) == 1 for i in identities.values()), [p for p, i in identities.items() if len(i) > 1]


@pytest.mark.parametrize("base", BASES, ids=lambda p: p.name)
def test_base_files_say_what_they_are_and_hold_task_and_store_only(base):
    text = base.read_text()
    assert text.startswith("# "), f"{base.name}: start with a comment saying what it is and its source"
    assert set(yaml.safe_load(text)) <= {"base", "task", "store"}
    users = [n for n, (b, _) in RUNS.items() if b == base.name]
    users += [b.name for b in BASES if yaml.safe_load(b.read_text()).get("base") == base.name]
    assert users, f"{base.name} is used by no config"


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_config_has_a_one_line_description(name):
    description = load_config(CONFIGS / name).description
    assert description and "\n" not in description and len(description) <= 200
