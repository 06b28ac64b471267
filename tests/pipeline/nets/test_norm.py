"""Batch-norm modes: in ``support`` mode a query's output does not depend on the other queries of the call."""
from __future__ import annotations

import pytest
import torch

from pipeline.algorithms.maml import MAML
from pipeline.algorithms.meta_lstm import MetaLSTM
from pipeline.algorithms.reptile import Reptile
from pipeline.nets.conv4 import Conv4
from pipeline.nets.norm import query_outputs

DT = torch.float64


def task(seed: int, shots: int = 4, queries: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    support_x = torch.rand(shots, 1, 16, 16, generator=gen, dtype=DT)
    query_x = torch.rand(queries, 1, 16, 16, generator=gen, dtype=DT) * 3  # other statistics than the support's
    return support_x, torch.arange(shots) % 2, query_x


def one_at_a_time(predict, query_x: torch.Tensor) -> torch.Tensor:
    return torch.cat([predict(query_x[i : i + 1]) for i in range(len(query_x))])


@pytest.mark.parametrize("downsample", ["stride", "maxpool"])
def test_support_mode_normalizes_queries_with_the_support_statistics(downsample):
    support_x, _, query_x = task(0)
    net = Conv4(1, 16, 2, filters=3, downsample=downsample, norm="support")
    params = net.init(0, DT)
    both = net.apply_tasks(params, torch.cat([support_x, query_x])[None], stats=len(support_x))[0]
    # the support rows are normalized by their own statistics: the transductive support pass
    torch.testing.assert_close(both[: len(support_x)], net.apply(params, support_x), rtol=0, atol=1e-12)
    out = query_outputs(net, params, support_x[None], query_x[None])[0]
    torch.testing.assert_close(out, both[len(support_x):], rtol=0, atol=1e-12)
    alone = torch.cat([query_outputs(net, params, support_x[None], query_x[None, i : i + 1])[0] for i in range(6)])
    torch.testing.assert_close(alone, out, rtol=0, atol=1e-12)


LEARNERS = {
    "maml": lambda norm: MAML(Conv4(1, 16, 2, filters=3, norm=norm), "cross_entropy", inner_lr=0.4, inner_steps=2),
    "reptile": lambda norm: Reptile(Conv4(1, 16, 2, filters=3, norm=norm), "cross_entropy", inner_lr=0.4, inner_steps=2),
    # the Meta-LSTM's own setting (eval_norm, as its authors' code): running statistics or the queries' batch
    "meta_lstm": lambda norm: MetaLSTM(
        Conv4(1, 16, 2, filters=3), inner_steps=2, hidden=3, eval_norm="running" if norm == "support" else "batch", dtype=DT
    ),
}


@pytest.mark.parametrize("name", list(LEARNERS))
def test_with_support_norm_one_query_at_a_time_predicts_what_all_at_once_does(name):
    support_x, support_y, query_x = task(1)
    support, transductive = LEARNERS[name]("support"), LEARNERS[name]("transductive")
    params = support.init(0) if name == "meta_lstm" else support.init(0, DT)
    predict = support.adapt(params, support_x, support_y)
    torch.testing.assert_close(one_at_a_time(predict, query_x), predict(query_x), rtol=0, atol=1e-10)
    # the transductive mode's single-query outputs are not the batched ones (what support mode fixes)
    batch_dependent = transductive.adapt(params, support_x, support_y)
    assert not torch.allclose(one_at_a_time(batch_dependent, query_x), batch_dependent(query_x), atol=1e-3)


def test_conv4_refuses_an_unknown_norm_mode():
    with pytest.raises(ValueError, match="'batch'"):
        Conv4(1, 16, 2, norm="batch")
