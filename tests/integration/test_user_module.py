"""A user's own nn.Module (GroupNorm + a residual connection) through the front door: train on Omniglot,
export, load in a fresh process that adapts it, and serve the MLflow model from another folder."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.helpers import small_omniglot_run

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
FACTORY = "tests.pipeline.nets.user_module:ResidualGroupNormNet"

ADAPT = """
import sys, torch, pipeline
learner = pipeline.load(sys.argv[1])
gen = torch.Generator().manual_seed(0)
x = torch.rand(5, 1, 14, 14, generator=gen)
logits = learner.adapt(x, torch.arange(5))(x)
print(json.dumps({"shape": list(logits.shape), "factory": learner.config.model.factory}))
"""

SERVE = """
import base64, io, sys, numpy as np, mlflow.pyfunc
from PIL import Image
model = mlflow.pyfunc.load_model(sys.argv[1])
def png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
images = [png(p) for p in (np.random.default_rng(0).random((5, 14, 14)) * 255).astype(np.uint8)]
print(json.dumps({"labels": model.predict({"support_images": images, "support_labels": [0, 1, 2, 3, 4], "query_images": images})}))
"""


def python(code: str, *args: str, cwd: Path, pythonpath: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env |= {"PYTHONPATH": pythonpath} if pythonpath else {}
    out = subprocess.run([sys.executable, "-c", "import json\n" + code, *args], cwd=cwd, env=env, capture_output=True, check=False,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_user_module_trains_exports_loads_and_serves(tmp_path):
    raw = small_omniglot_run(tmp_path, "user-module")
    raw["task"]["image_size"] = 14  # a tiny Omniglot in the data set's own layout (tests/helpers.py)
    raw |= {
        "model": {"network": "module", "factory": FACTORY, "kwargs": {"in_channels": 1, "ways": 5, "width": 4}},
        "algorithm": {"name": "maml", "inner_lr": 0.4, "inner_steps": 1},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    trained = subprocess.run(
        [sys.executable, "-m", "pipeline", "train", str(tmp_path / "run.yaml"), "--export", str(tmp_path / "exported")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert re.search(r"^test accuracy \d+\.\d+% \+- ", trained.stdout, re.MULTILINE), trained.stdout[-2000:]
    run_id = re.search(r"^run_id: (\w+)$", trained.stdout, re.MULTILINE).group(1)

    # a fresh process imports the factory (its package on PYTHONPATH), never unpickles, and adapts
    loaded = python(ADAPT, str(tmp_path / "exported"), cwd=tmp_path, pythonpath=str(REPO))
    assert loaded == {"shape": [5, 5], "factory": FACTORY}

    # the MLflow model carries the module's code: it loads and predicts from another folder, no PYTHONPATH
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (logged,) = client.search_logged_models(experiments, filter_string=f"source_run_id = '{run_id}'")
    mlruns = next((p for p in (tmp_path / "mlruns").rglob("MLmodel") if logged.model_id in p.parts), None)
    assert mlruns is not None, "no pyfunc model logged"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    served = python(SERVE, str(mlruns.parent), cwd=elsewhere, pythonpath=None)
    assert len(served["labels"]) == 5 and all(0 <= label < 5 for label in served["labels"])
    assert (mlruns.parent / "code" / "tests" / "pipeline" / "nets" / "user_module.py").is_file()
