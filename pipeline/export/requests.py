"""The request format of the served model (pipeline/export/pyfunc.py): parse and check one task, predict it.

A request carries one few-shot task, in any form MLflow's scoring server accepts (a
DataFrame has one row: the task):

    {"inputs": {"support_images": [<base64 PNG/JPEG>, ...], "support_labels": [0, 1, ...],
                "query_images": [<base64 PNG/JPEG>, ...]}}
    {"dataframe_split": {"columns": ["support_images", "support_labels", "query_images"],
                         "data": [[[<base64>, ...], [0, 1, ...], [<base64>, ...]]]}}
    {"dataframe_records": [{"support_images": [...], "support_labels": [...], "query_images": [...]}]}

Image tasks take images; every other task takes nested lists of numbers: ``support_x``
``[K, *input_shape]``, ``support_y`` (labels ``[K]`` in 0..N-1 for classification,
targets ``[K, outputs]`` for regression, y ``[D]`` for a quadratic), ``query_x``
``[Q, *input_shape]``. The response is a predicted label (classification) or output
(regression) per query. A malformed request raises ``MlflowException`` with
INVALID_PARAMETER_VALUE naming the field, which the scoring server answers with a 400.
"""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any

import numpy as np
import torch
from mlflow.exceptions import MlflowException

from tasks.episodes import Episodes
from tasks.family import TaskSpec

IMAGE_FIELDS = ("support_images", "support_labels", "query_images")
TENSOR_FIELDS = ("support_x", "support_y", "query_x")
IMAGE_FORMATS = ("PNG", "JPEG")


def bad_request(message: str) -> MlflowException:
    """The error a malformed request raises: the scoring server answers it with HTTP 400."""
    return MlflowException.invalid_parameter_value(message)


def request_fields(spec: TaskSpec) -> tuple[str, str, str]:
    """The request's support inputs, support targets and query inputs fields for a task of ``spec``."""
    return IMAGE_FIELDS if spec.is_image else TENSOR_FIELDS


def _fields(model_input: Any, names: tuple[str, ...]) -> list[Any]:
    """The values of ``names`` in a request: a dict, or a one-row DataFrame (what the scoring server makes of
    every request form under the signature)."""
    if hasattr(model_input, "iloc"):
        if len(model_input) != 1:
            raise bad_request(f"one task per request: got {len(model_input)} rows")
        model_input = model_input.iloc[0]
    elif not isinstance(model_input, dict):
        raise bad_request(f"a request is a dict or a one-row DataFrame of {list(names)}, got {type(model_input).__name__}")
    missing = [name for name in names if name not in model_input or model_input[name] is None]
    if missing:
        raise bad_request(f"request field(s) {missing} missing; this model takes {list(names)}")
    return [model_input[name] for name in names]


def _numbers(field: str, values: Any, shape: tuple[int, ...], dtype: type) -> np.ndarray:
    """``values`` as an array of ``shape`` (-1: any length of at least 1)."""
    try:
        array = np.asarray(_nested_lists(values), dtype=dtype)
    except (TypeError, ValueError):
        raise bad_request(f"{field}: not a nested list of numbers of shape {_shape_text(shape)}") from None
    if array.ndim != len(shape) or any(want not in (-1, got) for want, got in zip(shape, array.shape)) or 0 in array.shape:
        raise bad_request(f"{field}: shape {list(array.shape)}, this model takes {_shape_text(shape)}")
    if dtype is np.float32 and not np.isfinite(array).all():
        raise bad_request(f"{field}: holds a NaN or infinite value")
    return array


def _nested_lists(values: Any) -> Any:
    """Numpy object arrays (what a DataFrame cell holds) as nested lists, so a ragged one is refused."""
    if isinstance(values, np.ndarray) and values.dtype == object:
        return [_nested_lists(v) for v in values]
    if isinstance(values, (list, tuple)):
        return [_nested_lists(v) for v in values]
    return values


