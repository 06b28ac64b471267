import math

import numpy as np
import pytest
import torch

from tasks.families import sinusoid
from tasks.families.sinusoid import SinusoidTask


@pytest.fixture(scope="module")
def fields() -> dict[str, np.ndarray]:
    return sinusoid.sample(SinusoidTask(shots=5, queries=7), np.random.default_rng(0), 20000)


def test_shapes_and_dtypes(fields):
    assert fields["support_x"].shape == (20000, 5, 1) and fields["query_x"].shape == (20000, 7, 1)
    assert fields["support_y"].shape == (20000, 5, 1) and fields["query_y"].shape == (20000, 7, 1)
    assert all(v.dtype == np.float32 for v in fields.values())


def test_parameter_and_input_ranges_match_the_maml_paper(fields):
    amplitude, phase = fields["amplitude"], fields["phase"]
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    x = np.concatenate([fields["support_x"], fields["query_x"]], axis=1)
    assert -5.0 <= x.min() and x.max() <= 5.0
    # uniform: mean and spread of U[a, b]
    assert abs(amplitude.mean() - 2.55) < 0.05 and abs(amplitude.std() - 4.9 / math.sqrt(12)) < 0.05
    assert abs(phase.mean() - math.pi / 2) < 0.03
    assert abs(x.mean()) < 0.05 and abs(x.std() - 10 / math.sqrt(12)) < 0.05


def test_targets_are_the_task_sinusoid(fields):
    a, p = fields["amplitude"][:, None, None], fields["phase"][:, None, None]
    for x, y in (("support_x", "support_y"), ("query_x", "query_y")):
        np.testing.assert_allclose(fields[y], a * np.sin(fields[x] - p), atol=1e-5)


def test_same_generator_state_same_tasks():
    task = SinusoidTask()
    a = sinusoid.sample(task, np.random.default_rng(7), 10)
    b = sinusoid.sample(task, np.random.default_rng(7), 10)
    c = sinusoid.sample(task, np.random.default_rng(8), 10)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["support_x"], c["support_x"])


def test_decode_gives_regression_episodes(fields):
    episodes = sinusoid.decode(SinusoidTask(), {k: torch.from_numpy(v[:4]) for k, v in fields.items()})
    assert episodes.support_x.shape == (4, 5, 1) and episodes.query_y.shape == (4, 7, 1)
    assert torch.equal(episodes.query_y, torch.from_numpy(fields["query_y"][:4]))
