"""Run configs and their ``base:`` files: how bases merge, and the shipped configs in configs/."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config

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
