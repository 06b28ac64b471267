"""The served model in process: every request form of MLflow's scoring server gives the same predictions, and a
malformed request is a 400 naming the field (the scoring server's own ``invocations``, as ``mlflow models serve``
runs it)."""
from __future__ import annotations

import base64
import io
import json
import re
from typing import Any

import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from PIL import Image

from pipeline.build import build_learner
from pipeline.config import validate
from pipeline.export.directory import export, load
from pipeline.export.pyfunc import model_arguments
from pipeline.export.requests import predict_task
from tasks.episodes import Episodes

WAYS = 3


def omniglot_config() -> dict[str, Any]:
    return {
        "name": "served-omniglot", "seed": 1,
        "task": {"name": "omniglot", "ways": WAYS, "shots": 1, "queries": 2, "image_size": 28},
        "store": {"path": "unused"},
        "model": {"network": "conv4", "filters": 8},
        "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1},
    }


def sinusoid_config() -> dict[str, Any]:
    return {
        "name": "served-sinusoid", "seed": 1,
        "task": {"name": "sinusoid", "shots": 5, "queries": 4},
        "store": {"path": "unused"},
        "model": {"network": "mlp", "hidden": [8, 8]},
        "algorithm": {"name": "maml", "inner_lr": 0.01, "inner_steps": 1},
    }


def image_episode() -> Episodes:
    """One 3-way 1-shot episode of drawings: ink 1.0 on paper 0.0, a different stroke per class."""
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(2 * WAYS, 1, 28, 28, generator=generator) > 0.8).float()
    labels = torch.arange(WAYS).repeat(2)
    return Episodes(images[None, :WAYS], labels[None, :WAYS], images[None, WAYS:], labels[None, WAYS:])


def sinusoid_episode() -> Episodes:
    x = torch.linspace(-4, 4, 9).reshape(1, 9, 1)
    y = 2.0 * torch.sin(x - 0.5)
    return Episodes(x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])


TASKS = {"omniglot": (omniglot_config, image_episode), "sinusoid": (sinusoid_config, sinusoid_episode)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[Any, dict[str, Any], Any]]:
    """Per task: a saved pyfunc model of an untrained export, loaded back; its example request; the export."""
    made = {}
    for task, (make_config, episode) in TASKS.items():
        root = tmp_path_factory.mktemp(task)
        config = validate(make_config())
        out = export(build_learner(config).init(config.seed), config, root / "export")
        arguments = model_arguments(out, episode())
        mlflow.pyfunc.save_model(path=str(root / "model"), **arguments)
        made[task] = mlflow.pyfunc.load_model(str(root / "model")), arguments["input_example"], load(out)
    return made


def invoke(model: Any, body: dict[str, Any]) -> tuple[int, Any]:
    """What ``mlflow models serve`` answers a JSON request: (HTTP status, predictions or error message)."""
    try:
        response = scoring_server.invocations(json.dumps(body), "application/json", model, model.metadata.get_input_schema())
    except MlflowException as e:
        return e.get_http_status_code(), e.message
    return response.status, json.loads(response.response)["predictions"]


