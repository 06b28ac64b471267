import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from tasks.store.parquet import open_store
from tests.helpers import small_omniglot_task, write_omniglot

REPO = Path(__file__).resolve().parents[3]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def write_config(path: Path, task: dict, store: dict) -> Path:
    path.write_text(yaml.safe_dump({"task": task, "store": store}))
    return path


def test_precompute_then_inspect_then_a_damaged_store_fails_naming_the_file(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path / "sin.yaml", {"name": "sinusoid"}, {"path": "episodes/sin", "train_episodes": 50000})
    done = run("precompute", str(config), "--episodes", "3000", "--seed", "4", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "train 3000, val 200, test 600" in done.stdout
    assert open_store(str(tmp_path / "episodes" / "sin")).manifest["seed"] == 4

    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "episodes/sin"]) == 0
    shown = capsys.readouterr().out
    assert '"name": "sinusoid"' in shown and "train      3000 episodes" in shown

    shard = tmp_path / "episodes" / "sin" / "test" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10])
    failed = run("inspect", "episodes/sin", cwd=tmp_path)
    assert failed.returncode == 2
    assert "episodes/sin/test/part-00000.parquet: checksum mismatch" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_config_errors_exit_2_with_the_key(tmp_path, capsys):
    config = write_config(tmp_path / "bad.yaml", {"name": "sinusoid", "shots": 0}, {"path": "x"})
    assert main(["precompute", str(config)]) == 2
    assert "task.shots: Input should be greater than or equal to 1 (got 0)" in capsys.readouterr().err


def test_precompute_accepts_a_training_config_and_overrides(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "task": {"name": "quadratic", "dim": 3},
        "store": {"path": str(tmp_path / "q"), "train_episodes": 100},
        "algorithm": {"name": "l2l", "unroll": 10},
        "train": {"steps": 5, "meta_batch": 4},
    }))
    assert main(["precompute", str(config), "--set", "store.val_episodes=10"]) == 0
    assert open_store(str(tmp_path / "q")).episodes("val") == 10
    assert main(["precompute", str(config), "--episodes", "120"]) == 2
    assert "store made for another config" in capsys.readouterr().err
    assert main(["precompute", str(config), "--episodes", "120", "--force"]) == 0


def test_inspect_draws_a_grid_of_image_episodes(tmp_path, capsys):
    root = write_omniglot(tmp_path / "data", "folder")
    task = small_omniglot_task(root).model_dump()
    config = write_config(tmp_path / "o.yaml", task, {"path": str(tmp_path / "o"), "train_episodes": 40})
    assert main(["precompute", str(config)]) == 0
    grid = tmp_path / "grid.png"
    assert main(["inspect", str(tmp_path / "o"), "--grid", str(grid), "--show", "3"]) == 0
    assert f"grid of 3 training episodes: {grid}" in capsys.readouterr().out
    from PIL import Image

    with Image.open(grid) as image:
        assert image.size == ((5 + 1 + 10) * 30, 3 * 30)


def test_missing_data_is_a_clear_error(tmp_path, capsys):
    config = write_config(tmp_path / "o.yaml", {"name": "omniglot", "data_root": str(tmp_path)}, {"path": str(tmp_path / "o")})
    assert main(["precompute", str(config)]) == 2
    assert f"Omniglot not found under {tmp_path}/omniglot" in capsys.readouterr().err


def test_download_without_internet_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(torchvision.datasets, "Omniglot", offline)
    assert main(["download", "omniglot", "--root", str(tmp_path)]) == 2
    assert f"cannot download Omniglot into {tmp_path}/omniglot (network unreachable)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["omniglot-5w1s", "omniglot-20w1s", "sinusoid", "quadratic"])
def test_shipped_task_bases_validate_as_store_configs(name):
    from pipeline.config import load_episode_config

    config = load_episode_config(REPO / "configs" / "tasks" / f"{name}.yaml")
    assert config.store.path.startswith("episodes/")


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        ("sinusoid_reptile.yaml", ["algorithm.batching=vmap"], "algorithm.batching: Input should be 'auto', 'loop' or 'stacked' (got 'vmap')"),
        ("sinusoid_reptile.yaml", ["algorithm.learn_inner_lr=true"], "algorithm.learn_inner_lr: Extra inputs are not permitted (got True)"),
        ("omniglot_maml_5w1s.yaml", ["model={network: mlp}"], "model.network: mlp needs flat inputs; task.name='omniglot' has inputs of shape 1x28x28"),
        ("sinusoid_maml.yaml", ["algorithm={name: metanet}"], "algorithm.name: metanet meta-learns classification tasks; task.name='sinusoid' is regression"),
    ],
    ids=["reptile-vmap", "reptile-meta-sgd", "omniglot-mlp", "sinusoid-metanet"],
)
def test_configs_that_cannot_run_exit_2_before_anything_is_written(tmp_path, capsys, monkeypatch, config, overrides, message):
    """Each once passed validation and crashed after the store was written; now train refuses it up front."""
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "episodes"
    sets = [f"--set={o}" for o in [*overrides, f"store.path={store}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]]
    assert main(["train", str(REPO / "configs" / config), *sets]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store, no MLflow database, no artifacts


def test_evaluate_refuses_fewer_than_one_episode_naming_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "some-run", "--episodes", "0"])
    assert exit_.value.code == 2 and "--episodes: must be at least 1, got 0" in capsys.readouterr().err


def test_the_baselines_take_their_own_flags_through_the_front_door(capsys):
    assert main(["baseline", "optimizers", "--config", str(REPO / "configs" / "sinusoid_maml.yaml"), "--meta-steps", "1"]) == 2
    assert "baselines compare a learned l2l optimizer, got algorithm.name='maml'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["baseline", "finetune", "--help"])
    assert exit_.value.code == 0 and "usage: python -m pipeline baseline finetune" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["baseline", "nope"])
    assert exit_.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_version(capsys):
    import pipeline

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"metapipe {pipeline.__version__}\n"


