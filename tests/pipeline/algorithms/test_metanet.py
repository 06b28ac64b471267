"""MetaNet: layer augmentation, memory write and read, hand-written references, learning, config,
and the authors' code's settings (fast weights on every layer, k=7, no normalization, shuffled support)."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.algorithms.fast_weights import (
    attention_read,
    attention_weights,
    augmented_linear,
    lstm_generate,
    mlp_generate,
)
from pipeline.algorithms.metanet import MetaNet, shuffle_support
from pipeline.build import build_learner
from pipeline.config import load_config, validate
from pipeline.errors import ConfigError
from pipeline.nets.lstm import preprocess
from tasks.episodes import Episodes
from tests.pipeline.algorithms.adapted_alone import adapted_alone

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def tiny(ways: int = 5, **kw) -> MetaNet:
    """A MetaNet small enough for a CPU test: 2 blocks of 4 filters (features 4*7*7), widths 8.

    Fast weights on the last layers and GroupNorm unless ``kw`` says otherwise (the reference's
    ``fast_layers="all"`` and ``norm="none"`` have tests of their own below).
    """
    settings = dict(conv_layers=2, filters=4, hidden=8, representation=8, generator_hidden=6, rep_steps=3,
                    fast_layers="last", norm="group")
    return MetaNet(ways=ways, **{**settings, **kw})


def episodes(ways: int, shots: int, queries: int, batch: int, seed: int, dtype=torch.float32) -> Episodes:
    """Learnable synthetic episodes: each class is a random 7x7 binary pattern drawn at 28x28, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    protos = torch.rand(batch, ways, 1, 1, 7, 7, generator=gen).round().repeat_interleave(4, -1).repeat_interleave(4, -2)
    noise = lambda n: 0.1 * torch.rand(batch, ways, n, 1, 28, 28, generator=gen)  # noqa: E731
    support = (protos + noise(shots)).clamp(0, 1).flatten(1, 2)
    query = (protos + noise(queries)).clamp(0, 1).flatten(1, 2)
    labels = lambda n: torch.arange(ways).repeat_interleave(n).repeat(batch, 1)  # noqa: E731
    return Episodes(support.to(dtype), labels(shots), query.to(dtype), labels(queries))


def test_augmented_layer_is_sum_of_relu_branches():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 6, generator=gen)
    slow, fast = torch.randn(5, 6, generator=gen), torch.randn(3, 4, 5, 6, generator=gen)
    slow_out = x @ slow.T
    fast_out = torch.einsum("bqoi,bqi->bqo", fast, x)
    torch.testing.assert_close(augmented_linear(x, slow, fast), F.relu(slow_out) + F.relu(fast_out))
    torch.testing.assert_close(augmented_linear(x, slow, fast, activation=False), slow_out + fast_out)
    # one fast weight per task, broadcast over the task's examples
    task_fast = torch.randn(3, 1, 5, 6, generator=gen)
    expected = F.relu(slow_out) + F.relu(torch.einsum("boi,bqi->bqo", task_fast[:, 0], x))
    torch.testing.assert_close(augmented_linear(x, slow, task_fast), expected)


def test_attention_read_returns_stored_weight_for_equal_key():
    gen = torch.Generator().manual_seed(1)
    keys, values = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 6, 3, 4, generator=gen)
    queries = keys[:, [4, 1]]
    weights = attention_weights(keys, queries)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2))
    assert (weights.argmax(-1) == torch.tensor([4, 1])).all()
    read = attention_read(keys, values, queries, scale=1e4)
    torch.testing.assert_close(read, values[:, [4, 1]])


def test_preprocess_gradient_log_and_sign():
    g = torch.tensor([0.5, -2.0, 1e-6, -1e-6, 0.0])
    out = preprocess(g, p=10.0)
    torch.testing.assert_close(out[0], torch.tensor([torch.log(torch.tensor(0.5)) / 10, 1.0]))
    torch.testing.assert_close(out[1], torch.tensor([torch.log(torch.tensor(2.0)) / 10, -1.0]))
    torch.testing.assert_close(out[2:, 0], torch.full((3,), -1.0))
    torch.testing.assert_close(out[2:, 1], torch.tensor([1e-6, -1e-6, 0.0]) * torch.exp(torch.tensor(10.0)))


