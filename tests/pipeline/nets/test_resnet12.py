"""ResNet-12 (MetaOptNet / learn2learn form) through the module path: its shape, and one second-order MAML step on a CPU."""
from __future__ import annotations

import torch

from pipeline.algorithms.maml import MAML
from pipeline.algorithms.meta_lstm import MetaLSTM
from pipeline.build import build_learner
from pipeline.config import validate
from pipeline.nets.module import ModuleNet
from pipeline.nets.resnet12 import DropBlock, ResNet12
from tasks.episodes import Episodes


def test_the_papers_widths_and_parameter_count():
    net = ResNet12(3, 5)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert [c.out_channels for c in convs] == [64] * 3 + [160] * 3 + [320] * 3 + [640] * 3
    assert sum(p.numel() for p in net.parameters()) == 12_427_525  # learn2learn's ResNet-12 (wider), 5-way head
    assert net(torch.rand(2, 3, 84, 84)).shape == (2, 5)


def test_one_second_order_maml_step_on_a_cpu_with_tiny_inputs():
    config = validate({
        "task": {"name": "miniimagenet", "ways": 2, "shots": 1, "queries": 1, "image_size": 16},
        "store": {"path": "unused"}, "model": {"network": "resnet12"}, "algorithm": {"inner_lr": 0.01, "batching": "loop"},
    })
    maml: MAML = build_learner(config)
    params = {k: v.requires_grad_() for k, v in maml.init(0).items()}
    gen = torch.Generator().manual_seed(0)
    episodes = Episodes(torch.rand(1, 2, 3, 16, 16, generator=gen), torch.tensor([[0, 1]]),
                        torch.rand(1, 2, 3, 16, 16, generator=gen), torch.tensor([[1, 0]]))
    grads, metrics = maml.meta_grad(params, episodes)
    assert grads.keys() == params.keys() and metrics["loss"] > 0
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["blocks.0.conv1.weight"].abs().max() > 0  # the meta-gradient reaches the first block


def test_dropblock_drops_squares_in_training_only():
    x = torch.ones(2, 3, 8, 8)
    block = DropBlock(0.3, 3)
    torch.manual_seed(0)
    dropped = block(x)
    assert (dropped == 0).any() and abs(dropped.mean().item() - 1) < 1e-5  # kept units rescaled: the mean stays
    assert torch.equal(block.eval()(x), x) and torch.equal(DropBlock(0.0, 3)(x), x)


def dropblock_learners(drop_prob: float) -> tuple[MAML, MetaLSTM]:
    """MAML and the Meta-LSTM over a tiny ResNet-12 whose DropBlock drops half of blocks 3 and 4 (or nothing)."""
    kwargs = {"in_channels": 1, "ways": 2, "widths": [2, 2, 2, 2], "drop_prob": drop_prob, "block_size": 2}
    network = ModuleNet("pipeline.nets.resnet12:ResNet12", kwargs)
    maml = MAML(network, "cross_entropy", inner_lr=0.1, inner_steps=1, batching="loop")
    return maml, MetaLSTM(network, inner_steps=1, hidden=2, eval_norm="batch", dtype=torch.float64)


def test_dropblock_is_on_in_meta_training_and_off_at_evaluation_and_prediction():
    (maml, meta_lstm), (plain_maml, plain_meta_lstm) = dropblock_learners(0.5), dropblock_learners(0.0)
    gen = torch.Generator().manual_seed(0)
    episodes = Episodes(torch.rand(2, 4, 1, 16, 16, generator=gen, dtype=torch.float64), torch.tensor([[0, 1, 0, 1]] * 2),
                        torch.rand(2, 4, 1, 16, 16, generator=gen, dtype=torch.float64), torch.tensor([[0, 1, 1, 0]] * 2))
    params = {k: v.requires_grad_() for k, v in maml.init(0, torch.float64).items()}
    losses = set()
    for seed in (1, 2):  # meta-training draws its blocks
        torch.manual_seed(seed)
        losses.add(maml.meta_loss(params, episodes)[0].item())
    assert len(losses) == 2
    # evaluation and a user's predictions: deterministic, exactly those of the same weights without DropBlock
    for seed in (1, 2):
        torch.manual_seed(seed)
        metrics, plain = maml.evaluate(params, episodes), plain_maml.evaluate(params, episodes)
        assert all(torch.equal(metrics[k], plain[k]) for k in plain)
        predict = maml.adapt(params, episodes.support_x[0], episodes.support_y[0])
        expected = plain_maml.adapt(params, episodes.support_x[0], episodes.support_y[0])(episodes.query_x[0])
        assert torch.equal(predict(episodes.query_x[0]), expected)
    lstm_params = meta_lstm.init(0)
    predict = meta_lstm.adapt(lstm_params, episodes.support_x[0], episodes.support_y[0])
    expected = plain_meta_lstm.adapt(lstm_params, episodes.support_x[0], episodes.support_y[0])(episodes.query_x[0])
    assert torch.equal(predict(episodes.query_x[0]), expected)
    assert maml.network.module.training  # the shared module's mode is restored after each pass
