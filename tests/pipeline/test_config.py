"""Run config: validation before any cluster work, errors that name key and value, --set overrides."""
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.build import build_learner
from pipeline.config import RunConfig, apply_overrides, load_config, validate
from pipeline.errors import ConfigError

BASE = {"task": {"name": "sinusoid"}, "store": {"path": "episodes/sinusoid"}}


def write(tmp_path, raw):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_fill_a_minimal_config(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert isinstance(cfg, RunConfig)
    assert cfg.algorithm.name == "maml" and cfg.train.workers == 1


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        load_config(write(tmp_path, {**BASE, "train": {"stepz": 3}}))


def test_wrong_type_names_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.steps.*'many'"):
        load_config(write(tmp_path, {**BASE, "train": {"steps": "many"}}))


@pytest.mark.parametrize(
    "override, key",
    [("train.workers=0", "train.workers"), ("algorithm.inner_lr=-1", "algorithm.inner_lr"), ("task.shots=0", "task.shots")],
    ids=["zero-workers", "negative-lr", "zero-shots"],
)
def test_impossible_values_are_refused(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(write(tmp_path, BASE), [override])


def test_set_overrides_dotted_keys(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["algorithm.inner_lr=0.4", "train.mode=async", "task.shots=5"])
    assert cfg.algorithm.inner_lr == 0.4 and cfg.train.mode == "async" and cfg.task.shots == 5


def test_set_without_equals_or_into_a_value(tmp_path):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(write(tmp_path, BASE), ["train.steps"])
    with pytest.raises(ConfigError, match="train.steps is not a section"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])


def test_conv4_needs_an_image_task():
    with pytest.raises(ConfigError, match=r"model.network: conv4 needs image inputs \[C, H, W\]; task.name='sinusoid' has inputs of shape 1"):
        validate({**BASE, "model": {"network": "conv4"}})


def test_meta_batch_below_workers():
    with pytest.raises(ConfigError, match=r"meta_batch \(1\) must be at least train.workers \(2\)"):
        validate({**BASE, "train": {"meta_batch": 1, "workers": 2}})


@pytest.mark.parametrize(
    "train, message",
    [
        ({"gpus_per_worker": 2}, r"train.gpus_per_worker: a worker computes on one GPU.*got 2\)"),
        ({"gpus_per_worker": 1e-9}, r"train.gpus_per_worker: Ray reserves GPUs in steps of 0.0001, got 1e-09"),
        ({"placement": "ANYWHERE"}, r"train.placement: Input should be 'PACK', 'SPREAD'"),
        ({"resources_per_worker": {"node_slot": 0}}, r"train.resources_per_worker.node_slot: Input should be greater than 0"),
        ({"dtype": "float16"}, r"train.dtype: Input should be 'float32', 'float64' or 'bfloat16'"),
    ],
    ids=["several-gpus-per-worker", "gpu-share-below-ray-precision", "unknown-placement", "zero-custom-resource", "float16"],
)
def test_scale_out_settings_are_checked_before_ray_starts(train, message):
    with pytest.raises(ConfigError, match=message):
        validate({**BASE, "train": train})


def test_a_fraction_of_a_gpu_per_worker_and_bfloat16_validate():
    train = validate({**BASE, "train": {"gpus_per_worker": 0.25, "workers": 4, "meta_batch": 32, "dtype": "bfloat16"}}).train
    assert train.gpus_per_worker == 0.25 and train.param_dtype == "float32"


OMNIGLOT = {"task": {"name": "omniglot"}, "store": {"path": "episodes/omniglot"}, "model": {"network": "conv4"}}


@pytest.mark.parametrize(
    "task, message",
    [
        ({"ways": 401}, r"task.ways=401: the val split has only 400 classes"),
        ({"ways": 101, "rotations": False}, r"task.ways=101: the val split has only 100 classes"),
        ({"shots": 5, "queries": 16}, r"task.shots \+ task.queries = 5 \+ 16: a character has only 20 drawings"),
    ],
    ids=["ways-over-val-classes", "ways-without-rotations", "shots-plus-queries-over-drawings"],
)
def test_episodes_the_data_set_cannot_hold_are_refused(task, message):
    with pytest.raises(ConfigError, match=message):
        validate({**OMNIGLOT, "task": {"name": "omniglot", **task}})
    validate({**OMNIGLOT, "task": {"name": "omniglot", "ways": 20, "shots": 5, "queries": 15}})


def test_config_is_frozen():
    cfg = validate(BASE)
    with pytest.raises(Exception):
        cfg.train.steps = 5


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        load_config(bad)


@settings(max_examples=60, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
        max_leaves=10,
    )
)
def test_fuzzed_configs_either_validate_or_raise_config_error(raw):
    try:
        validate(raw if isinstance(raw, dict) else {"task": raw, "store": {"path": "x"}})
    except ConfigError as e:
        assert str(e).startswith("invalid config")