@pytest.mark.parametrize("shots", [1, 2], ids=["one-shot-cross-entropy", "two-shot-contrastive"])
def test_memory_sizes_follow_support_set(shots):
    net = tiny(ways=3)
    params = net.init(0)
    batch = episodes(3, shots, 2, 1, seed=0)
    predictor = net.adapt(params, batch.support_x[0], batch.support_y[0])
    memory = predictor.memory
    support = 3 * shots
    assert memory.keys.shape == (1, support, net.representation)
    assert memory.values.shape == (1, support, net.hidden * net.features() + 3 * net.hidden)
    assert memory.task_fast.shape == (1, net.representation * net.features())
    assert predictor(batch.query_x[0]).shape == (6, 3)


def test_model_reads_a_support_examples_fast_weights_for_that_example():
    # at initialization different images have cosines within ~1e-4 of each other: a very sharp softmax in float64
    net = tiny(attention_scale=1e8, dtype=torch.float64)
    params = net.init(2)
    batch = episodes(5, 1, 1, 1, seed=2, dtype=torch.float64)
    memory = net.write_memory(params, batch.support_x, batch.support_y)
    r = net.represent(params, memory, batch.support_x)
    torch.testing.assert_close(r, memory.keys)
    read = attention_read(memory.keys, memory.values, r, net.attention_scale)
    torch.testing.assert_close(read, memory.values)


def test_memory_matches_hand_written_gradients_in_float64():
    net = tiny(ways=3, dtype=torch.float64, rep_steps=2)
    params = net.init(4)
    batch = episodes(3, 2, 1, 1, seed=4, dtype=torch.float64)
    memory = net.write_memory(params, batch.support_x, batch.support_y)
    x, y = batch.support_x[0], batch.support_y[0]

    # example-level: closed-form gradient of each support example's cross-entropy through b's two layers
    hb = net.trunk(params, "b", x[None])[0]
    w1, w2 = params["b.fc1"], params["b.fc2"]
    z = hb @ w1.T
    dlogits = torch.softmax(F.relu(z) @ w2.T, -1) - F.one_hot(y, 3)
    g2 = dlogits[:, :, None] * F.relu(z)[:, None, :]
    g1 = ((dlogits @ w2) * (z > 0))[:, :, None] * hb[:, None, :]
    grads = torch.cat((g1.flatten(1), g2.flatten(1)), 1)
    torch.testing.assert_close(memory.values[0], mlp_generate(params, "m", grads, net.preprocess_p))

    # task-level: contrastive loss (two shots), gradient of each chunk's mean by autograd, one chunk at a time
    hu = net.trunk(params, "u", x[None])[0].detach()
    chunk_grads = []
    for chunk in (torch.arange(0, 3), torch.arange(3, 6)):
        w = params["u.fc1"].detach().requires_grad_(True)
        r = hu @ w.T
        dist2 = (r[:, None] - r[None]).square().sum(-1)
        same = (y[:, None] == y[None]).double()
        apart = F.relu(net.contrastive_margin - (dist2 + 1e-12).sqrt()).square()
        loss = (same * dist2 + (1 - same) * apart)[chunk].mean()
        chunk_grads.append(torch.autograd.grad(loss, w)[0])
    task_fast = lstm_generate(params, "d", torch.stack(chunk_grads)[None], net.preprocess_p)
    torch.testing.assert_close(memory.task_fast, task_fast.flatten(1))
    torch.testing.assert_close(memory.keys[0], hu @ params["u.fc1"].T + hu @ task_fast[0].T)


@pytest.mark.parametrize("shots", [1, 2], ids=["one-shot", "two-shot"])
@pytest.mark.parametrize("fast_layers,norm,seed", [("all", "none", 2), ("all", "group", 0), ("last", "none", 1),
                                                    ("last", "group", 1)])
def test_gradients_reach_every_meta_parameter(shots, fast_layers, norm, seed):
    # seed: at this tiny size the generated conv fast weights start nearly constant, so a conv fast branch
    # is dead (all negative) for some seeds; seed 2 starts with every branch alive
    net = tiny(fast_layers=fast_layers, norm=norm)
    params = net.init(seed)
    grads, metrics = net.meta_grad(params, episodes(5, shots, 2, 2, seed=1))
    assert grads.keys() == params.keys()
    for key, g in grads.items():
        assert g.shape == params[key].shape, key
        assert torch.isfinite(g).all(), key
        assert g.abs().sum() > 0, key
    assert set(metrics) == {"loss", "accuracy"} and all(isinstance(v, float) for v in metrics.values())


