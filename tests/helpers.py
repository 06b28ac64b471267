"""Helpers shared by the test packages: the repository's paths, generated data-set fixtures, processes and ports.

One module, imported by tests and conftests alike (no conftest imports another).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.config import EpisodeConfig
from tasks.families.omniglot import OmniglotTask

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
VENV_BIN = ROOT / ".venv" / "bin"
BUCKET = "metapipe"


def free_port(offsets: tuple[int, ...] = (0,)) -> int:
    """A port ``p`` such that ``p + offset`` is free on 127.0.0.1 for every offset."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + max(offsets) >= 65536:
            continue
        try:
            for offset in offsets:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", base + offset))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no free block of ports at offsets {offsets} on 127.0.0.1")


def descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def stop_tree(pid: int, timeout: float = 20.0, graceful: Callable[[], None] | None = None) -> None:
    """Stop ``pid`` (by ``graceful()`` or SIGTERM), then SIGKILL it and anything it spawned that is left."""
    tree = [pid, *descendants(pid)]
    try:
        if graceful:
            graceful()
        else:
            os.kill(pid, signal.SIGTERM)
    except (ProcessLookupError, subprocess.SubprocessError):
        pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.2)
    for p in tree + [d for p in tree if alive(p) for d in descendants(p)]:
        if alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_until(check: Callable[[], bool], what: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet: connection refused, 5xx, ...
            pass
        time.sleep(0.3)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise RuntimeError(f"{what} did not come up in {timeout:.0f} s\n{tail}")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:
        return response.status == 200


@dataclass(frozen=True)
class Credentials:
    """Random per-session secrets; none may leak into runs or logs."""

    access_key: str
    secret_key: str
    mlflow_token: str

    def values(self) -> dict[str, str]:
        return {"AWS_SECRET_ACCESS_KEY": self.secret_key, "MLFLOW_TRACKING_TOKEN": self.mlflow_token}


@dataclass(frozen=True)
class S3:
    endpoint: str

    def client(self, creds: Credentials):  # noqa: ANN201 - a boto3 client
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id=creds.access_key, aws_secret_access_key=creds.secret_key,
        )


@contextmanager
def moto_s3(bucket: str, **env: str) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with ``bucket``; yields its URL while the process environment points
    at it (endpoint, test credentials, and ``env``), restored afterwards; moto's state is reset on exit."""
    import boto3
    import requests
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    settings = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": endpoint} | env
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in settings.items():
                patch.setenv(key, value)
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            yield endpoint
    finally:
        requests.post(f"{endpoint}/moto-api/reset", timeout=10)  # moto's state is per process
        server.stop()


def base_env(scratch: Path) -> dict[str, str]:
    """The environment every started process shares: no credentials, no telemetry, scratch TMPDIR."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_", "RAY_"))}
    tmp = scratch / "tmp"
    tmp.mkdir(exist_ok=True)
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", TMPDIR=str(tmp), HOME=env.get("HOME", str(scratch)),
        RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true",
        RAY_AUTH_MODE="disabled",  # loopback-only test cluster; outside tests token authentication stays on
    )
    return env


@dataclass(frozen=True)
class RayHead:
    """A Ray head started by cluster/local-head.sh: its address and log folder."""

    address: str
    logs: Path


ALPHABETS = {"images_background": ["Alpha", "Beta"], "images_evaluation": ["Gamma"]}
CHARACTERS_PER_ALPHABET = 4
DRAWINGS = 6


def drawing(seed: int, size: tuple[int, int] = (105, 105)) -> Image.Image:
    """A binary image like Omniglot's: white paper (1) with a few black strokes (0)."""
    rng = np.random.default_rng(seed)
    paper = np.ones(size[::-1], dtype=bool)
    for _ in range(3):
        top, left = rng.integers(0, min(size) - 20, size=2)
        paper[top : top + rng.integers(3, 20), left : left + rng.integers(3, 20)] = False
    return Image.fromarray(paper)


def omniglot_files() -> dict[str, Image.Image]:
    """Relative path -> image of a small Omniglot in the original layout (12 characters x 6 drawings)."""
    files, ident = {}, 0
    for top, alphabets in ALPHABETS.items():
        for alphabet in alphabets:
            for c in range(1, CHARACTERS_PER_ALPHABET + 1):
                ident += 1
                for d in range(1, DRAWINGS + 1):
                    files[f"{top}/{alphabet}/character{c:02d}/{ident:04d}_{d:02d}.png"] = drawing(ident * 100 + d)
    return files