def test_sigmoid_mlp_only_for_l2l():
    with pytest.raises(ConfigError, match="model.activation: sigmoid is used only by l2l"):
        validate({**BASE, "model": {"network": "mlp", "activation": "sigmoid"}})


def test_conv4_with_max_pooling_needs_16_pixels():
    raw = {**OMNIGLOT, "task": {"name": "omniglot", "image_size": 12}, "model": {"network": "conv4", "downsample": "maxpool"}}
    with pytest.raises(ConfigError, match="task.image_size: this model.network needs images of at least 16x16, got 12"):
        validate(raw)
    validate({**raw, "model": {"network": "conv4", "downsample": "stride"}})


def test_a_left_out_model_is_the_network_the_task_inputs_call_for():
    assert validate({k: v for k, v in OMNIGLOT.items() if k != "model"}).model.network == "conv4"
    assert validate(BASE).model.network == "mlp"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model": {"hidden": [-3]}}, r"model.hidden.0: Input should be greater than or equal to 1 \(got -3\)"),
        ({"store": {"path": "x", "test_episodes": 0}}, "store.test_episodes: a run validates and tests on its store's test split"),
        ({"store": {"path": "x", "val_episodes": 0}}, "store.val_episodes: a run validates and tests on its store's val split"),
        (
            {"store": {"path": "x", "train_episodes": 1000}, "train": {"workers": 2, "meta_batch": 4}},
            r"train.workers \(2\): the store's 1000 training episodes make 1 row groups",
        ),
        ({"algorithm": {"inner_lr": float("inf")}}, "algorithm.inner_lr: Input should be a finite number"),
        ({"seed": 10**30}, "seed: Input should be less than 9223372036854775808"),
    ],
    ids=["negative-hidden", "no-test-episodes", "no-val-episodes", "workers-over-row-groups", "infinite-lr", "huge-seed"],
)
def test_values_that_would_fail_after_the_store_is_written_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        validate({**BASE, **changes})


def test_meta_lstm_bias_ranges_and_a_model_without_network_on_images():
    with pytest.raises(ConfigError, match=r"algorithm.forget_bias: low must not exceed high, got \[6.0, 4.0\]"):
        validate({**OMNIGLOT, "algorithm": {"name": "meta_lstm", "forget_bias": [6, 4]}})
    assert validate({**OMNIGLOT, "model": {"filters": 32}}).model.filters == 32


@pytest.mark.parametrize("value", ["", "  ", "two\nlines", "x" * 201], ids=["empty", "blank", "two-lines", "too-long"])
def test_description_is_one_line(value):
    with pytest.raises(ConfigError, match="description"):
        validate({**BASE, "description": value})


def test_an_adapt_params_glob_that_matches_no_parameter_is_refused_naming_it():
    images = {"task": {"name": "omniglot", "ways": 2, "shots": 1, "queries": 2, "image_size": 16}, "store": {"path": "e"},
              "model": {"network": "conv4", "filters": 2}}
    assert validate({**images, "algorithm": {"adapt_params": ["head.*"]}}).algorithm.adapt_params == ("head.*",)
    for algorithm in ("maml", "reptile"):
        with pytest.raises(ConfigError, match=r"algorithm\.adapt_params: 'heads\.\*' match no parameter of model\.network conv4"):
            validate({**images, "algorithm": {"name": algorithm, "adapt_params": ["conv*", "heads.*"]}})
    with pytest.raises(ConfigError, match=r"algorithm\.adapt_params"):
        validate({**images, "algorithm": {"adapt_params": []}})


MODULE_TASK = {"task": {"name": "omniglot", "ways": 2, "shots": 1, "queries": 2, "image_size": 16}, "store": {"path": "e"}}
USER = "tests.pipeline.nets.user_module:ResidualGroupNormNet"


