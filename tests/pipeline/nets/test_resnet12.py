"""ResNet-12 (MetaOptNet / learn2learn form) through the module path: its shape, and one second-order MAML step on a CPU."""
from __future__ import annotations

import torch

from pipeline.algorithms.maml import MAML
from pipeline.build import build_learner
from pipeline.config import validate
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