def test_configs_lists_every_shipped_config_with_its_description(capsys):
    from pipeline.config import load_config

    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shipped = sorted((REPO / "configs").glob("*.yaml"))
    assert len(shipped) > 10 and lines[len(shipped)] == ""
    for path, line in zip(shipped, lines, strict=False):
        name, description = line.split(maxsplit=1)
        assert (name, description) == (path.stem, load_config(path).description)


def test_config_prints_the_resolved_config_that_validates_to_the_same(tmp_path, capsys):
    from pipeline.config import load_config, validate

    assert main(["config", "sinusoid_maml", "--set", "train.steps=7"]) == 0  # a shipped name stands for its file
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["train"]["steps"] == 7 and resolved["optimizer"]["betas"] == [0.9, 0.999]  # a default, filled in
    assert "base" not in resolved
    assert validate(resolved) == load_config(REPO / "configs" / "sinusoid_maml.yaml", ["train.steps=7"])


def test_config_schema_is_the_json_schema(capsys):
    import json

    assert main(["config", "--schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["title"] == "RunConfig" and {"task", "store", "train", "description"} <= set(schema["properties"])


def test_config_errors_name_the_key_or_ask_for_config(capsys):
    assert main(["config", "sinusoid_maml", "--set", "train.stepz=1"]) == 2
    assert "train.stepz: Extra inputs are not permitted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["config"])
    assert exit_.value.code == 2 and "give CONFIG, or --schema" in capsys.readouterr().err


def test_every_positional_argument_has_help():
    import argparse

    from pipeline.cli import parser

    seen = []

    def walk(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    seen.append(name)
                    walk(sub)
            elif not action.option_strings:
                assert action.help, f"{p.prog}: positional {action.dest} has no help"

    walk(parser())
    assert {"train", "evaluate", "export", "runs", "config", "configs", "download", "finetune", "optimizers"} <= set(seen)


def test_train_quiet_turns_progress_off(monkeypatch):
    from pipeline.runtime import driver

    seen = []

    def train(config, progress, **kwargs):
        seen.append(progress)
        raise KeyboardInterrupt

    monkeypatch.setattr(driver, "train", train)
    config = str(REPO / "configs" / "sinusoid_maml.yaml")
    assert main(["train", config, "--quiet"]) == 130 and main(["train", config]) == 130
    assert seen == [False, True]


def test_train_stopped_by_sigterm_exits_143(monkeypatch):
    from pipeline.errors import Terminated
    from pipeline.runtime import driver

    def train(config, **kwargs):
        raise Terminated("signal SIGTERM")

    monkeypatch.setattr(driver, "train", train)
    assert main(["train", str(REPO / "configs" / "sinusoid_maml.yaml")]) == 143


def test_runs_lists_recent_runs_with_their_test_result(tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    assert main(["runs"]) == 2  # no store here yet: said, and none created
    assert "no MLflow store at sqlite:///mlflow.db" in capsys.readouterr().err and not (tmp_path / "mlflow.db").exists()
    uri = f"sqlite:///{tmp_path}/runs.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("metapipe")
    ids = []
    for name, metrics, status in [
        ("omniglot", {"test/accuracy": 0.8821, "test/accuracy_ci95": 0.006}, "FINISHED"),
        ("sinusoid", {"test/mse": 0.5214, "test/mse_ci95": 0.0461}, "FINISHED"),
        ("stopped", {"train/loss": 1.0}, "KILLED"),
    ]:
        run = client.create_run(experiment, run_name=name, start_time=1_800_000_000_000 + 60_000 * len(ids))
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, status)
        ids.append(run.info.run_id)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the same resolution as every other command
    assert main(["runs", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "id", "started", "(UTC)", "status", "test", "name"]
    assert lines[1].split() == [ids[2], "2027-01-15", "08:02", "KILLED", "-", "stopped"]  # newest first
    assert lines[2].split() == [ids[1], "2027-01-15", "08:01", "FINISHED", "mse", "0.5214", "+-", "0.0461", "sinusoid"]
    assert lines[3] == f"2 most recent runs at {uri}"
    assert main(["runs", "--experiment", "metapipe", "--tracking-uri", uri]) == 0
    assert "accuracy 88.21% +- 0.60%" in capsys.readouterr().out
    assert main(["runs", "--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "--experiment 'nope': no such experiment" in capsys.readouterr().err


def test_runs_of_an_unreachable_server_is_a_clear_error(capsys, monkeypatch):
    from tests.helpers import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{free_port()}"
    assert main(["runs", "--tracking-uri", uri]) == 2
    assert f"cannot list the runs at {uri}: " in capsys.readouterr().err
