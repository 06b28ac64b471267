"""Ray's environment: the GPU check runs before any cluster work; one repository root."""
import pytest

from pipeline.errors import TrainingError
from pipeline.runtime.ray_env import REPO_ROOT, check_gpus
from tests.pipeline.runtime.sinusoid_run import sinusoid_config


def test_more_gpus_than_there_are_is_refused_and_none_means_cpu(tmp_path):
    config = sinusoid_config(tmp_path, gpus_per_worker=1)  # two workers
    with pytest.raises(TrainingError, match=r"train.workers x train.gpus_per_worker = 2 x 1.0 needs 2 GPUs, there are 1"):
        check_gpus(config, 1)
    check_gpus(config, 2)
    check_gpus(config, 0)  # no GPU at all: workers run on CPUs


def test_the_repository_root_holds_the_packages():
    assert (REPO_ROOT / "pipeline" / "runtime" / "ray_env.py").is_file() and (REPO_ROOT / "tasks").is_dir()