def _shape_text(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("any" if n == -1 else str(n) for n in shape) + "]"


def _labels(field: str, values: Any, count: int, ways: int) -> np.ndarray:
    """Class labels: ``count`` integers in 0..ways-1."""
    raw = _numbers(field, values, (-1,), np.float64)
    if len(raw) != count:
        raise bad_request(f"{field}: {len(raw)} labels for {count} support examples")
    if not (raw == np.round(raw)).all() or raw.min() < 0 or raw.max() > ways - 1:
        raise bad_request(f"{field}: labels must be integers in 0..{ways - 1} (this model is {ways}-way), got {raw.tolist()}")
    return raw.astype(np.int64)


def _images(field: str, values: Any) -> list[Any]:
    """Base64 PNG or JPEG files as PIL images."""
    from PIL import Image, UnidentifiedImageError

    items = list(values) if isinstance(values, (list, tuple, np.ndarray)) else None
    if not items or not all(isinstance(item, str) for item in items):
        raise bad_request(f"{field}: a non-empty list of base64-encoded PNG or JPEG files")
    images = []
    for i, item in enumerate(items):
        try:
            image = Image.open(io.BytesIO(base64.b64decode(item, validate=True)))
            image.load()
        except (binascii.Error, UnidentifiedImageError, OSError, ValueError):
            raise bad_request(f"{field}[{i}]: not a base64-encoded PNG or JPEG file") from None
        if image.format not in IMAGE_FORMATS:
            raise bad_request(f"{field}[{i}]: a {image.format} image; this model takes PNG or JPEG")
        images.append(image)
    return images


def task_tensors(learner: Any, model_input: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support inputs, support targets and query inputs of one request, checked against the learner's task.

    Raises MlflowException (INVALID_PARAMETER_VALUE) naming the field that is missing or malformed.
    """
    spec = learner.config.task_spec
    names = request_fields(spec)
    support, targets, query = _fields(model_input, names)
    if spec.is_image:
        support_x = learner.preprocess(_images(names[0], support))
        query_x = learner.preprocess(_images(names[2], query))
        support_y = _labels(names[1], targets, len(support_x), spec.outputs)
        return support_x, torch.from_numpy(support_y), query_x
    if spec.loss == "quadratic":  # one optimizee problem: W [D, D] and y [D]; the query is its W again
        support_x = _numbers(names[0], support, spec.input_shape, np.float32)
        support_y = _numbers(names[1], targets, (spec.outputs,), np.float32)
        query_x = _numbers(names[2], query, spec.input_shape, np.float32)
        return torch.from_numpy(support_x), torch.from_numpy(support_y), torch.from_numpy(query_x)
    support_x = _numbers(names[0], support, (-1, *spec.input_shape), np.float32)
    query_x = _numbers(names[2], query, (-1, *spec.input_shape), np.float32)
    if spec.loss == "cross_entropy":
        labels = torch.from_numpy(_labels(names[1], targets, len(support_x), spec.outputs))
        return torch.from_numpy(support_x), labels, torch.from_numpy(query_x)
    support_y = _numbers(names[1], targets, (len(support_x), spec.outputs), np.float32)
    return torch.from_numpy(support_x), torch.from_numpy(support_y), torch.from_numpy(query_x)


def predict_task(learner: Any, model_input: Any) -> list[Any]:
    """Adapt ``learner`` to the request's support set; a label (classification) or output per query."""
    support_x, support_y, query_x = task_tensors(learner, model_input)
    outputs = learner.adapt(support_x, support_y)(query_x)
    if learner.config.task_spec.loss == "cross_entropy":
        return outputs.argmax(-1).tolist()
    return outputs.tolist()


def _png(image: np.ndarray) -> str:
    """A uint8 ``[C, H, W]`` image as a base64 PNG file."""
    from PIL import Image

    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _image_files(learner: Any, images: torch.Tensor) -> list[str]:
    """Episode images ``[N, C, H, W]`` in [0, 1] as base64 PNG files that ``learner.preprocess`` maps back to them.

    A family's stored pixels are its files' (Mini-ImageNet) or their negative (Omniglot: ink = 1.0 on
    paper 0.0, drawn dark on white); the polarity whose files preprocess back to the episode is chosen.
    """
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    candidates = [[_png(p) for p in pixels], [_png(255 - p) for p in pixels]]

    def error(files: list[str]) -> float:
        return float((learner.preprocess(_images("example", files)) - images).abs().max())

    return min(candidates, key=error)


def example_request(learner: Any, episode: Episodes, max_queries: int = 5) -> dict[str, Any]:
    """A request built from one stored episode (batch of 1): its whole support set and its first queries."""
    spec = learner.config.task_spec
    names = request_fields(spec)
    support_x, support_y, query_x = episode.support_x[0], episode.support_y[0], episode.query_x[0]
    if spec.is_image:
        return {
            names[0]: _image_files(learner, support_x), names[1]: support_y.tolist(),
            names[2]: _image_files(learner, query_x[:max_queries]),
        }
    if spec.loss != "quadratic":
        query_x = query_x[:max_queries]
    return {names[0]: support_x.tolist(), names[1]: support_y.tolist(), names[2]: query_x.tolist()}


