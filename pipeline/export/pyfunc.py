"""The MLflow pyfunc model of an export (logged as "models from code": nothing is pickled).

A request carries one few-shot task and returns a prediction per query:

    {"inputs": {"support_images": [<base64 PNG>, ...], "support_labels": [0, 1, ...],
                "query_images": [<base64 PNG>, ...]}}

or, with tensors instead of image files (regression tasks too):

    {"inputs": {"support_x": [...], "support_y": [...], "query_x": [...]}}

Classification returns predicted labels; regression returns the outputs.
"""
from __future__ import annotations

import base64
import io
from typing import Any

import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models import set_model


def _field(model_input: Any, name: str) -> Any:
    if hasattr(model_input, "iloc"):  # a pandas DataFrame: one row per task
        return model_input[name].iloc[0]
    return model_input.get(name)


def _images(encoded: Any) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(base64.b64decode(str(item)))) for item in np.asarray(encoded).reshape(-1)]


def task_tensors(learner: Any, model_input: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support inputs, support targets and query inputs of one request."""
    if _field(model_input, "support_images") is not None:
        support_x = learner.preprocess(_images(_field(model_input, "support_images")))
        query_x = learner.preprocess(_images(_field(model_input, "query_images")))
        support_y = torch.as_tensor(np.asarray(_field(model_input, "support_labels"), dtype=np.int64))
        return support_x, support_y, query_x
    support_y = np.asarray(_field(model_input, "support_y"))
    dtype = np.int64 if np.issubdtype(support_y.dtype, np.integer) else np.float32
    return (
        torch.as_tensor(np.asarray(_field(model_input, "support_x"), dtype=np.float32)),
        torch.as_tensor(support_y.astype(dtype)),
        torch.as_tensor(np.asarray(_field(model_input, "query_x"), dtype=np.float32)),
    )


class FewShotModel(mlflow.pyfunc.PythonModel):
    """Adapts the exported meta-learner to the request's support set and predicts its queries."""

    def load_context(self, context: Any) -> None:
        from pipeline.export.directory import load

        self.learner = load(context.artifacts["export"])

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> list[Any]:
        support_x, support_y, query_x = task_tensors(self.learner, model_input)
        outputs = self.learner.adapt(support_x, support_y)(query_x)
        if support_y.is_floating_point():
            return outputs.tolist()
        return outputs.argmax(-1).tolist()


set_model(FewShotModel())