def test_meta_grad_is_autodiff_of_meta_loss():
    net = tiny(dtype=torch.float64, shuffle_support=False)  # meta_grad shuffles before it differentiates otherwise
    params = net.init(3)
    batch = episodes(5, 1, 2, 2, seed=3, dtype=torch.float64)
    grads, _ = net.meta_grad(params, batch)
    key, index = "d.w_ih", (3, 1)
    step = 1e-6
    shifted = lambda s: {**params, key: params[key].index_put((torch.tensor(index[0]), torch.tensor(index[1])),  # noqa: E731
                                                             params[key][index] + s)}
    numeric = (net.meta_loss(shifted(step), batch)[0] - net.meta_loss(shifted(-step), batch)[0]) / (2 * step)
    torch.testing.assert_close(grads[key][index], numeric, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("fast_layers", ["last", "all"])
def test_meta_grad_in_chunks_of_episodes_is_the_whole_batchs_gradient_in_float64(fast_layers):
    """task_chunk backpropagates a few episodes at a time: the same gradient and metrics as one pass over all of
    them, also when the chunks are uneven (5 episodes in chunks of 2: 2, 2, 1), support sets shuffled alike."""
    batch = episodes(5, 1, 2, 5, seed=7, dtype=torch.float64)
    whole = tiny(dtype=torch.float64, fast_layers=fast_layers, task_chunk=5)
    params = whole.init(7)
    expected, expected_metrics = whole.meta_grad(params, batch)
    for chunk in (1, 2, None):  # None: one at a time on a CPU
        grads, metrics = tiny(dtype=torch.float64, fast_layers=fast_layers, task_chunk=chunk).meta_grad(params, batch)
        for key in expected:
            torch.testing.assert_close(grads[key], expected[key], rtol=1e-10, atol=1e-12, msg=f"{key}, chunk {chunk}")
        assert metrics == pytest.approx(expected_metrics, rel=1e-12)


def test_meta_grad_takes_one_episode_at_a_time_on_a_cpu_by_default(monkeypatch):
    net, batch = tiny(), episodes(5, 1, 2, 3, seed=8)
    sizes = []
    episode_losses = MetaNet._episode_losses

    def recorded(self, params, part):
        sizes.append(len(part))
        return episode_losses(self, params, part)

    monkeypatch.setattr(MetaNet, "_episode_losses", recorded)
    net.meta_grad(net.init(8), batch)
    tiny(task_chunk=2).meta_grad(net.init(8), batch)
    assert sizes == [1, 1, 1, 2, 1]


def test_task_chunk_below_one_is_refused_naming_it():
    with pytest.raises(ValueError, match="MetaNet.task_chunk must be at least 1, got 0"):
        tiny(task_chunk=0)
    base = {"task": {"name": "omniglot"}, "store": {"path": "x"}, "algorithm": {"name": "metanet", "task_chunk": 0}}
    with pytest.raises(ConfigError, match="algorithm.task_chunk"):
        validate(base)
    assert build_learner(validate({**base, "algorithm": {"name": "metanet", "task_chunk": 4}})).task_chunk == 4


def test_batched_meta_loss_equals_per_task_predictors():
    net = tiny()
    params = net.init(5)
    batch = episodes(5, 1, 3, 3, seed=5)
    loss, metrics = net.meta_loss(params, batch)
    per_task = []
    for t in range(3):
        logits = net.adapt(params, batch.support_x[t], batch.support_y[t])(batch.query_x[t])
        per_task.append(F.cross_entropy(logits, batch.query_y[t], reduction="sum"))
    torch.testing.assert_close(loss, torch.stack(per_task).sum() / batch.query_y.numel(), rtol=1e-5, atol=1e-6)
    assert 0.0 <= metrics["accuracy"] <= 1.0


def test_init_is_deterministic_in_seed():
    net = tiny()
    a, b, c = net.init(7), net.init(7), net.init(8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].std() > 0)


def test_meta_loss_decreases_with_adam_on_learnable_episodes():
    # narrower generators or layers than these learn too slowly to leave the uniform guess within the test's steps
    net = MetaNet(ways=5, conv_layers=4, filters=16, rep_steps=3, fast_layers="last", norm="group")
    params = {k: v.requires_grad_(True) for k, v in net.init(0).items()}
    held_out = episodes(5, 1, 3, 16, seed=10_000)
    before = net.meta_loss(params, held_out)[0].item()
    opt = torch.optim.Adam(params.values(), lr=1e-3)
    for step in range(30):
        grads, _ = net.meta_grad(params, episodes(5, 1, 3, 4, seed=step))
        for k, p in params.items():
            p.grad = grads[k]
        opt.step()
    after, metrics = net.meta_loss(params, held_out)
    assert after.item() < 0.5 * before, (before, after.item())
    assert metrics["accuracy"] > 0.8


