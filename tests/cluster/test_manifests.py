"""Schema-level checks of the cluster definitions that cannot be launched here.

The autoscaler YAML is validated against Ray's own cluster schema; both files must install the
project from requirements.txt, run the real entry point on a config that validates, keep Ray's
token authentication and usage-stats settings, and give GPUs to the workers only.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

from pipeline.config import load_config

ROOT = Path(__file__).resolve().parents[2]
INSTALL = re.compile(r"python3?(\.\d+)? -m venv \.venv && \.venv/bin/pip install (-q )?-r requirements\.txt")


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster" / name).read_text())


@pytest.fixture(scope="module")
def autoscaler() -> dict[str, Any]:
    return load("autoscaler.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return load("rayjob.yaml")


def test_autoscaler_yaml_satisfies_rays_cluster_schema(autoscaler: dict[str, Any]) -> None:
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(autoscaler, schema)


def test_autoscaler_head_is_cpu_and_workers_have_gpus(autoscaler: dict[str, Any]) -> None:
    types = autoscaler["available_node_types"]
    head = types[autoscaler["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    workers = {name: t for name, t in types.items() if name != autoscaler["head_node_type"]}
    assert workers, "no worker node type"
    for name, node in workers.items():
        assert node["resources"]["GPU"] >= 1, f"worker type {name} requests no GPU"
        assert node["max_workers"] >= 1
        assert node["node_config"]["InstanceType"].startswith(("g", "p")), f"{name}: not a GPU instance type"


def test_autoscaler_installs_the_project_and_starts_ray_from_its_venv(autoscaler: dict[str, Any]) -> None:
    assert autoscaler["file_mounts"]["/home/ubuntu/metapipe"] == "."
    assert any(INSTALL.search(c) for c in autoscaler["setup_commands"])
    assert {".venv", ".git", "episodes", "mlruns"} <= set(autoscaler["rsync_exclude"])
    starts = [c for c in autoscaler["head_start_ray_commands"] + autoscaler["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for command in starts:
        assert command.index("PATH=$HOME/metapipe/.venv/bin:$PATH") < command.index("ray start")
        assert "--disable-usage-stats" in command and "RAY_USAGE_STATS_ENABLED=0" in command
        assert "RAY_AUTH_MODE=token" in command
        assert "RAY_LOGGER_LEVEL=warning" in command, "at info, Ray's runtime-env agent logs job env vars"
    head_start = next(c for c in starts if "--head" in c)
    assert "--dashboard-host=127.0.0.1" in head_start


def containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return spec["template"]["spec"]["containers"]


def test_rayjob_runs_the_train_entry_point_on_a_valid_config(rayjob: dict[str, Any]) -> None:
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    command = rayjob["spec"]["entrypoint"].split("&&")[-1]
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "pipeline", "train"]
    overrides = [words[i + 1] for i, w in enumerate(words) if w == "--set"]
    config = load_config(ROOT / words[4], overrides)
    assert config.store.path.startswith("s3://"), "workers on other pods read the store from S3"
    assert config.train.workers <= rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"]


def test_rayjob_worker_groups_request_gpus_and_the_head_none(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert all("nvidia.com/gpu" not in c.get("resources", {}).get("limits", {}) for c in containers(head))
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        gpus = [int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in containers(group)]
        assert gpus and min(gpus) >= 1, f"group {group['groupName']} requests no GPU"
        assert int(group["rayStartParams"]["num-gpus"]) == gpus[0]


def test_every_rayjob_pod_installs_the_project_and_runs_ray_from_its_venv(rayjob: dict[str, Any]) -> None:
    cluster = rayjob["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert any(INSTALL.search(" ".join(c["args"])) for c in pod["initContainers"])
        for container in pod["containers"]:
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["PATH"].startswith("/opt/metapipe/.venv/bin:")
            assert env["RAY_AUTH_MODE"] == "token" and env["RAY_USAGE_STATS_ENABLED"] == "0"
            assert env["RAY_LOGGER_LEVEL"] == "warning", "at info, Ray's runtime-env agent logs job env vars"
            assert container["image"].startswith(f"rayproject/ray:{ray.__version__}-py311")


def test_no_credentials_are_written_into_the_manifests() -> None:
    for name in ("autoscaler.yaml", "rayjob.yaml"):
        text = (ROOT / "cluster" / name).read_text()
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            assert not re.search(r"(AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|RAY_AUTH_TOKEN|PASSWORD)\b", line), f"{name}: {line}"
            assert "RAY_AUTH_MODE=disabled" not in line and "value: disabled" not in line


def test_local_head_binds_the_dashboard_to_loopback_and_stops_only_itself() -> None:
    script = (ROOT / "cluster" / "local-head.sh").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert "--dashboard-host=127.0.0.1" in code and "--disable-usage-stats" in code
    assert "--block" in code and "ray stop" not in code
    assert "RAY_LOGGER_LEVEL=${RAY_LOGGER_LEVEL:-warning}" in code
    assert code.index('export PATH="$venv/bin:$PATH"') < code.index("ray start")


def test_local_head_refuses_a_head_dir_too_long_for_rays_socket_paths(tmp_path: Path) -> None:
    head_dir = tmp_path / ("x" * 40)
    env = {"PATH": os.environ["PATH"], "RAY_HEAD_DIR": str(head_dir)}
    started = subprocess.run([str(ROOT / "cluster" / "local-head.sh"), "start"], env=env, capture_output=True, text=True, timeout=30)
    assert started.returncode == 2
    assert f"RAY_HEAD_DIR={head_dir}" in started.stderr and "at most 32" in started.stderr
    assert not head_dir.exists()
