"""One image table per node: the store's table decoded once into a .npy file that every reader maps read-only."""
import hashlib
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.distribution import TaskDistribution
from tasks.errors import StoreError
from tasks.families import omniglot
from tasks.store import table as node_table
from tasks.store.parquet import open_store, precompute
from tests.helpers import omniglot_store_config


@pytest.fixture(scope="module")
def store(tmp_path_factory, small_omniglot):
    return precompute(omniglot_store_config(tmp_path_factory.mktemp("store") / "omni", small_omniglot), progress=False)


def digest(episodes) -> str:
    return hashlib.sha256(b"".join(t.numpy().tobytes() for t in (episodes.support_x, episodes.query_x, episodes.query_y))).hexdigest()


def mapped_files() -> set[str]:
    """The .npy files this process maps."""
    return {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(".npy")}


def read_in_child(path: str, worker: int, out) -> None:
    with open_store(path).reader("train", 50, worker=worker, num_workers=2, loop=False) as reader:
        batches = [digest(b) for b in reader]
    out.put((worker, batches, sorted(mapped_files())))


def test_two_readers_map_one_file_and_read_what_an_in_memory_table_gives(store):
    a, b = open_store(store.path), open_store(store.path)
    pa, pb = a.distribution.table.pixels, b.distribution.table.pixels
    assert isinstance(pa, np.memmap) and pa.filename == pb.filename and not pa.flags.writeable
    assert len(list(Path(pa.filename).parent.glob(f"{Path(pa.filename).stem}*.npy"))) == 1
    in_memory = TaskDistribution(store.config.task, omniglot.load(store.config.task))  # rotations: turned after the gather
    with a.reader("train", 64) as reader:
        batch = next(reader)
    fields = {k: torch.from_numpy(v) for k, v in in_memory.sample("train", np.random.default_rng(3), 64).items()}
    assert torch.equal(a.distribution.decode(fields, "indices").support_x, in_memory.decode(fields, "indices").support_x)
    assert np.array_equal(np.asarray(pa), in_memory.table.pixels)
    assert batch.support_x.shape == (64, 5, 1, 28, 28)


def test_a_second_worker_process_maps_the_same_file_and_reads_what_one_reader_reads(store):
    """Worker 1 in a child process, worker 0 here: both map the one .npy file of the node."""
    with open_store(store.path).reader("train", 50, worker=1, num_workers=2, loop=False) as reader:
        single = [digest(b) for b in reader]
    with open_store(store.path).reader("train", 50, worker=0, num_workers=2) as reader:
        next(reader)
        here = mapped_files()
    context = multiprocessing.get_context("spawn")  # a forked child of a torch process may hang in OpenMP
    out = context.Queue()
    child = context.Process(target=read_in_child, args=(store.path, 1, out))
    child.start()
    worker, batches, maps = out.get(timeout=120)
    child.join(timeout=30)
    assert child.exitcode == 0 and worker == 1
    assert batches == single
    assert maps == sorted(here) and len(maps) == 1 and maps[0].startswith(str(node_table.cache_dir()))


def test_another_node_writes_its_copy_from_the_verified_parquet_table(store, tmp_path, monkeypatch):
    here = np.asarray(open_store(store.path).distribution.table.pixels)
    monkeypatch.setenv(node_table.CACHE_ENV, str(tmp_path / "node2"))
    there = open_store(store.path).distribution.table
    assert str(there.pixels.filename).startswith(str(tmp_path / "node2")) and np.array_equal(np.asarray(there.pixels), here)
    assert sorted(p.suffix for p in (tmp_path / "node2").iterdir()) == [".json", ".lock", ".npy"]


def test_a_damaged_copy_is_a_store_error_naming_it(store, tmp_path, monkeypatch):
    monkeypatch.setenv(node_table.CACHE_ENV, str(tmp_path / "node3"))
    open_store(store.path).distribution  # noqa: B018 - writes the copy
    copy = next((tmp_path / "node3").glob("*.npy"))
    copy.write_bytes(copy.read_bytes()[:-5000])
    with pytest.raises(StoreError, match=f"{copy}: the node's copy of the image table cannot be mapped .*delete it"):
        open_store(store.path).distribution  # noqa: B018


def test_a_cache_folder_that_cannot_be_written_is_a_store_error_naming_it_and_the_variable(store, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv(node_table.CACHE_ENV, str(tmp_path / "file" / "cache"))
    with pytest.raises(StoreError, match=f"{tmp_path}/file/cache: cannot write the node's copy .* set METAPIPE_TABLE_CACHE"):
        open_store(store.path).distribution  # noqa: B018


def test_a_reader_holding_the_table_on_a_device_reads_the_same_episodes(store, tmp_path):
    """store.device_table: auto on a GPU worker; here the device is the CPU (the GPU path: bench.episodes)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with open_store(store.path).reader("train", 16) as plain:
        expected = [next(plain) for _ in range(2)]
    moved = open_store(store.path)
    with moved.reader("train", 16, device=torch.device(device)) as reader:
        for a in expected:
            b = next(reader)
            assert b.support_x.device.type == device and torch.equal(a.support_x, b.support_x.cpu())
            assert torch.equal(a.query_y, b.query_y.cpu())
    raw = store.config.model_dump(mode="json")
    raw["store"]["device_table"] = "auto"
    assert open_store(store.path, type(store.config).model_validate(raw)).episodes("train") == 1500
