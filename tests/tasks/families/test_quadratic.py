import numpy as np
import torch

from tasks.families import quadratic
from tasks.families.quadratic import QuadraticTask


def test_w_and_y_are_standard_normal():
    fields = quadratic.sample(QuadraticTask(dim=10), np.random.default_rng(0), 5000)
    w, y = fields["W"], fields["y"]
    assert w.shape == (5000, 10, 10) and y.shape == (5000, 10)
    assert w.dtype == np.float32 and y.dtype == np.float32
    for values in (w.reshape(-1), y.reshape(-1)):
        assert abs(values.mean()) < 0.02 and abs(values.std() - 1.0) < 0.02
        assert abs((values**3).mean()) < 0.06 and abs((values**4).mean() - 3.0) < 0.1
    # entries are independent: correlation between two entries of W is near zero
    assert abs(np.corrcoef(w[:, 0, 0], w[:, 3, 7])[0, 1]) < 0.05


def test_dim_sets_the_shapes():
    fields = quadratic.sample(QuadraticTask(dim=3), np.random.default_rng(1), 2)
    assert fields["W"].shape == (2, 3, 3) and fields["y"].shape == (2, 3)


def test_decode_puts_w_in_x_and_y_in_y_for_support_and_query():
    fields = quadratic.sample(QuadraticTask(dim=4), np.random.default_rng(2), 3)
    episodes = quadratic.decode(QuadraticTask(dim=4), {k: torch.from_numpy(v) for k, v in fields.items()})
    assert torch.equal(episodes.support_x, torch.from_numpy(fields["W"]))
    assert torch.equal(episodes.support_y, torch.from_numpy(fields["y"]))
    assert torch.equal(episodes.query_x, episodes.support_x) and torch.equal(episodes.query_y, episodes.support_y)
