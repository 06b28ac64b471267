import json
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.config import EpisodeConfig
from tasks.errors import StoreError
from tasks.store import parquet as store_module
from tasks.store.filesystem import sha256_hex
from tasks.store.parquet import open_store, precompute
from tests.helpers import omniglot_store_config as omniglot_config
from tests.helpers import sinusoid_store_config as sinusoid_config


def files_of(store) -> dict[str, bytes]:
    """Every data file of a store (shards and image table) by its name in the store."""
    names = [s["file"] for split in store.manifest["splits"].values() for s in split["shards"]]
    if store.manifest["image_table"]:
        names.append(store.manifest["image_table"]["file"])
    return {name: (Path(store.path) / name).read_bytes() for name in names}


def all_of(reader) -> dict[str, torch.Tensor]:
    batches = list(reader)
    return {f: torch.cat([getattr(b, f) for b in batches]) for f in ("support_x", "support_y", "query_x", "query_y")}


def ids(episodes_x: torch.Tensor) -> set[tuple[float, ...]]:
    """Sinusoid episodes are told apart by their support inputs."""
    return {tuple(row.tolist()) for row in episodes_x.flatten(1)}


@pytest.fixture(scope="module")
def sinusoid_store(tmp_path_factory):
    return precompute(sinusoid_config(tmp_path_factory.mktemp("store") / "sin"), progress=False)


@pytest.fixture(scope="module")
def omniglot_store(tmp_path_factory, small_omniglot):
    return precompute(omniglot_config(tmp_path_factory.mktemp("store") / "omni", small_omniglot), progress=False)


# determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sinusoid", "omniglot"])
def test_same_config_and_seed_give_byte_identical_files(tmp_path, small_omniglot, kind):
    make = sinusoid_config if kind == "sinusoid" else lambda p, **s: omniglot_config(p, small_omniglot, **s)
    a = files_of(precompute(make(tmp_path / "a"), progress=False))
    b = files_of(precompute(make(tmp_path / "b"), progress=False))
    c = files_of(precompute(make(tmp_path / "c", seed=1), progress=False))
    assert a == b
    shards = [name for name in a if name.endswith(".parquet") and "/" in name]
    assert all(a[name] != c[name] for name in shards)


def test_splits_draw_from_disjoint_seeds(sinusoid_store):
    parts = {split: ids(sinusoid_store.read_split(split).support_x) for split in ("train", "val", "test")}
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"] and not parts["val"] & parts["test"]
    assert {s: len(p) for s, p in parts.items()} == {"train": 2500, "val": 300, "test": 200}


def test_manifest_records_config_seed_version_rows_and_checksums(sinusoid_store):
    manifest = json.loads((Path(sinusoid_store.path) / "manifest.json").read_text())
    assert manifest["schema_version"] == store_module.SCHEMA_VERSION and manifest["seed"] == 0
    assert manifest["config"]["task"]["shots"] == 3
    shards = manifest["splits"]["train"]["shards"]
    assert [s["rows"] for s in shards] == [1000, 1000, 500]
    assert all(len(s["sha256"]) == 64 for s in shards)


def test_rerun_with_the_same_config_is_a_no_op(tmp_path):
    config = sinusoid_config(tmp_path / "s")
    precompute(config, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")}
    again = precompute(config, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "s").rglob("*")} == stamps
    assert again.episodes("train") == 2500


def test_another_config_into_the_same_place_is_refused_unless_forced(tmp_path):
    precompute(sinusoid_config(tmp_path / "s"), progress=False)
    with pytest.raises(StoreError, match="store made for another config.*store.train_episodes: store has 2500, config has 1200"):
        precompute(sinusoid_config(tmp_path / "s"), episodes=1200, progress=False)
    replaced = precompute(sinusoid_config(tmp_path / "s"), episodes=1200, force=True, progress=False)
    assert replaced.episodes("train") == 1200 and open_store(str(tmp_path / "s")).episodes("train") == 1200
    assert not (tmp_path / "s" / "train" / "part-00002.parquet").exists()


def test_opening_a_store_for_another_config_is_refused(sinusoid_store):
    other = EpisodeConfig.model_validate(
        {"task": {"name": "sinusoid", "shots": 5, "queries": 4}, "store": sinusoid_store.config.store.model_dump()}
    )
    with pytest.raises(StoreError, match="manifest.json: store made for another config: task.shots: store has 3, config has 5"):
        open_store(sinusoid_store.path, other)
    assert open_store(sinusoid_store.path, sinusoid_store.config).episodes("val") == 300


