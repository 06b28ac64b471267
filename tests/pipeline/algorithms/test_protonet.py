"""Prototypical Networks against a hand-written reference (float64): the authors' loss over a hand-written encoder."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.algorithms.protonet import ProtoNet
from pipeline.nets.conv4 import Conv4
from tasks.episodes import Episodes

DT = torch.float64
WAYS, SHOTS, QUERIES = 3, 2, 4


def hand_encoder(p: dict, x: torch.Tensor, downsample: str, stats: int | None = None) -> torch.Tensor:
    """4 x (3x3 conv, batch-norm, ReLU, [2x2 max-pool]), then flatten or the spatial mean.

    Batch-norm statistics over this batch, or over its first ``stats`` rows (the support set).
    """
    for i in range(4):
        x = F.conv2d(x, p[f"conv{i}.weight"], stride=2 if downsample == "stride" else 1, padding=1)
        mean = x[:stats].mean(dim=(0, 2, 3), keepdim=True)
        var = ((x[:stats] - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
        x = (x - mean) / torch.sqrt(var + 1e-5) * p[f"bn{i}.weight"][:, None, None] + p[f"bn{i}.bias"][:, None, None]
        x = torch.relu(x)
        if downsample == "maxpool":
            x = F.max_pool2d(x, 2)
    return x.mean(dim=(2, 3)) if downsample == "stride" else x.flatten(1)


def reference_loss(
    p: dict, xs: torch.Tensor, xq: torch.Tensor, downsample: str, norm: str = "transductive"
) -> tuple[torch.Tensor, torch.Tensor]:
    """jakesnell/prototypical-networks ``Protonet.loss``: xs[n_class, n_support, ...], xq[n_class, n_query, ...].

    ``norm="support"``: batch-norm statistics of the support rows only (the reference's are the whole batch's).
    """
    n_class, n_support, n_query = xs.shape[0], xs.shape[1], xq.shape[1]
    target = torch.arange(n_class).view(n_class, 1, 1).expand(n_class, n_query, 1)
    stats = n_class * n_support if norm == "support" else None
    z = hand_encoder(p, torch.cat([xs.flatten(0, 1), xq.flatten(0, 1)]), downsample, stats)
    z_proto = z[: n_class * n_support].view(n_class, n_support, -1).mean(1)
    zq = z[n_class * n_support :]
    dists = ((zq.unsqueeze(1) - z_proto.unsqueeze(0)) ** 2).sum(2)  # euclidean_dist: squared
    log_p_y = F.log_softmax(-dists, dim=1).view(n_class, n_query, -1)
    return -log_p_y.gather(2, target).squeeze(-1).view(-1).mean(), log_p_y.argmax(2)


def episodes(tasks: int, size: int, seed: int) -> tuple[Episodes, torch.Tensor, torch.Tensor]:
    """Class-major episodes (labels 0..N-1, each K or Q times, as the store lays them out) and the same images
    shaped ``[T, n_class, shots, ...]`` for the reference."""
    gen = torch.Generator().manual_seed(seed)
    xs = torch.rand(tasks, WAYS, SHOTS, 1, size, size, generator=gen, dtype=DT)
    xq = torch.rand(tasks, WAYS, QUERIES, 1, size, size, generator=gen, dtype=DT)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS).expand(tasks, -1)
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES).expand(tasks, -1)
    return Episodes(xs.flatten(1, 2), support_y, xq.flatten(1, 2), query_y), xs, xq


NETS = {"maxpool": Conv4(1, 16, WAYS, filters=3, downsample="maxpool"), "stride": Conv4(1, 8, WAYS, filters=3)}


@pytest.mark.parametrize("norm", ["transductive", "support"])
@pytest.mark.parametrize("downsample", sorted(NETS))
def test_loss_and_gradient_match_the_reference(downsample, norm):
    net = dataclasses.replace(NETS[downsample], norm=norm)
    protonet = ProtoNet(net, WAYS)
    params = {k: v.requires_grad_() for k, v in protonet.init(3, DT).items()}
    batch, xs, xq = episodes(2, net.image_size, seed=1)
    grads, metrics = protonet.meta_grad(params, batch)
    parts = [reference_loss(params, xs[t], xq[t], downsample, norm) for t in range(2)]
    expected_loss = torch.stack([p[0] for p in parts]).mean()
    expected = torch.autograd.grad(expected_loss, list(params.values()))
    assert metrics["loss"] == pytest.approx(expected_loss.item(), abs=1e-12)
    accuracy = torch.stack([(p[1] == torch.arange(WAYS)[:, None]).double().mean() for p in parts]).mean()
    assert metrics["accuracy"] == pytest.approx(accuracy.item(), abs=1e-12)
    for (k, g), e in zip(grads.items(), expected):
        assert torch.allclose(g, e, atol=1e-10), k
        assert g.abs().sum() > 0, k  # every trunk parameter gets a gradient


def test_parameters_are_the_conv4_trunk_without_its_head():
    net = NETS["stride"]
    params = ProtoNet(net, WAYS).init(5, DT)
    full = net.init(5, DT)
    assert set(params) == {k for k in full if not k.startswith("head.")}
    assert all(torch.equal(params[k], full[k]) for k in params)


def test_adapt_is_independent_of_the_support_order_and_agrees_with_evaluate():
    net = NETS["maxpool"]
    protonet = ProtoNet(net, WAYS)
    params = protonet.init(0, DT)
    batch, xs, xq = episodes(3, net.image_size, seed=2)
    metrics = protonet.evaluate(params, batch, chunk=2)
    for t in range(3):
        _, expected = reference_loss(params, xs[t], xq[t], "maxpool")
        order = torch.randperm(WAYS * SHOTS, generator=torch.Generator().manual_seed(t))
        predict = protonet.adapt(params, batch.support_x[t][order], batch.support_y[t][order])
        logits = predict(batch.query_x[t])
        assert logits.shape == (WAYS * QUERIES, WAYS)
        assert torch.equal(logits.argmax(-1), expected.flatten())
        correct = (logits.argmax(-1) == batch.query_y[t]).double().mean()
        assert metrics["accuracy"][t].item() == pytest.approx(correct.item(), abs=1e-12)
        loss = F.cross_entropy(logits, batch.query_y[t])
        assert metrics["loss"][t].item() == pytest.approx(loss.item(), abs=1e-10)


def test_support_norm_predicts_each_query_independently_of_the_others():
    support, transductive = (ProtoNet(dataclasses.replace(NETS["maxpool"], norm=n), WAYS) for n in ("support", "transductive"))
    params = support.init(0, DT)
    batch, _, _ = episodes(1, 16, seed=4)
    query_x = batch.query_x[0] * 3  # other statistics than the support's

    def single_and_batched(protonet: ProtoNet) -> tuple[torch.Tensor, torch.Tensor]:
        predict = protonet.adapt(params, batch.support_x[0], batch.support_y[0])
        return torch.cat([predict(query_x[i : i + 1]) for i in range(len(query_x))]), predict(query_x)

    single, batched = single_and_batched(support)
    torch.testing.assert_close(single, batched, rtol=0, atol=1e-10)
    single, batched = single_and_batched(transductive)
    assert not torch.allclose(single, batched, atol=1e-3)


def test_a_class_without_support_is_refused_naming_it():
    net = NETS["stride"]
    protonet = ProtoNet(net, WAYS)
    batch, _, _ = episodes(1, net.image_size, seed=0)
    with pytest.raises(ValueError, match="every one of the 3 classes"):
        protonet.adapt(protonet.init(0, DT), batch.support_x[0], torch.zeros(WAYS * SHOTS, dtype=torch.long))(batch.query_x[0])
    with pytest.raises(ValueError, match="ways must be at least 2"):
        ProtoNet(net, 1)
