"""One evaluation path: a learner's batched ``evaluate`` gives the scores of adapting to each episode alone."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.algorithms.maml import MAML
from pipeline.algorithms.reptile import Reptile
from pipeline.evaluation import evaluate, mean_ci95, score, scores
from pipeline.nets.conv4 import Conv4
from pipeline.nets.mlp import MLP
from tasks.distribution import TaskDistribution
from tasks.episodes import Episodes
from tasks.families.sinusoid import SinusoidTask
from tasks.fewshot import labels


def one_at_a_time(learner, params, episodes: Episodes) -> list[float]:
    """The reference: ``adapt`` to each episode's support set alone, score its queries."""
    out = []
    for i in range(len(episodes)):
        e = episodes[i]
        predict = learner.adapt(params, e.support_x[0], e.support_y[0])
        out.append(score(predict(e.query_x[0]), e.query_y[0]))
    return out


def image_episodes(count: int, ways: int = 3, shots: int = 2, queries: int = 4) -> Episodes:
    gen = torch.Generator().manual_seed(0)
    return Episodes(
        torch.rand(count, ways * shots, 1, 12, 12, generator=gen), labels(count, ways, shots),
        torch.rand(count, ways * queries, 1, 12, 12, generator=gen), labels(count, ways, queries),
    )


@pytest.mark.parametrize(
    "learner",
    [
        MAML(Conv4(1, 12, 3, filters=4), "cross_entropy", inner_lr=0.5, inner_steps=2, batching="stacked"),
        Reptile(Conv4(1, 12, 3, filters=4), "cross_entropy", inner_lr=0.5, inner_steps=2),
    ],
    ids=["maml-conv4", "reptile-conv4"],
)
def test_batched_scores_equal_adapting_to_each_episode_alone(learner):
    episodes = image_episodes(5)
    params = learner.init(3)
    assert scores(learner, params, episodes) == one_at_a_time(learner, params, episodes)


def test_regression_scores_are_the_mse_of_each_episode():
    learner = MAML(MLP((1, 16, 1)), "mse", inner_lr=0.01, inner_steps=3)
    episodes = TaskDistribution.load(SinusoidTask()).episodes("test", np.random.default_rng(0), 6)
    params = learner.init(0)
    assert scores(learner, params, episodes) == pytest.approx(one_at_a_time(learner, params, episodes), rel=1e-5)
    result = evaluate(learner, params, episodes)
    assert result.metric == "mse" and result.n == 6


def test_interval_of_one_value_is_undefined():
    mean, ci = mean_ci95([0.5])
    assert mean == 0.5 and math.isnan(ci)


def test_one_episode_has_no_interval_and_says_so():
    from pipeline.evaluation import EvalResult

    assert str(EvalResult("accuracy", 0.8, float("nan"), 1)) == "accuracy 80.00% (1 episode: no 95% interval)"
    assert "nan" not in str(EvalResult("mse", 0.25, float("nan"), 1))
