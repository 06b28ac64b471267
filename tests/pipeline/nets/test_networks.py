"""The functional networks: deterministic init, stacked == per-task, per-task BatchNorm."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.nets.networks import MLP, Conv4, _batch_norm_tasks

DT = torch.float64


def small_conv4(downsample: str = "stride") -> Conv4:
    return Conv4(in_channels=2, image_size=8 if downsample == "stride" else 16, ways=3, filters=4, downsample=downsample)


def images(conv: Conv4, tasks: int, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(tasks, n, conv.in_channels, conv.image_size, conv.image_size, generator=gen, dtype=DT)


@pytest.mark.parametrize("net", [MLP((1, 40, 40, 1)), small_conv4()], ids=["mlp", "conv4"])
def test_init_is_deterministic_in_the_seed(net):
    a, b, c = net.init(3, DT), net.init(3, DT), net.init(4, DT)
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_parameter_names_and_shapes():
    conv = Conv4(1, 28, 5)
    params = conv.init(0)
    assert params["conv0.weight"].shape == (64, 1, 3, 3)
    assert params["bn3.weight"].shape == (64,)
    assert params["head.weight"].shape == (5, 64)
    assert set(MLP((1, 40, 40, 1)).init(0)) == {f"layer{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    mini = Conv4(3, 84, 5, filters=32, downsample="maxpool")
    assert mini.init(0)["head.weight"].shape == (5, 32 * 5 * 5)
    assert mini.apply(mini.init(0), torch.rand(2, 3, 84, 84)).shape == (2, 5)


def reference_conv4(conv: Conv4, params: dict, x: torch.Tensor) -> torch.Tensor:
    """Conv4 of one task written out with the textbook BatchNorm."""
    stride = 2 if conv.downsample == "stride" else 1
    for i in range(4):
        x = F.conv2d(x, params[f"conv{i}.weight"], stride=stride, padding=1)
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        x = (x - mean) / torch.sqrt(var + conv.eps)
        x = F.relu(x * params[f"bn{i}.weight"].view(1, -1, 1, 1) + params[f"bn{i}.bias"].view(1, -1, 1, 1))
        if conv.downsample == "maxpool":
            x = F.max_pool2d(x, 2)
    x = x.mean(dim=(2, 3)) if conv.downsample == "stride" else x.flatten(1)
    return x @ params["head.weight"].T + params["head.bias"]


def perturbed(params: dict, tasks: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.1 * torch.randn(tasks, *v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}


@pytest.mark.parametrize("downsample", ["stride", "maxpool"])
def test_conv4_matches_textbook_and_batch_norm(downsample):
    conv = small_conv4(downsample)
    params = perturbed(conv.init(0, DT), 1, seed=1)
    params = {k: v[0] for k, v in params.items()}
    x = images(conv, 1, 6)[0]
    out = conv.apply(params, x)
    assert torch.allclose(out, reference_conv4(conv, params, x), atol=1e-12)
    h = F.conv2d(x, params["conv0.weight"], stride=2 if downsample == "stride" else 1, padding=1)
    native = F.batch_norm(h, None, None, params["bn0.weight"], params["bn0.bias"], training=True, eps=conv.eps)
    mine = _batch_norm_tasks(h[None], params["bn0.weight"], params["bn0.bias"], conv.eps)[0]
    assert torch.allclose(mine, native, atol=1e-10)


@pytest.mark.parametrize("net", [MLP((1, 8, 8, 2)), small_conv4(), small_conv4("maxpool")], ids=["mlp", "stride", "pool"])
def test_stacked_tasks_equal_one_task_at_a_time(net):
    tasks = 3
    x = images(net, tasks, 5) if isinstance(net, Conv4) else torch.rand(tasks, 5, 1, dtype=DT)
    shared = net.init(0, DT)
    per_task = perturbed(shared, tasks, seed=2)
    stacked_shared = net.apply_tasks(shared, x)
    stacked_own = net.apply_tasks(per_task, x)
    for t in range(tasks):
        assert torch.allclose(stacked_shared[t], net.apply(shared, x[t]), atol=1e-12)
        own = {k: v[t] for k, v in per_task.items()}
        assert torch.allclose(stacked_own[t], net.apply(own, x[t]), atol=1e-12)


@pytest.mark.parametrize("mode", ["shared", "per_task"])
def test_batch_norm_uses_each_tasks_own_statistics(mode):
    conv = small_conv4()
    params = conv.init(0, DT) if mode == "shared" else perturbed(conv.init(0, DT), 3, seed=3)
    x = images(conv, 3, 4)
    changed = x.clone()
    changed[1] = changed[1] * 5 + 2
    before, after = conv.apply_tasks(params, x), conv.apply_tasks(params, changed)
    assert torch.allclose(before[0], after[0], atol=1e-12) and torch.allclose(before[2], after[2], atol=1e-12)
    assert not torch.allclose(before[1], after[1])


def test_conv4_refuses_images_too_small_for_its_pooling():
    with pytest.raises(ValueError, match="too small"):
        Conv4(1, 8, 5, downsample="maxpool")
