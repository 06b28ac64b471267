"""The user's path through the CLI: train, evaluate, export, then pipeline.load (real processes)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import pipeline

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_train_evaluate_export_load(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "task": {"name": "sinusoid"},
        "store": {"path": "episodes/sinusoid", "train_episodes": 400, "val_episodes": 10, "test_episodes": 30, "shard_episodes": 200},
        "train": {"meta_batch": 4, "val_every": 5, "checkpoint_every": 5, "val_episodes": 10, "test_episodes": 30},
    }))
    trained = cli("train", str(config), "--steps", "10", "--set", "algorithm.inner_lr=0.02", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_id = re.search(r"^run_id: (\w+)$", trained.stdout, re.M).group(1)
    assert re.search(r"^test mse \d+\.\d+ \+- \d+\.\d+ \(95% CI, 30 episodes\)$", trained.stdout, re.M)
    assert (tmp_path / "mlflow.db").exists()

    evaluated = cli("evaluate", run_id, "--episodes", "20", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "20 episodes" in evaluated.stdout

    exported = cli("export", run_id, "--out", "exported/sinusoid", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    learner = pipeline.load(tmp_path / "exported" / "sinusoid")
    assert learner.config.algorithm.inner_lr == 0.02
    x = torch.linspace(-5, 5, 10).unsqueeze(1)
    assert learner.adapt(x, torch.sin(x))(x).shape == (10, 1)


def test_user_errors_exit_2_with_the_problem_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"task": {"name": "sinusoid"}, "store": {"path": "x"}, "train": {"workerz": 2}}))
    out = cli("train", str(bad), cwd=tmp_path)
    assert out.returncode == 2 and "train.workerz" in out.stderr and "Traceback" not in out.stderr
    out = cli("evaluate", "0123456789abcdef", cwd=tmp_path)
    assert out.returncode == 2 and "0123456789abcdef" in out.stderr