def forms(request: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The same request in each form the scoring server accepts."""
    return {
        "inputs": {"inputs": request},
        "dataframe_split": {"dataframe_split": {"columns": list(request), "data": [list(request.values())]}},
        "dataframe_records": {"dataframe_records": [request]},
    }


@pytest.mark.parametrize("task", TASKS)
def test_every_request_form_gives_the_predictions_of_the_export(models, task):
    model, example, learner = models[task]
    expected = predict_task(learner, example)
    assert len(expected) == len(next(reversed(example.values())))
    for form, body in forms(example).items():
        assert invoke(model, body) == (200, expected), form
    import pandas as pd

    assert model.predict(pd.DataFrame([example])) == expected  # in Python, a one-row DataFrame or a dict
    assert model.predict(example) == expected


def test_the_example_request_is_the_stored_episode(models):
    model, example, learner = models["omniglot"]
    episode = image_episode()
    files = [Image.open(io.BytesIO(base64.b64decode(f))) for f in example["support_images"]]
    assert all(f.format == "PNG" for f in files)
    assert torch.equal(learner.preprocess(files), episode.support_x[0])  # drawn dark on white, as the data set's files
    assert example["support_labels"] == episode.support_y[0].tolist() and len(example["query_images"]) == 3
    assert model.metadata.get_input_schema().input_names() == list(example)
    _, example, _ = models["sinusoid"]
    assert example["support_x"] == sinusoid_episode().support_x[0].tolist() and len(example["query_x"]) == 4


def png(pixels: np.ndarray, format: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=format)
    return base64.b64encode(buffer.getvalue()).decode()


def test_png_and_jpeg_images_are_served(models):
    model, example, _ = models["omniglot"]
    drawing = np.full((28, 28), 255, dtype=np.uint8)
    drawing[8:20, 8:20] = 0
    request = {**example, "query_images": [png(drawing), png(drawing, "JPEG")]}
    status, predictions = invoke(model, {"inputs": request})
    assert status == 200 and len(predictions) == 2 and all(p in range(WAYS) for p in predictions)


def gif() -> str:
    buffer = io.BytesIO()
    Image.new("L", (28, 28)).save(buffer, format="GIF")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE_FAULTS = {
    "missing-field": (lambda r: {k: v for k, v in r.items() if k != "query_images"}, "query_images"),
    "label-out-of-range": (lambda r: {**r, "support_labels": [0, 1, WAYS]}, f"support_labels: labels must be integers in 0..{WAYS - 1}"),
    "negative-label": (lambda r: {**r, "support_labels": [0, -1, 2]}, "support_labels: labels must be integers"),
    "fewer-labels-than-images": (lambda r: {**r, "support_labels": [0, 1]}, "support_labels: 2 labels for 3 support examples"),
    "not-base64": (lambda r: {**r, "query_images": ["%%%"]}, r"query_images\[0\]: not a base64-encoded PNG or JPEG"),
    "not-an-image": (lambda r: {**r, "support_images": [*r["support_images"][:2], base64.b64encode(b"hello").decode()]}, r"support_images\[2\]: not a base64"),
    "gif": (lambda r: {**r, "query_images": [gif()]}, r"query_images\[0\]: a GIF image; this model takes PNG or JPEG"),
    "no-images": (lambda r: {**r, "query_images": []}, "query_images"),
}
TENSOR_FAULTS = {
    "missing-field": (lambda r: {k: v for k, v in r.items() if k != "support_y"}, "support_y"),
    "wrong-width": (lambda r: {**r, "query_x": [[1.0, 2.0]]}, r"query_x: shape \[1, 2\], this model takes \[any, 1\]"),
    "targets-not-matching": (lambda r: {**r, "support_y": r["support_y"][:2]}, r"support_y: shape \[2, 1\], this model takes \[5, 1\]"),
    "ragged": (lambda r: {**r, "support_x": [[1.0], [2.0, 3.0], [1.0], [1.0], [1.0]]}, "support_x"),
    "not-numbers": (lambda r: {**r, "query_x": [["a"]]}, "query_x"),
    "no-queries": (lambda r: {**r, "query_x": []}, "query_x"),
}


FAULTS = [("omniglot", name, *fault) for name, fault in IMAGE_FAULTS.items()]
FAULTS += [("sinusoid", name, *fault) for name, fault in TENSOR_FAULTS.items()]


PARSED_BY_MLFLOW = {"ragged", "not-numbers"}
"""Values MLflow's own parser of the ``inputs`` form refuses against the signature's types, before the model sees
them: a 400 with MLflow's message, which does not name the column."""


@pytest.mark.parametrize(("task", "fault", "change", "message"), FAULTS, ids=[f"{t}-{f}" for t, f, *_ in FAULTS])
def test_a_malformed_request_is_a_400_naming_the_field(models, task, fault, change, message):
    model, example, _ = models[task]
    for form, body in forms(change(example)).items():
        status, answer = invoke(model, body)
        assert status == 400, (form, answer)
        expected = "Invalid input" if form == "inputs" and fault in PARSED_BY_MLFLOW else message
        assert re.search(expected, answer), (form, answer)


@pytest.mark.parametrize("task", TASKS)
def test_one_task_per_request(models, task):
    model, example, _ = models[task]
    status, answer = invoke(model, {"dataframe_records": [example, example]})
    assert status == 400 and "one task per request: got 2 rows" in answer