@pytest.mark.parametrize(
    "model, message",
    [
        ({"factory": "tests.nowhere:Net"}, r"model\.factory: factory 'tests\.nowhere:Net': cannot import 'tests\.nowhere'"),
        ({"factory": "builtins:dict"}, r"model\.factory: factory 'builtins:dict' returned a dict, not a torch\.nn\.Module"),
        ({"factory": "torch.nn:ReLU"}, r"model\.factory: factory 'torch\.nn:ReLU' returned a module without parameters"),
        ({"factory": USER, "kwargs": {"in_channels": 1, "ways": 3}}, r"model\.factory: .* maps inputs \[2, 1, 16, 16\] to \[2, 3\].* needs \[2, 2\]"),
        ({"factory": USER, "kwargs": {"in_channels": 3, "ways": 2}}, r"model\.factory: .* fails on a batch of shape \[2, 1, 16, 16\]"),
    ],
    ids=["import-fails", "not-a-module", "no-parameters", "wrong-outputs", "wrong-inputs"],
)
def test_a_bad_module_factory_is_refused_naming_it(model, message):
    with pytest.raises(ConfigError, match=message):
        validate({**MODULE_TASK, "model": {"network": "module", **model}})
    ok = validate({**MODULE_TASK, "model": {"network": "module", "factory": USER, "kwargs": {"in_channels": 1, "ways": 2}}})
    assert ok.model.factory == USER


def test_support_norm_is_refused_with_the_meta_lstms_running_statistics_and_taken_otherwise():
    images = {"task": {"name": "omniglot", "ways": 2, "shots": 1, "queries": 2, "image_size": 16}, "store": {"path": "e"}}
    support = {"network": "conv4", "norm": "support"}
    with pytest.raises(ConfigError, match=r"algorithm\.eval_norm: running .* model\.norm: support does not apply"):
        validate({**images, "model": support, "algorithm": {"name": "meta_lstm"}})
    meta_lstm = validate({**images, "model": support, "algorithm": {"name": "meta_lstm", "eval_norm": "batch"}})
    protonet = validate({**images, "model": support, "algorithm": {"name": "protonet"}})
    assert meta_lstm.model.norm == protonet.model.norm == "support"


def test_reptile_inner_state_carried_needs_adam_and_tasks_one_after_the_other():
    reptile = {"name": "reptile", "inner_optimizer": "adam"}
    assert validate({**BASE, "algorithm": reptile}).algorithm.inner_state == "per_task"
    assert validate({**BASE, "algorithm": {**reptile, "inner_state": "carried"}}).algorithm.inner_state == "carried"
    with pytest.raises(ConfigError, match=r"algorithm\.inner_state: carried needs algorithm\.inner_optimizer: adam \(got 'sgd'"):
        validate({**BASE, "algorithm": {"name": "reptile", "inner_state": "carried"}})
    with pytest.raises(ConfigError, match=r"algorithm\.batching must be auto or loop, not stacked"):
        validate({**BASE, "algorithm": {**reptile, "inner_state": "carried", "batching": "stacked"}})
    with pytest.raises(ConfigError, match=r"algorithm\.inner_state.*'per_task' or 'carried'.*'whole_run'"):
        validate({**BASE, "algorithm": {**reptile, "inner_state": "whole_run"}})


def test_reptile_eval_state_defaults_to_the_inner_state_and_carried_needs_a_carried_state():
    reptile = {"name": "reptile", "inner_optimizer": "adam"}
    carried = validate({**BASE, "algorithm": {**reptile, "inner_state": "carried"}})
    assert carried.algorithm.eval_state is None and build_learner(carried).eval_state == "carried"  # openai's
    fresh = validate({**BASE, "algorithm": {**reptile, "inner_state": "carried", "eval_state": "fresh"}})
    assert build_learner(fresh).eval_state == "fresh"
    assert validate({**BASE, "algorithm": {**reptile, "eval_state": "fresh"}}).algorithm.eval_state == "fresh"
    with pytest.raises(ConfigError, match=r"algorithm\.eval_state: carried needs algorithm\.inner_state: carried \(got 'per_task'"):
        validate({**BASE, "algorithm": {**reptile, "eval_state": "carried"}})
