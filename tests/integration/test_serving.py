"""The served model through a real ``mlflow models serve`` on 127.0.0.1: the README's curl example, every request
form for image and tensor tasks, and a 400 naming the field of a malformed request."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.build import build_learner
from pipeline.config import TrackingConfig, validate
from pipeline.export.directory import ExportedLearner, export, load
from pipeline.export.pyfunc import model_arguments
from pipeline.export.requests import predict_task
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.tracking.model_registry import MODEL_PATH
from tests.helpers import ROOT, base_env, free_port, http_ok, stop_tree, wait_until
from tests.pipeline.export.test_pyfunc import TASKS, forms

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Served:
    url: str
    example: dict[str, Any]
    learner: ExportedLearner


@pytest.fixture(scope="module", params=list(TASKS))
def served(request, tmp_path_factory) -> Iterator[Served]:
    """An untrained export logged as the pyfunc model of a run in SQLite, served by ``mlflow models serve``."""
    root = tmp_path_factory.mktemp(f"serve-{request.param}")
    make_config, episode = TASKS[request.param]
    config = validate(make_config())
    out = export(build_learner(config).init(config.seed), config, root / "export")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    tracker = MlflowTracker(TrackingConfig(uri=uri, experiment="serving"), "served")
    arguments = model_arguments(out, episode())
    tracker.log_model(MODEL_PATH, **arguments)
    tracker.finish()
    port = free_port()
    log = root / "serve.log"
    env = base_env(root) | {"MLFLOW_TRACKING_URI": uri}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # this Python's mlflow and uvicorn
    command = ["mlflow", "models", "serve", "-m", f"runs:/{tracker.run_id}/{MODEL_PATH}", "--env-manager", "local"]
    with log.open("w") as output:
        server = subprocess.Popen(
            [*command, "--host", "127.0.0.1", "-p", str(port)],
            cwd=root, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_ok(f"{url}/ping"), "mlflow models serve", 180, server, log)
        yield Served(url, arguments["input_example"], load(out))
    finally:
        stop_tree(server.pid)


def post(url: str, body: bytes) -> tuple[int, Any]:
    request = urllib.request.Request(f"{url}/invocations", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_every_request_form_over_http_gives_the_predictions_of_the_export(served: Served) -> None:
    expected = predict_task(served.learner, served.example)
    for form, body in forms(served.example).items():
        assert post(served.url, json.dumps(body).encode()) == (200, {"predictions": expected}), form


def test_a_malformed_request_over_http_is_a_400_naming_the_field(served: Served) -> None:
    first = next(iter(served.example))
    broken = {key: value for key, value in served.example.items() if key != first}
    status, answer = post(served.url, json.dumps({"inputs": broken}).encode())
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE" and first in answer["message"], answer
    status, answer = post(served.url, b"{not json")
    assert status == 400, answer


def readme_curl() -> list[str]:
    """The curl command of the README's serving example, as arguments."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^    (curl -s http://127\.0\.0\.1:5001/invocations .*)$", text, re.MULTILINE)
    assert match, "README.md has no curl example of the served model"
    return shlex.split(match.group(1))


@pytest.mark.parametrize("served", ["sinusoid"], indirect=True)  # the README's example is a sinusoid request
def test_the_readme_curl_example_is_answered_with_a_prediction_per_query(served: Served) -> None:
    curl = readme_curl()
    body = json.loads(curl[curl.index("-d") + 1])
    curl[curl.index("http://127.0.0.1:5001/invocations")] = f"{served.url}/invocations"
    answer = subprocess.run(curl, capture_output=True, text=True, timeout=60, check=True)
    predictions = json.loads(answer.stdout)["predictions"]
    assert predictions == predict_task(served.learner, body["inputs"])
    assert len(predictions) == len(body["inputs"]["query_x"]) and all(math.isfinite(p[0]) for p in predictions)
    assert "mlflow models serve -m runs:/RUN_ID/model --env-manager local --host 127.0.0.1 --port 5001" in (ROOT / "README.md").read_text()