def test_bad_episodes_name_the_field():
    net = tiny()
    params = net.init(0)
    good = episodes(5, 1, 1, 1, seed=0)
    with pytest.raises(ValueError, match=r"support_x must be \[B, N, 1, 28, 28\], got \[1, 5, 3, 28, 28\]"):
        net.meta_loss(params, Episodes(good.support_x.expand(-1, -1, 3, -1, -1), good.support_y, good.query_x, good.query_y))
    with pytest.raises(ValueError, match=r"query_y labels must lie in 0..4, got 0..7"):
        net.meta_loss(params, Episodes(good.support_x, good.support_y, good.query_x, good.query_y * 7 // 4))
    with pytest.raises(ValueError, match="MetaNet.filters must be at least 1, got 0"):
        tiny(filters=0)


@pytest.mark.parametrize("name,ways", [("metanet_omniglot_5w1s.yaml", 5), ("metanet_omniglot_20w1s.yaml", 20)])
def test_shipped_configs_build_a_metanet(name, ways):
    config = load_config(CONFIGS / name)
    learner = build_learner(config)
    assert isinstance(learner, MetaNet) and learner.ways == ways and learner.in_channels == 1


def test_config_rejects_unknown_metanet_key_and_non_image_task():
    base = {"task": {"name": "omniglot"}, "store": {"path": "x"}, "algorithm": {"name": "metanet"}}
    defaults = validate(base).algorithm
    assert (defaults.conv_layers, defaults.filters, defaults.generator_hidden, defaults.preprocess_p) == (5, 64, 20, 7.0)
    assert (defaults.fast_layers, defaults.norm, defaults.shuffle_support) == ("all", "none", True)
    with pytest.raises(ConfigError, match="algorithm.fast_layers"):
        validate({**base, "algorithm": {"name": "metanet", "fast_layers": "first"}})
    with pytest.raises(ValueError, match="algorithm.hiden"):
        validate({**base, "algorithm": {"name": "metanet", "hiden": 3}})
    with pytest.raises(ConfigError, match="algorithm.name: metanet meta-learns classification tasks; task.name='sinusoid' is regression"):
        validate({**base, "task": {"name": "sinusoid"}})


def log_and_sign(x: torch.Tensor, k: float) -> torch.Tensor:
    """utilsf.py's logAndSign of the authors' code, written out: (max(log(|x| + eps) / k, -1), clip(x e^k, -1, 1))."""
    eps = torch.finfo(x.dtype).eps
    return torch.stack(((torch.log(x.abs() + eps) / k).clamp(min=-1.0), (x * math.exp(k)).clamp(-1.0, 1.0)), -1)


def test_preprocessing_with_p_7_is_the_authors_log_and_sign_with_k_7():
    gen = torch.Generator().manual_seed(0)
    g = torch.cat([torch.randn(50, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-8, 2, (50,), generator=gen),
                   torch.tensor([0.0, 1e-3, -1e-3, math.exp(-7) * 1.001], dtype=torch.float64)])
    torch.testing.assert_close(preprocess(g, 7.0), log_and_sign(g, 7.0), rtol=0, atol=1e-12)
    assert MetaNet(ways=5).preprocess_p == 7.0


def test_all_layers_match_the_authors_forward_in_float64():
    """MetaNetFull.py written out for one 1-shot episode: per-chunk gradients of u's convs and fc1 through the
    conv and fc LSTMs, per-example gradients of b's convs and fcs through the conv and fc MLPs, every conv block
    relu(conv(x, W)) + relu(conv(x, W*)), no normalization, and one query at a time."""
    net = tiny(ways=3, fast_layers="all", norm="none", rep_steps=3, dtype=torch.float64)
    params = net.init(2)
    batch = episodes(3, 1, 2, 1, seed=4, dtype=torch.float64)
    x, y, xq = batch.support_x[0], batch.support_y[0], batch.query_x[0]
    head = torch.randn(3, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / math.sqrt(8)
    convs = lambda net_: [f"{net_}.conv{i}.weight" for i in range(2)]  # noqa: E731

    def trunk(weights, fast, images):
        h = images
        for i, key in enumerate(convs(weights["net"])):
            out = F.relu(F.conv2d(h, weights[key], padding=1))
            if fast is not None:
                out = out + F.relu(F.conv2d(h, fast[i], padding=1))
            h = F.max_pool2d(out, 2, ceil_mode=True)
        return h.flatten(1)

    u = {"net": "u", **{k: params[k] for k in convs("u") + ["u.fc1"]}}
    b = {"net": "b", **{k: params[k] for k in convs("b") + ["b.fc1", "b.fc2"]}}
    # u: one chunk (here one example) at a time, the LSTM state carried across chunks
    chunk_grads = []
    for i in range(3):
        leaves = {k: v.detach().requires_grad_() for k, v in u.items() if k != "net"}
        rep = trunk({"net": "u", **leaves}, None, x[i : i + 1]) @ leaves["u.fc1"].T
        loss = F.cross_entropy(F.relu(rep) @ head.T, y[i : i + 1])
        chunk_grads.append(torch.autograd.grad(loss, list(leaves.values())))
    fast_u = [lstm_generate(params, "d_conv" if j < 2 else "d", torch.stack([g[j] for g in chunk_grads])[None],
                            7.0)[0] for j in range(3)]
    represent = lambda images: trunk(u, fast_u[:2], images) @ (params["u.fc1"] + fast_u[2]).T  # noqa: E731
    # b: one support example at a time
    values = []
    for i in range(3):
        leaves = {k: v.detach().requires_grad_() for k, v in b.items() if k != "net"}
        logits = F.relu(trunk({"net": "b", **leaves}, None, x[i : i + 1]) @ leaves["b.fc1"].T) @ leaves["b.fc2"].T
        grads = torch.autograd.grad(F.cross_entropy(logits, y[i : i + 1]), list(leaves.values()))
        values.append([mlp_generate(params, "m_conv" if j < 2 else "m", g, 7.0) for j, g in enumerate(grads)])
    keys = represent(x)
    expected = []
    for q in range(xq.shape[0]):
        r = represent(xq[q : q + 1])
        attention = torch.softmax(F.cosine_similarity(keys, r, dim=-1, eps=1e-8), 0)
        fast = [sum(attention[s] * values[s][j] for s in range(3)) for j in range(4)]
        h = trunk(b, fast[:2], xq[q : q + 1])
        h = F.relu(h @ params["b.fc1"].T) + F.relu(h @ fast[2].T)
        expected.append(h @ params["b.fc2"].T + h @ fast[3].T)
    memory = net.write_memory(params, batch.support_x, batch.support_y)
    torch.testing.assert_close(memory.keys[0], keys)
    torch.testing.assert_close(net.read(params, memory, batch.query_x)[0], torch.cat(expected))


def test_support_shuffle_is_seeded_per_episode_and_used_in_training():
    batch = episodes(5, 2, 1, 4, seed=6)
    shuffled = shuffle_support(batch, seed=3)
    again = shuffle_support(batch, seed=3)
    assert torch.equal(shuffled.support_x, again.support_x) and torch.equal(shuffled.support_y, again.support_y)
    assert not torch.equal(shuffle_support(batch, seed=4).support_y, shuffled.support_y)
    assert not torch.equal(shuffled.support_y, batch.support_y)
    for e in range(4):  # the same (image, label) pairs, in another order
        order = [int((batch.support_x[e] == img).flatten(1).all(1).nonzero()) for img in shuffled.support_x[e]]
        assert sorted(order) == list(range(10))
        assert torch.equal(batch.support_y[e, order], shuffled.support_y[e])
    assert torch.equal(shuffled.query_x, batch.query_x)
    # episode 2 alone is shuffled as in the batch: its order depends on its own pixels only
    assert torch.equal(shuffle_support(batch[2], seed=3).support_y[0], shuffled.support_y[2])

    net = tiny(rep_steps=3, shuffle_support=True, seed=3)
    grads, _ = net.meta_grad(net.init(0), batch)
    expected, _ = tiny(rep_steps=3, shuffle_support=False).meta_grad(net.init(0), shuffled)
    unshuffled, _ = tiny(rep_steps=3, shuffle_support=False).meta_grad(net.init(0), batch)
    for key in grads:
        torch.testing.assert_close(grads[key], expected[key])
    assert any(not torch.allclose(grads[k], unshuffled[k]) for k in grads)


def test_batched_meta_test_equals_adapting_each_episode_alone():
    from pipeline.evaluation import scores
    from pipeline.types import BatchedEvaluation

    net = tiny(dtype=torch.float64)
    params, batch = net.init(5), episodes(5, 1, 2, 5, seed=8, dtype=torch.float64)
    metrics, alone = net.evaluate(params, batch, chunk=2), adapted_alone(net, params, batch)  # chunks 2, 2, 1
    torch.testing.assert_close(metrics["loss"], alone["loss"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["accuracy"], alone["accuracy"])
    assert len(set(metrics["loss"].tolist())) == 5 and not metrics["loss"].requires_grad  # five episodes, no graph kept
    assert isinstance(net, BatchedEvaluation) and scores(net, params, batch) == metrics["accuracy"].tolist()
