"""The digits optimizee data: bundled sklearn images, a fixed split, index episodes decoded back."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.errors import DatasetError
from tasks.families import digits
from tasks.families.digits import DigitsTask


def test_images_are_flat_and_scaled_to_unit_range() -> None:
    x, y = digits.load_images(DigitsTask())
    assert x.shape == (1797, 64) and x.dtype == torch.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10))
    assert digits.feature_count(DigitsTask()) == 64


def test_split_is_fixed_disjoint_and_complete() -> None:
    task = DigitsTask(test_fraction=0.25, split_seed=3)
    x_train, _, x_test, _ = digits.split(task)
    again = digits.split(DigitsTask(test_fraction=0.25, split_seed=3))
    assert torch.equal(x_train, again[0])
    assert len(x_train) + len(x_test) == 1797 and len(x_test) == round(1797 * 0.25)
    other = digits.split(DigitsTask(test_fraction=0.25, split_seed=4))
    assert not torch.equal(x_test, other[2])


def test_episodes_decode_from_indices_deterministically() -> None:
    task = DigitsTask(shots=50, queries=20)
    fields = digits.sample(task, np.random.default_rng(0), 3)
    assert fields["support_index"].shape == (3, 50) and fields["query_index"].shape == (3, 20)
    assert all(len(set(row)) == 50 for row in fields["support_index"].tolist())
    batch = digits.decode(task, {k: torch.from_numpy(v) for k, v in fields.items()})
    x_train, y_train, x_test, y_test = digits.split(task)
    assert batch.support_x.shape == (3, 50, 64) and batch.query_y.shape == (3, 20)
    assert torch.equal(batch.support_x[1, 7], x_train[fields["support_index"][1, 7]])
    assert torch.equal(batch.query_y[2], y_test[torch.from_numpy(fields["query_index"][2]).long()])
    again = digits.sample(task, np.random.default_rng(0), 3)
    assert all(np.array_equal(fields[k], again[k]) for k in fields)


def test_out_of_range_indices_name_the_field() -> None:
    task = DigitsTask(shots=5, queries=5)
    fields = {"support_index": torch.tensor([[0, 1, 2, 3, 99999]]), "query_index": torch.zeros(1, 5, dtype=torch.int32)}
    with pytest.raises(ValueError, match="support_index"):
        digits.decode(task, fields)


def test_missing_mnist_names_the_folder(tmp_path) -> None:
    with pytest.raises(DatasetError, match=f"task.data_root: MNIST not found at {tmp_path}"):
        digits.load_images(DigitsTask(source="mnist", data_root=str(tmp_path)))


def test_more_shots_or_queries_than_the_source_holds_is_a_config_error():
    from pipeline.config import validate
    from pipeline.errors import ConfigError

    raw = {"task": {"name": "digits", "shots": 1349}, "store": {"path": "x"}, "algorithm": {"name": "l2l"}}
    with pytest.raises(ConfigError, match="task.shots=1349 and task.queries=200 exceed the 1348 training and 449 held-out"):
        validate(raw)
    validate({**raw, "task": {"name": "digits", "shots": 1348}})
