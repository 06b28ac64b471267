"""Export directories: round trip, and load refuses anything missing, altered or of another format."""
import json
from types import SimpleNamespace

import pytest
import torch

import pipeline
from pipeline.build import build_learner
from pipeline.config import validate
from pipeline.errors import ExportError
from pipeline.export.directory import META, STATE, WEIGHTS, export
from pipeline.export.pyfunc import FewShotModel
from pipeline.export.requests import example_request
from tasks.episodes import Episodes

CONFIG = validate({"task": {"name": "sinusoid"}, "store": {"path": "unused"}, "algorithm": {"inner_lr": 0.05}})


@pytest.fixture
def exported(tmp_path):
    params = build_learner(CONFIG).init(0)
    return export(params, CONFIG, tmp_path / "export", {"test/mse": 0.5}), params


def test_roundtrip_adapts_like_the_learner(exported):
    path, params = exported
    learner = pipeline.load(path)
    assert learner.config == CONFIG and learner.meta["metrics"] == {"test/mse": 0.5}
    x = torch.linspace(-5, 5, 10).unsqueeze(1)
    y = torch.sin(x)
    expected = build_learner(CONFIG).adapt(params, x, y)(x)
    torch.testing.assert_close(learner.adapt(x, y)(x), expected.detach())


def test_an_initialization_learner_has_no_optimizer(exported):
    with pytest.raises(TypeError, match="learns an initialization"):
        pipeline.load(exported[0]).optimizer([torch.zeros(1, requires_grad=True)])


@pytest.mark.parametrize("name", ["weights.safetensors", "config.json", "export.json"])
def test_missing_file_is_named(exported, name):
    (exported[0] / name).unlink()
    with pytest.raises(ExportError, match=f"export file missing: .*{name}"):
        pipeline.load(exported[0])


def test_altered_weights_are_refused(exported):
    path = exported[0] / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="sha256 does not match"):
        pipeline.load(exported[0])


CARRIED = validate(
    {"task": {"name": "sinusoid"}, "store": {"path": "unused"}, "model": {"network": "mlp", "hidden": [8]},
     "algorithm": {"name": "reptile", "inner_optimizer": "adam", "inner_state": "carried", "inner_lr": 0.01}}
)


def carried_export(path, state_of=lambda reptile, carry: carry):
    """A carried Reptile's export with the inner Adam state after three tasks (``state_of`` may change it)."""
    reptile = build_learner(CARRIED)
    params = reptile.init(0)
    x = torch.linspace(-5, 5, 30).view(3, 10, 1)
    episodes = Episodes(x, torch.sin(x), x, torch.sin(x))
    _, _, carry = reptile.truncation_grad(params, episodes, reptile.begin(episodes))
    return export(params, CARRIED, path, state=state_of(reptile, carry)), params, carry


def test_a_carried_state_is_exported_checked_and_adapted_from(tmp_path):
    path, params, carry = carried_export(tmp_path / "export")
    loaded = pipeline.load(path)
    assert set(loaded.state) == set(carry) and json.loads((path / META).read_text())["eval_state_sha256"]
    x = torch.linspace(-4, 4, 5).unsqueeze(1)
    expected = build_learner(CARRIED).adapt(params, x, torch.cos(x), carry)(x)
    torch.testing.assert_close(loaded.adapt(x, torch.cos(x))(x), expected, rtol=0, atol=0)
    assert not torch.allclose(build_learner(CARRIED).adapt(params, x, torch.cos(x))(x), expected)
    export(params, CARRIED, path)  # the same folder again, without a state: none is left behind
    assert not (path / STATE).exists() and pipeline.load(path).state is None


@pytest.mark.parametrize("fault", ["missing", "altered", "foreign", "other sizes"])
def test_a_missing_altered_or_foreign_state_is_refused_naming_the_file(tmp_path, fault):
    foreign = {
        "foreign": lambda reptile, carry: {k: v for k, v in carry.items() if k != "exp_avg.layer0.bias"},
        "other sizes": lambda reptile, carry: carry | {"exp_avg.layer0.weight": torch.zeros(16, 1)},  # hidden [16]'s
    }.get(fault)
    path, *_ = carried_export(tmp_path / "export", *([foreign] if foreign else []))
    if fault == "missing":
        (path / STATE).unlink()
    if fault == "altered":
        data = bytearray((path / STATE).read_bytes())
        data[-1] ^= 0x01
        (path / STATE).write_bytes(bytes(data))
    message = {"missing": "export file missing: .*eval_state.safetensors", "altered": "eval_state.safetensors: sha256 does not match",
               "foreign": r"eval_state.safetensors: not a state this learner adapts from .*missing \['exp_avg.layer0.bias'\]",
               "other sizes": r"eval_state.safetensors: not a state this learner adapts from .*exp_avg.layer0.weight \(16, 1\)"}[fault]
    with pytest.raises(ExportError, match=message):
        pipeline.load(path)