def test_an_interrupted_precompute_leaves_no_valid_store(tmp_path, monkeypatch):
    real, calls = store_module._shard_bytes, []

    def fail_on_second(fields):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(fields)

    monkeypatch.setattr(store_module, "_shard_bytes", fail_on_second)
    with pytest.raises(KeyboardInterrupt):
        precompute(sinusoid_config(tmp_path / "s"), progress=False)
    assert (tmp_path / "s" / "train" / "part-00000.parquet").exists()
    with pytest.raises(StoreError, match="manifest.json: missing; .* not an episode store, or its precompute did not finish"):
        open_store(str(tmp_path / "s"))


# reading ---------------------------------------------------------------------------------------


def test_one_pass_reads_every_episode_once_in_batches(sinusoid_store):
    with sinusoid_store.reader("train", 64, loop=False) as reader:
        batches = list(reader)
    assert [len(b) for b in batches] == [64] * 39 + [4]
    assert batches[0].support_x.shape == (64, 3, 1) and batches[0].query_y.shape == (64, 4, 1)
    everything = sinusoid_store.read_split("train")
    assert torch.equal(torch.cat([b.support_x for b in batches]), everything.support_x)
    assert len(ids(everything.support_x)) == 2500


@pytest.mark.parametrize(
    "shard_episodes, workers", [(1000, 2), (1000, 3), (2500, 2), (2500, 3)], ids=["shards-2", "shards-3", "rowgroups-2", "rowgroups-3"]
)
def test_workers_read_disjoint_parts_that_cover_the_split(tmp_path, shard_episodes, workers):
    store = precompute(sinusoid_config(tmp_path / "s", shard_episodes=shard_episodes), progress=False)
    parts = [ids(all_of(store.reader("train", 100, w, workers, loop=False))["support_x"]) for w in range(workers)]
    assert sum(len(p) for p in parts) == 2500
    assert set().union(*parts) == ids(store.read_split("train").support_x)


def test_too_many_workers_is_an_error(sinusoid_store):
    with pytest.raises(StoreError, match="split val has 1 row groups of 1000 episodes, too few for 2 workers"):
        sinusoid_store.reader("val", 10, worker=1, num_workers=2)


def test_position_resumes_with_exactly_the_next_batch_across_epochs(sinusoid_store):
    reader = sinusoid_store.reader("train", 700, worker=1, num_workers=2)  # worker 1 has shard 1 only: 1000 episodes
    first = [next(reader) for _ in range(2)]
    position = json.loads(json.dumps(reader.position))
    rest = [next(reader) for _ in range(3)]
    reader.close()
    assert position["episodes"] == 1400 and reader.position["epoch"] == 3
    assert torch.equal(first[1].support_x[300:], first[0].support_x[:400])  # 1000 episodes, then the same again
    with sinusoid_store.reader("train", 700, worker=1, num_workers=2, start=position) as resumed:
        again = [next(resumed) for _ in range(3)]
    for a, b in zip(rest, again):
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)


def test_position_of_another_worker_is_refused(sinusoid_store):
    reader = sinusoid_store.reader("train", 10, worker=0, num_workers=2)
    next(reader)
    reader.close()
    with pytest.raises(ValueError, match="start position is for worker=0, this reader has worker=1"):
        sinusoid_store.reader("train", 10, worker=1, num_workers=2, start=reader.position)


def test_image_store_reads_classification_batches(omniglot_store):
    with omniglot_store.reader("train", 32) as reader:
        batch = next(reader)
    assert batch.support_x.shape == (32, 5, 1, 28, 28) and batch.support_x.dtype == torch.float32
    assert batch.query_x.shape == (32, 10, 1, 28, 28) and batch.query_y.dtype == torch.int64
    assert omniglot_store.manifest["splits"]["test"]["layout"] == "pixels"


def test_pixel_and_index_layouts_store_the_same_evaluation_episodes(tmp_path, small_omniglot, omniglot_store):
    indexed = precompute(omniglot_config(tmp_path / "i", small_omniglot, eval_pixels=False), progress=False)
    assert indexed.manifest["splits"]["test"]["layout"] == "indices"
    a, b = omniglot_store.read_split("test"), indexed.read_split("test", limit=30)
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert len(omniglot_store.read_split("test", limit=7)) == 7


def test_training_index_columns_are_compact(omniglot_store):
    fields = {f["name"]: f["dtype"] for f in omniglot_store.manifest["splits"]["train"]["fields"]}
    assert fields == {"classes": "u2", "rotation": "u1", "images": "u1"}


# strictness ------------------------------------------------------------------------------------


@pytest.fixture
def damaged(sinusoid_store, tmp_path):
    """A fresh copy of the sinusoid store to damage."""
    shutil.copytree(sinusoid_store.path, tmp_path / "copy")
    return tmp_path / "copy"