def write_omniglot(root: Path, layout: str) -> Path:
    """A small Omniglot under ``root/omniglot`` in ``layout`` (zip, torchvision or folder); returns root."""
    base = root / "omniglot"
    base.mkdir(parents=True, exist_ok=True)
    files = omniglot_files()
    if layout == "zip":
        for top in ALPHABETS:
            with zipfile.ZipFile(base / f"{top}.zip", "w") as archive:
                for name, image in files.items():
                    if name.startswith(top):
                        path = base / "tmp.png"
                        image.save(path)
                        archive.write(path, name)
            (base / "tmp.png").unlink()
        return root
    folder = base / "omniglot-py" if layout == "torchvision" else base
    for name, image in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)
    return root


def small_omniglot_task(root: Path, **changes) -> OmniglotTask:
    """The task config matching ``write_omniglot``: 12 characters (6 train, 2 val, 4 test), 6 drawings."""
    fields = dict(
        data_root=str(root) if root else None, characters=12, drawings=DRAWINGS, train_characters=6, val_characters=2,
        ways=5, shots=1, queries=2,
    )
    return OmniglotTask(**(fields | changes))


def small_omniglot_run(tmp_path: Path, name: str, **sections: dict) -> dict:
    """A raw run config on a fresh ``write_omniglot`` fixture: 6 steps of 2 episodes, SQLite MLflow in ``tmp_path``."""
    root = write_omniglot(tmp_path / "data", "folder")
    return {
        "name": name,
        "seed": 2,
        "task": small_omniglot_task(root).model_dump(),
        "store": {"path": str(tmp_path / "episodes"), "train_episodes": 40, "val_episodes": 4, "test_episodes": 4, "shard_episodes": 20},
        "train": {"steps": 6, "meta_batch": 2, "workers": 1, "val_every": 3, "val_episodes": 4, "test_episodes": 4, "checkpoint_every": 3, "log_every": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "test"},
        **sections,
    }


def sinusoid_store_config(path, **store) -> EpisodeConfig:
    """A sinusoid store: 2500 train episodes in 3 shards (row groups of 1000), 300 val, 200 test."""
    return EpisodeConfig.model_validate(
        {
            "task": {"name": "sinusoid", "shots": 3, "queries": 4},
            "store": {"path": str(path), "train_episodes": 2500, "val_episodes": 300, "test_episodes": 200,
                      "shard_episodes": 1000} | store,
        }
    )


def omniglot_store_config(path, data_root, **store) -> EpisodeConfig:
    """A store of the ``write_omniglot`` fixture under ``data_root``: 1500 train episodes in 2 shards, 20 val, 30 test."""
    return EpisodeConfig.model_validate(
        {
            "task": small_omniglot_task(data_root).model_dump(),
            "store": {"path": str(path), "train_episodes": 1500, "val_episodes": 20, "test_episodes": 30,
                      "shard_episodes": 1000} | store,
        }
    )


def named_gradients(step: int) -> dict[str, torch.Tensor]:
    """float64 gradients of two named parameters ``a [3, 4]`` and ``b [5]``, fixed by ``step``."""
    gen = torch.Generator().manual_seed(step)
    return {"a": torch.randn(3, 4, generator=gen, dtype=torch.float64), "b": torch.randn(5, generator=gen, dtype=torch.float64)}


def assert_steps_match_torch_optim(opt, torch_class: type, steps: int = 5, **kwargs) -> tuple:
    """Step the init/update pair ``opt`` and ``torch_class(**kwargs)`` side by side on copies of one pair of
    parameters (TorchOpt's tests/helpers.py way); every tensor agrees to 1e-14 after every step. Returns
    ``opt``'s last state."""
    start = {k: torch.zeros_like(v) + 0.5 for k, v in named_gradients(0).items()}
    reference = {k: v.clone().requires_grad_() for k, v in start.items()}
    torch_opt = torch_class(list(reference.values()), **kwargs)
    params, state = start, opt.init(start)
    for step in range(steps):
        grads = named_gradients(step)
        updates, state = opt.update(grads, state)
        params = {k: v + updates[k] for k, v in params.items()}
        for k, g in grads.items():
            reference[k].grad = g.clone()
        torch_opt.step()
        for k in params:
            assert torch.allclose(params[k], reference[k].detach(), atol=1e-14, rtol=0), (step, k)
    return state


def write_class_folders(folder: Path, classes: dict[str, int], mode: str = "RGB", size: int = 10, suffix: str = ".png") -> Path:
    """``classes`` (a class path -> its image count) as class folders of random images under ``folder``;
    image ``i`` of a class is ``<class>/img<i>.<suffix>``, its pixels fixed by the class name and ``i``."""
    for name, count in classes.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([i, *name.encode()])
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(folder / name / f"img{i}{suffix}")
    return folder