def test_other_format_version_is_refused(exported):
    meta = json.loads((exported[0] / META).read_text())
    meta["format_version"] = 2
    (exported[0] / META).write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="format_version 2"):
        pipeline.load(exported[0])


def test_a_protonet_export_loads_adapts_and_serves_like_the_learner(tmp_path):
    config = validate({
        "task": {"name": "omniglot", "ways": 3, "image_size": 16}, "store": {"path": "unused"},
        "model": {"network": "conv4", "filters": 4, "downsample": "maxpool"}, "algorithm": {"name": "protonet"},
    })
    params = build_learner(config).init(1)
    path = export(params, config, tmp_path / "export")
    gen = torch.Generator().manual_seed(0)
    support_x = (torch.rand(6, 1, 16, 16, generator=gen) > 0.8).float()  # strokes: exact as PNG files
    query_x = (torch.rand(9, 1, 16, 16, generator=gen) > 0.8).float()
    support_y = torch.tensor([2, 0, 1, 1, 0, 2])
    # an export predicts in support norm mode by default: each query independently of the others
    support = config.model_copy(update={"model": config.model.model_copy(update={"norm": "support"})})
    expected = build_learner(support).adapt(params, support_x, support_y)(query_x)
    predict = pipeline.load(path).adapt(support_x, support_y)
    torch.testing.assert_close(predict(query_x), expected)
    torch.testing.assert_close(torch.cat([predict(query_x[i : i + 1]) for i in range(9)]), expected, rtol=0, atol=1e-5)
    # norm="transductive": the training pass's behaviour, where a query's logits depend on the other queries
    predict = pipeline.load(path, norm="transductive").adapt(support_x, support_y)
    torch.testing.assert_close(predict(query_x), build_learner(config).adapt(params, support_x, support_y)(query_x))
    assert not torch.allclose(torch.cat([predict(query_x[i : i + 1]) for i in range(9)]), predict(query_x), atol=1e-3)
    model = FewShotModel()
    model.load_context(SimpleNamespace(artifacts={"export": str(path)}))
    episode = Episodes(support_x[None], support_y[None], query_x[None], torch.zeros(1, 9, dtype=torch.long))
    request = example_request(pipeline.load(path), episode, max_queries=9)
    assert model.predict(None, request) == expected.argmax(-1).tolist()


IMAGES = validate({
    "task": {"name": "omniglot", "ways": 2, "shots": 2, "queries": 3, "image_size": 16},
    "store": {"path": "unused"},
    "model": {"network": "conv4", "filters": 3},
    "algorithm": {"inner_lr": 0.4, "inner_steps": 2},
})


def test_an_exported_learner_predicts_each_query_independently_by_default(tmp_path):
    """The fault of issue 12: one query per call scored at chance where the whole query set scored well."""
    export(build_learner(IMAGES).init(0), IMAGES, tmp_path / "export")
    gen = torch.Generator().manual_seed(0)
    support_x, support_y = torch.rand(4, 1, 16, 16, generator=gen), torch.tensor([0, 1, 0, 1])
    query_x = torch.rand(6, 1, 16, 16, generator=gen) * 3

    def single_and_batched(learner):
        predict = learner.adapt(support_x, support_y)
        return torch.cat([predict(query_x[i : i + 1]) for i in range(6)]), predict(query_x)

    single, batched = single_and_batched(pipeline.load(tmp_path / "export"))
    torch.testing.assert_close(single, batched, rtol=0, atol=1e-5)
    single, batched = single_and_batched(pipeline.load(tmp_path / "export", norm="transductive"))
    assert not torch.allclose(single, batched, atol=1e-3)
    with pytest.raises(ValueError, match="'batch'"):
        pipeline.load(tmp_path / "export", norm="batch")


USER = "tests.pipeline.nets.user_module:ResidualGroupNormNet"


def test_a_user_module_is_rebuilt_from_its_factory_and_a_missing_factory_is_named(tmp_path):
    raw = {**IMAGES.model_dump(mode="json"), "model": {"network": "module", "factory": USER, "kwargs": {"in_channels": 1, "ways": 2}}}
    config = validate(raw)
    params = build_learner(config).init(3)
    export(params, config, tmp_path / "export")
    learner = pipeline.load(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model"]["factory"] == USER
    assert all(torch.equal(learner.params[k], v) for k, v in params.items())
    x = torch.rand(4, 1, 16, 16)
    assert learner.adapt(x, torch.tensor([0, 1, 0, 1]))(x).shape == (4, 2)
    raw["model"]["factory"] = "tests.gone:Net"
    (tmp_path / "export" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ExportError, match=r"config\.json: model\.factory 'tests\.gone:Net' cannot be used here"):
        pipeline.load(tmp_path / "export")
