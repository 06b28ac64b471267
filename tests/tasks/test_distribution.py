import numpy as np
import pytest
import torch

from tasks.distribution import TaskDistribution
from tasks.families.quadratic import QuadraticTask
from tasks.families.sinusoid import SinusoidTask
from tests.helpers import small_omniglot_task


@pytest.fixture(scope="module")
def omniglot(small_omniglot):
    return TaskDistribution.load(small_omniglot_task(small_omniglot))


def test_layouts(omniglot):
    assert omniglot.layout("train", eval_pixels=True) == "indices"
    assert omniglot.layout("test", eval_pixels=True) == "pixels"
    assert omniglot.layout("val", eval_pixels=False) == "indices"
    assert TaskDistribution.load(SinusoidTask()).layout("train", eval_pixels=True) == "arrays"


def test_pixel_fields_decode_to_the_same_episodes_as_index_fields(omniglot):
    fields = omniglot.sample("val", np.random.default_rng(4), 6, layout="pixels")
    tensors = {k: torch.from_numpy(v) for k, v in fields.items()}
    from_pixels = omniglot.decode(tensors, "pixels")
    from_indices = omniglot.decode({k: tensors[k] for k in ("classes", "rotation", "images")}, "indices")
    for name in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(from_pixels, name), getattr(from_indices, name))
    assert fields["support_x"].dtype == np.uint8 and fields["support_x"].shape == (6, 5, 1, 28, 28)


def test_on_the_fly_episodes_show_the_sampled_images_turned(omniglot):
    fields = omniglot.sample("train", np.random.default_rng(0), 7)
    episodes = omniglot.decode({k: torch.from_numpy(v) for k, v in fields.items()}, "indices")
    assert episodes.support_x.shape == (7, 5, 1, 28, 28) and episodes.query_x.shape == (7, 10, 1, 28, 28)
    assert episodes.support_y.tolist()[0] == [0, 1, 2, 3, 4]
    assert torch.equal(omniglot.episodes("train", np.random.default_rng(0), 7).query_x, episodes.query_x)
    table, starts = omniglot.table.pixels, omniglot.table.starts
    for b in range(7):
        for c in range(5):
            row = starts[fields["classes"][b, c]] + fields["images"][b, c]
            turned = np.rot90(table[row], int(fields["rotation"][b, c]), axes=(-2, -1)) / 255.0
            assert np.allclose(episodes.support_x[b, c].numpy(), turned[0])
            assert np.allclose(episodes.query_x[b, 2 * c : 2 * c + 2].numpy(), turned[1:])


def test_regression_distributions_need_no_table():
    episodes = TaskDistribution.load(QuadraticTask(dim=3)).episodes("train", np.random.default_rng(0), 2)
    assert episodes.support_x.shape == (2, 3, 3)
