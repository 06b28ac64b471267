import numpy as np
import pytest
import torch

from tasks import fewshot


@pytest.mark.parametrize("population, size", [(20, 16), (5, 5), (4400, 5), (600, 20)], ids=lambda v: str(v))
def test_distinct_draws_distinct_values_in_range(population, size):
    drawn = fewshot.distinct(np.random.default_rng(0), np.full(3000, population), size)
    assert drawn.shape == (3000, size)
    assert drawn.min() >= 0 and drawn.max() < population
    assert all(len(set(row)) == size for row in drawn)


def test_distinct_is_uniform_over_values_and_positions():
    drawn = fewshot.distinct(np.random.default_rng(1), np.full(60000, 10), 3)
    # every value equally likely at every position: 60000 / 10 = 6000 each
    for position in range(3):
        counts = np.bincount(drawn[:, position], minlength=10)
        assert np.all(np.abs(counts - 6000) < 400), counts
    # every ordered pair equally likely: 60000 / 90 = 667 each
    pairs = np.bincount(drawn[:, 0] * 10 + drawn[:, 1], minlength=100).reshape(10, 10)
    off_diagonal = pairs[~np.eye(10, dtype=bool)]
    assert np.all(np.abs(off_diagonal - 667) < 150) and np.all(np.diag(pairs) == 0)


def test_distinct_accepts_a_population_per_row():
    drawn = fewshot.distinct(np.random.default_rng(2), np.array([3, 10, 600]), 3)
    assert sorted(drawn[0]) == [0, 1, 2] and drawn[1].max() < 10


def test_distinct_refuses_a_too_small_population():
    with pytest.raises(ValueError, match="cannot draw 6 distinct items from a population of 5"):
        fewshot.distinct(np.random.default_rng(0), np.array([5]), 6)


CLASS_IDS = np.array([3, 4, 7, 9, 10, 11, 15])
SIZES = np.array([20, 20, 18, 20, 19, 20, 20])


def sample(count=4000, ways=5, shots=2, queries=3, rotations=True):
    return fewshot.sample(np.random.default_rng(3), CLASS_IDS, SIZES, count, ways, shots, queries, rotations)


def test_episodes_have_distinct_classes_and_no_query_image_in_the_support_set():
    fields = sample()
    assert fields["classes"].shape == (4000, 5) and fields["images"].shape == (4000, 5, 5)
    pairs = fields["classes"].astype(int) * 4 + fields["rotation"]
    assert all(len(set(row)) == 5 for row in pairs)
    assert set(np.unique(fields["classes"])) <= set(CLASS_IDS)
    size_of = dict(zip(CLASS_IDS, SIZES))
    for classes, images in zip(fields["classes"][:500], fields["images"][:500]):
        for cls, positions in zip(classes, images):
            assert len(set(positions)) == 5 and positions.max() < size_of[cls]
            assert not set(positions[:2]) & set(positions[2:])


def test_classes_and_rotations_are_balanced_and_labels_shuffled():
    fields = sample(count=7000, rotations=True)
    counts = np.bincount(fields["classes"].reshape(-1), minlength=16)[CLASS_IDS]
    assert np.all(np.abs(counts - 5000) < 300), counts  # 7000 * 5 / 7 per class
    assert np.all(np.abs(np.bincount(fields["rotation"].reshape(-1)) - 8750) < 350)
    # label 0 (first position) goes to every class equally often: labels are shuffled per episode
    first = np.bincount(fields["classes"][:, 0], minlength=16)[CLASS_IDS]
    assert np.all(np.abs(first - 1000) < 150), first


def test_without_rotations_every_rotation_is_zero():
    assert not sample(count=100, rotations=False)["rotation"].any()


def test_sampler_refuses_impossible_episodes():
    with pytest.raises(ValueError, match="8-way episodes need 8 classes, the split has 7"):
        sample(ways=8, rotations=False)
    with pytest.raises(ValueError, match="class 7 has 18 images, fewer than shots \\+ queries = 19"):
        sample(shots=1, queries=18)


def test_gather_turns_each_class_and_keeps_label_order():
    table = torch.arange(20 * 1 * 3 * 3, dtype=torch.uint8).reshape(20, 1, 3, 3)
    starts = torch.tensor([0, 5, 10, 15])
    fields = {
        "classes": torch.tensor([[2, 0]]),
        "rotation": torch.tensor([[1, 3]], dtype=torch.uint8),
        "images": torch.tensor([[[4, 0, 1], [2, 3, 1]]], dtype=torch.uint8),
    }
    support, query = fewshot.gather(fields, table, starts, shots=1)
    assert support.shape == (1, 2, 1, 3, 3) and query.shape == (1, 4, 1, 3, 3)
    assert torch.equal(support[0, 0], torch.rot90(table[14], 1, dims=(-2, -1)))
    assert torch.equal(support[0, 1], torch.rot90(table[2], 3, dims=(-2, -1)))
    assert torch.equal(query[0, 0], torch.rot90(table[10], 1, dims=(-2, -1)))
    assert torch.equal(query[0, 3], torch.rot90(table[1], 3, dims=(-2, -1)))


def test_to_episodes_labels_each_class_k_times():
    support, query = torch.rand(2, 6, 1, 2, 2), torch.rand(2, 9, 1, 2, 2)
    episodes = fewshot.to_episodes(support, query, ways=3)
    assert episodes.support_x is support and episodes.query_x is query
    assert episodes.support_y.tolist() == [[0, 0, 1, 1, 2, 2]] * 2
    assert episodes.query_y.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2]] * 2
    assert episodes.support_y.dtype == torch.int64
