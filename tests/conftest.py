"""Fixtures shared by the test packages."""
import os

import pytest
import ray
import torch


@pytest.fixture(autouse=True, scope="session")
def table_cache(tmp_path_factory):
    """Mapped image tables (tasks/store/table.py) go to a folder of this session, not the machine's temp dir."""
    os.environ["METAPIPE_TABLE_CACHE"] = str(tmp_path_factory.mktemp("tables"))


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own folder: MLflow puts a SQLite store's artifacts under ./mlruns, never in the checkout."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def mlflow_tracking_uri_restored():
    """A test that sets MLflow's process-wide tracking URI (mlflow.set_tracking_uri, which also writes
    $MLFLOW_TRACKING_URI) leaves the next test what it found, in this process and in the processes it starts."""
    from mlflow.tracking._tracking_service import utils  # the global set_tracking_uri writes; no public reset

    saved, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    yield
    utils._tracking_uri = saved
    if env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env


@pytest.fixture(scope="module")
def local_ray():
    """One embedded Ray per test module, pinned to 2 CPUs (Ray's testing tips)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and contend on shared CI cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
