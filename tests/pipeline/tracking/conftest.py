"""As in tests/pipeline/runtime: every test runs in its own folder (MLflow's ./mlruns stays out of the checkout)."""
from tests.pipeline.runtime.conftest import in_tmp_path  # noqa: F401 - an autouse fixture
