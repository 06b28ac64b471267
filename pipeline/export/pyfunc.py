"""The MLflow pyfunc model of an export (logged as "models from code": nothing is pickled).

The request format and its checks are in ``pipeline/export/requests.py``: one few-shot task per
request, in any form MLflow's scoring server accepts; a malformed one is answered with a 400
naming the field. The model is logged with a signature and an input example made of a stored episode.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import torch
from mlflow.models import set_model

from pipeline.export.requests import predict_task
from tasks.episodes import Episodes

ROOT = Path(__file__).resolve().parents[2]
"""The project folder, whose ``pipeline`` and ``tasks`` packages the model's code is."""


class FewShotModel(mlflow.pyfunc.PythonModel):
    """Adapts the exported meta-learner to the request's support set and predicts its queries."""

    def load_context(self, context: Any) -> None:
        from pipeline.export.directory import load

        self.learner = load(context.artifacts["export"])

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would read them as the model's schema
        """One request (a dict, or the one-row DataFrame the scoring server makes of it) -> a prediction per query."""
        return predict_task(self.learner, model_input)


def model_arguments(export_dir: Path, example: Episodes) -> dict[str, Any]:
    """The keyword arguments of ``mlflow.pyfunc.log_model`` / ``save_model`` for the export in ``export_dir``
    (which goes in as the artifact ``export``): this file as the model's code, the project's packages (and a
    ``module`` network's factory code), pinned
    requirements, and a signature and input example made of ``example``'s first episode and its predictions."""
    from mlflow.models import infer_signature

    from pipeline.export.directory import factory_code, load
    from pipeline.export.requests import example_request

    learner = load(export_dir)
    request = example_request(learner, example[:1])
    return {
        "python_model": str(Path(__file__).resolve()),
        "artifacts": {"export": str(export_dir)},
        "code_paths": [str(ROOT / "pipeline"), str(ROOT / "tasks"), *map(str, factory_code(export_dir))],
        "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}", "safetensors", "pydantic", "pyyaml", "pyarrow", "pillow"],
        "signature": infer_signature(request, predict_task(learner, request)),
        "input_example": request,
    }


set_model(FewShotModel())