def read_everything(path):
    store = open_store(str(path))
    store.verify()
    for split in ("train", "val", "test"):
        store.read_split(split)


def edit_manifest(path, change):
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_missing_shard(damaged):
    (damaged / "train" / "part-00001.parquet").unlink()
    with pytest.raises(StoreError, match="train/part-00001.parquet: missing \\(listed in manifest.json\\)"):
        read_everything(damaged)


def test_truncated_shard(damaged):
    shard = damaged / "val" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(StoreError, match="val/part-00000.parquet: checksum mismatch .* truncated or altered"):
        read_everything(damaged)


def test_flipped_byte_in_a_shard_is_caught_by_the_reader(damaged):
    shard = damaged / "train" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    reader = open_store(str(damaged)).reader("train", 16)
    with pytest.raises(StoreError, match="train/part-00000.parquet: checksum mismatch"):
        next(reader)


def test_schema_mismatch(damaged):
    shard = damaged / "test" / "part-00000.parquet"
    table = pq.read_table(shard).rename_columns(["support_x", "support_y", "query_x", "answer", "amplitude", "phase"])
    pq.write_table(table, shard)
    digest = sha256_hex(shard.read_bytes())
    edit_manifest(damaged, lambda m: m["splits"]["test"]["shards"][0].update(sha256=digest))
    with pytest.raises(StoreError, match="test/part-00000.parquet: schema mismatch: file has columns .*answer"):
        read_everything(damaged)


def test_shard_rows_differ_from_the_manifest(damaged):
    def shrink(m):
        m["splits"]["train"]["shards"][2]["rows"] = 400
        m["splits"]["train"]["episodes"] = 2400

    edit_manifest(damaged, shrink)
    with pytest.raises(StoreError, match="train/part-00002.parquet: manifest mismatch: file has 500 episodes"):
        read_everything(damaged)


def test_split_total_differs_from_its_shards(damaged):
    edit_manifest(damaged, lambda m: m["splits"]["val"].update(episodes=301))
    with pytest.raises(StoreError, match="manifest.json: split val lists 301 episodes but its shards hold 300"):
        open_store(str(damaged))


def test_unknown_schema_version(damaged):
    edit_manifest(damaged, lambda m: m.update(schema_version=99))
    with pytest.raises(StoreError, match="manifest.json: schema version 99, this code reads version 1"):
        open_store(str(damaged))


def test_manifest_that_is_not_json(damaged):
    (damaged / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest.json: not valid JSON"):
        open_store(str(damaged))


def test_altered_image_table(tmp_path, omniglot_store):
    shutil.copytree(omniglot_store.path, tmp_path / "copy")
    table = tmp_path / "copy" / "images.parquet"
    data = bytearray(table.read_bytes())
    data[1000] ^= 0xFF
    table.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="images.parquet: checksum mismatch"):
        next(open_store(str(tmp_path / "copy")).reader("train", 4))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_any_damage_to_a_shard_is_a_store_error(sinusoid_store, data):
    source = Path(sinusoid_store.path) / "val" / "part-00000.parquet"
    original = source.read_bytes()
    kind = data.draw(st.sampled_from(["flip", "truncate", "append"]))
    damaged = bytearray(original)
    if kind == "flip":
        # distinct positions: two flips of one byte by the same mask would cancel out
        for position in data.draw(st.lists(st.integers(0, len(original) - 1), min_size=1, max_size=4, unique=True)):
            damaged[position] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        damaged = damaged[: data.draw(st.integers(0, len(original) - 1))]
    else:
        damaged += data.draw(st.binary(min_size=1, max_size=64))
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "s"
        shutil.copytree(sinusoid_store.path, copy)
        (copy / "val" / "part-00000.parquet").write_bytes(bytes(damaged))
        with pytest.raises(StoreError, match="val/part-00000.parquet"):
            open_store(str(copy)).read_split("val")


def test_shard_entry_without_checksum(damaged):
    edit_manifest(damaged, lambda m: m["splits"]["train"]["shards"][0].pop("sha256"))
    with pytest.raises(StoreError, match="manifest.json: a shard entry of split train lacks file, rows or sha256"):
        open_store(str(damaged))


def test_asking_for_more_episodes_than_a_split_holds_warns_with_both_numbers(sinusoid_store):
    held = sinusoid_store.episodes("val")
    with pytest.warns(UserWarning, match=f"asked for {held + 5} val episodes, .* holds {held}: using {held}"):
        assert len(sinusoid_store.read_split("val", limit=held + 5)) == held
    with pytest.raises(ValueError, match="val episodes: ask for at least 1, got 0"):
        sinusoid_store.read_split("val", limit=0)
