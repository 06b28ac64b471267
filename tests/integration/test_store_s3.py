"""The episode store on S3 (moto's server on 127.0.0.1): the same episodes as a local store, damage named."""
from __future__ import annotations

import pytest
import torch

from tasks.errors import StoreError
from tasks.store.parquet import open_store, precompute
from tests.helpers import omniglot_store_config as omniglot_config
from tests.helpers import sinusoid_store_config as sinusoid_config
from tests.helpers import moto_s3, write_omniglot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_omniglot(tmp_path_factory):
    return write_omniglot(tmp_path_factory.mktemp("data"), "torchvision")


@pytest.fixture(scope="module")
def omniglot_store(tmp_path_factory, small_omniglot):
    return precompute(omniglot_config(tmp_path_factory.mktemp("store") / "omni", small_omniglot), progress=False)


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with a bucket ``episodes``; the environment points at it."""
    import boto3

    with moto_s3("episodes") as endpoint:
        yield boto3.client("s3", endpoint_url=endpoint)


def test_s3_store_reads_back_equal_to_a_local_store(s3, tmp_path, small_omniglot, omniglot_store):
    remote = precompute(omniglot_config("s3://episodes/omni", small_omniglot), progress=False)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="episodes", Prefix="omni/")["Contents"]}
    assert {"omni/manifest.json", "omni/images.parquet", "omni/train/part-00001.parquet"} <= keys
    assert not [k for k in keys if ".tmp-" in k]
    opened = open_store("s3://episodes/omni")
    assert opened.verify() == {"train": 1500, "val": 20, "test": 30}
    for split in ("train", "test"):
        a, b = opened.read_split(split), omniglot_store.read_split(split)
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    with opened.reader("train", 32, worker=1, num_workers=2) as reader:
        assert next(reader).support_x.shape == (32, 5, 1, 28, 28)
    assert precompute(omniglot_config("s3://episodes/omni", small_omniglot), progress=False).manifest == remote.manifest


def test_s3_damaged_shard_is_a_store_error(s3, tmp_path):
    precompute(sinusoid_config("s3://episodes/sin"), progress=False)
    s3.put_object(Bucket="episodes", Key="sin/train/part-00000.parquet", Body=b"PAR1 nonsense")
    with pytest.raises(StoreError, match="s3://episodes/sin/train/part-00000.parquet: checksum mismatch"):
        open_store("s3://episodes/sin").read_split("train", limit=10)
    s3.delete_object(Bucket="episodes", Key="sin/val/part-00000.parquet")
    with pytest.raises(StoreError, match="s3://episodes/sin/val/part-00000.parquet: missing"):
        open_store("s3://episodes/sin").read_split("val")
