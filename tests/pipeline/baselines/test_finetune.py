"""The fine-tuning baseline: pretraining over every (character, rotation) class, per-episode fine-tuning, the grid, the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from pipeline.baselines import finetune
from pipeline.baselines.finetune import Finetune
from pipeline.config import validate
from pipeline.errors import ConfigError
from pipeline.nets.conv4 import Conv4
from tasks.distribution import TaskDistribution
from tasks.episodes import Episodes
from tasks.families.image_folder import ImageFolderTask
from tests.helpers import small_omniglot_task, write_class_folders, write_omniglot


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread, as the CLI uses: CPU-bound torch with more threads than free cores slows down badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory):
    return write_omniglot(tmp_path_factory.mktemp("data"), "folder")


@pytest.fixture(scope="module")
def distribution(data_root) -> TaskDistribution:
    return TaskDistribution.load(small_omniglot_task(data_root))


def raw_config(data_root, tmp_path) -> dict:
    return {
        "name": "test-finetune",
        "seed": 3,
        "task": small_omniglot_task(data_root).model_dump(),
        "store": {"path": str(tmp_path / "episodes"), "train_episodes": 4, "val_episodes": 4, "test_episodes": 6, "shard_episodes": 4},
        "model": {"network": "conv4", "filters": 8},
        "algorithm": {"name": "meta_lstm", "inner_steps": 1},
        "train": {"val_episodes": 4, "test_episodes": 6},
    }


def separable_episodes(tasks: int, ways: int = 5, per_class: int = 2, seed: int = 0) -> Episodes:
    """Each class a bright square at its own place on faint noise: support and queries drawn alike."""
    gen = torch.Generator().manual_seed(seed)

    def images(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = 0.1 * torch.rand(tasks, ways * count, 1, 28, 28, generator=gen)
        y = torch.arange(ways).repeat_interleave(count).expand(tasks, -1).contiguous()
        for c in range(ways):
            x[:, c * count : (c + 1) * count, :, 4 * c : 4 * c + 8, 4 * c : 4 * c + 8] += 1.0
        return x, y

    return Episodes(*images(per_class), *images(per_class))


def test_training_set_has_one_class_per_train_character_and_rotation(distribution) -> None:
    data = finetune.training_set(distribution)
    train = distribution.splits["train"]
    assert data.classes == len(train) * 4 == 24
    assert len(data) == len(train) * 6 * 4  # 6 drawings, 4 rotations
    assert torch.equal(torch.bincount(data.labels, minlength=24), torch.full((24,), 6))
    # an entry is its character's drawing turned by its rotation (label % 4 quarter turns)
    table = torch.from_numpy(distribution.table.pixels)
    starts = distribution.table.starts
    for i in (0, 40, len(data) - 1):
        x, y = data.batch(torch.tensor([i]))
        character = int(train[int(y) // 4])
        drawing = int(data.rows[i]) % len(table) - int(starts[character])
        expected = torch.rot90(table[int(starts[character]) + drawing], int(y) % 4, dims=(-2, -1))
        assert torch.equal((x[0] * 255).round().to(torch.uint8), expected)


def test_pretraining_images_are_normalized_as_the_episodes_are(tmp_path) -> None:
    """With task.normalize, pretraining sees (x / 255 - mean) / std, as the learners' episodes and the val/test
    episodes the baseline is scored on do."""
    for split, names in {"train": ["a", "b"], "val": ["c", "d"], "test": ["e", "f"]}.items():
        write_class_folders(tmp_path / split, {n: 3 for n in names}, size=8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    task = ImageFolderTask(root=str(tmp_path), ways=2, queries=2, image_size=8, normalize={"mean": mean, "std": std})
    distribution = TaskDistribution.load(task)
    data = finetune.training_set(distribution)
    x, y = data.batch(torch.arange(len(data)))
    pixels = torch.from_numpy(distribution.table.pixels[:6]).double()  # the train classes come first
    reference = (pixels / 255 - torch.tensor(mean).double().view(3, 1, 1)) / torch.tensor(std).double().view(3, 1, 1)
    assert torch.allclose(x.double(), reference, atol=1e-6) and y.tolist() == [0, 0, 0, 1, 1, 1]
    episode = distribution.episodes("train", np.random.default_rng(0), 1)
    image = episode.support_x[0, 0]
    assert any(torch.equal(image, row) for row in x)  # the very same float32 values as an episode's image


def test_pretraining_lowers_the_loss_with_a_head_per_class(distribution) -> None:
    data = finetune.training_set(distribution)
    network = Conv4(1, 28, data.classes, filters=8)
    lines: list[str] = []
    result = finetune.pretrain(network, data, steps=40, batch_size=32, lr=0.01, seed=0, log_every=20, log=lines.append)
    assert result.params["head.weight"].shape == (24, 8) and result.params["head.bias"].shape == (24,)
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.3
    assert len(lines) == 2 and "pretrain step 40/40" in lines[-1] and "steps/s" in lines[-1] and "ETA" in lines[-1]
    assert set(finetune.trunk(result.params)) == set(result.params) - {"head.weight", "head.bias"}


def test_pretraining_refuses_a_head_of_the_wrong_size(distribution) -> None:
    with pytest.raises(ValueError, match="5 outputs, the training set 24 classes"):
        finetune.pretrain(Conv4(1, 28, 5, filters=8), finetune.training_set(distribution), 1, 4, 0.01, 0)


@pytest.mark.parametrize("mode", ["head", "all"])
def test_finetuning_fits_a_separable_support_set(mode) -> None:
    network = Conv4(1, 28, 5, filters=8)
    base = finetune.trunk(network.init(0))
    batch = separable_episodes(3)
    tuned = finetune.finetune_tasks(network, base, batch.support_x, batch.support_y, Finetune(0.1, 50, mode))
    assert tuned["head.weight"].shape == (3, 5, 8)
    logits = network.apply_tasks(tuned, batch.support_x)
    assert torch.equal(logits.argmax(-1), batch.support_y)
    if mode == "head":
        assert all(torch.equal(tuned[k], base[k]) for k in base)
    else:
        assert tuned["conv0.weight"].shape == (3, *base["conv0.weight"].shape)
        assert not torch.allclose(tuned["conv0.weight"][0], base["conv0.weight"])


@pytest.mark.parametrize("mode", ["head", "all"])
def test_stacked_finetuning_equals_one_episode_at_a_time(mode) -> None:
    network = Conv4(1, 28, 5, filters=8)
    base = finetune.trunk(network.init(1))
    batch = separable_episodes(3, seed=1)
    settings = Finetune(0.01, 5, mode)
    stacked = finetune.accuracies(network, base, batch, settings, chunk=3)
    alone = finetune.accuracies(network, base, batch, settings, chunk=1)
    assert stacked.shape == (3,)
    torch.testing.assert_close(stacked, alone)
    together = finetune.finetune_tasks(network, base, batch.support_x, batch.support_y, settings)
    single = finetune.finetune_tasks(network, base, batch.support_x[1:2], batch.support_y[1:2], settings)
    torch.testing.assert_close(together["head.weight"][1], single["head.weight"][0], rtol=1e-4, atol=1e-5)


def test_evaluation_scores_every_episode_with_an_interval() -> None:
    network = Conv4(1, 28, 5, filters=8)
    base = finetune.trunk(network.init(2))
    batch = separable_episodes(4, seed=2)
    settings = Finetune(0.1, 10, "head")
    values = finetune.accuracies(network, base, batch, settings, chunk=3)
    result = finetune.evaluate(network, base, batch, settings, chunk=3)
    assert values.shape == (4,) and result.n == 4 and result.metric == "accuracy"
    assert result.mean == pytest.approx(values.mean().item())
    assert result.ci95 == pytest.approx(1.96 * values.std().item() / 2)


def test_the_grid_picks_the_best_val_setting() -> None:
    network = Conv4(1, 28, 5, filters=8)
    base = finetune.trunk(network.init(3))
    val = separable_episodes(3, seed=3)
    grid = (Finetune(1e-4, 1, "all"), Finetune(0.1, 30, "head"), Finetune(1e-3, 2, "head"))
    lines: list[str] = []
    chosen, results = finetune.tune(network, base, val, grid, chunk=2, log=lines.append)
    assert len(lines) == 3 and lines[1].startswith("val 2/3 (mode head, lr 0.1, 30 steps): accuracy")
    assert set(results) == set(grid)
    assert results[chosen].mean == max(r.mean for r in results.values())
    assert chosen == Finetune(0.1, 30, "head")  # the only setting that fits its head (a near-zero head misreads queries)
    assert results[grid[1]] == finetune.evaluate(network, base, val, grid[1])


def test_finetune_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="mode must be one of"):
        Finetune(0.1, 1, "last")
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        Finetune(0.1, 0, "head")


def test_cli_runs_end_to_end_and_logs_to_an_mlflow_run(data_root, tmp_path, monkeypatch, capsys) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("finetune")).info.run_id
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw_config(data_root, tmp_path)))
    report = finetune.main([str(path), "--pretrain-steps", "6", "--batch-size", "8", "--log-every", "3", "--mlflow-run", run_id])
    out = capsys.readouterr().out
    assert "pretrain step 6/6" in out and "| test accuracy |" in out and "pretraining time" in out
    assert report.test.n == 6 and len(report.val) == len(finetune.GRID) and report.pretrain["classes"] == 24
    run = client.get_run(run_id).data
    assert run.metrics["baseline_finetune/accuracy"] == pytest.approx(report.test.mean)
    assert run.metrics["baseline_finetune/accuracy_ci95"] == pytest.approx(report.test.ci95)
    assert run.tags["baseline_finetune.mode"] == report.chosen.mode
    saved = json.loads(open(client.download_artifacts(run_id, "baseline_finetune.json", str(tmp_path))).read())
    assert saved["chosen"] == {"lr": report.chosen.lr, "steps": report.chosen.steps, "mode": report.chosen.mode}
    assert len(saved["val"]) == len(finetune.GRID) and saved["test"]["n"] == 6


def test_a_non_image_config_is_refused_naming_task_name(tmp_path) -> None:
    path = tmp_path / "sinusoid.yaml"
    path.write_text(yaml.safe_dump({"task": {"name": "sinusoid"}, "store": {"path": str(tmp_path / "s")}}))
    with pytest.raises(ConfigError, match="task.name: .*got 'sinusoid'"):
        finetune.main([str(path)])
    assert not (tmp_path / "s").exists()  # refused before any store work


def test_a_config_without_conv4_is_refused_naming_model_network(data_root, tmp_path) -> None:
    raw = raw_config(data_root, tmp_path) | {"model": {"network": "mlp"}, "algorithm": {"name": "maml"}}
    with pytest.raises(ConfigError, match="model.network: mlp needs flat inputs"):
        validate(raw)  # refused by the run config itself, before the baseline's own check
