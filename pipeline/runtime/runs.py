"""Read back what a tracked run produced: its config and its best or latest parameters."""
from __future__ import annotations

import tempfile
from pathlib import Path

from pipeline.build import build_learner
from pipeline.config import RunConfig, TrackingConfig, apply_overrides, validate
from pipeline.errors import RunError
from pipeline.evaluation import meta_test_state
from pipeline.runtime import checkpoint
from pipeline.runtime.flat_buffer import Layout
from pipeline.tracking.mlflow_tracker import MlflowTracker
from pipeline.types import Carry, Params


def load_run(
    run_id: str, tracking_uri: str | None, which: str = "best", overrides: list[str] | None = None
) -> tuple[RunConfig, Params, Carry | None]:
    """The run's config (with ``overrides`` applied), the parameters of checkpoint ``which`` and the state its
    meta-test adapts from (evaluation.meta_test_state: worker slot 0's carry in that checkpoint, for Reptile with
    ``algorithm.eval_state: carried``; None: a fresh start), as the run's own meta-test took them.

    Raises RunError when ``overrides`` change the number of parameters, or which parameters the carried state is of.
    """
    tracker = MlflowTracker(TrackingConfig(uri=tracking_uri), run_name="", run_id=run_id)
    scratch = Path(tempfile.mkdtemp(prefix="metapipe-run-"))
    ckpt = checkpoint.load(tracker.download(f"checkpoints/{which}", scratch))
    config = validate(apply_overrides(ckpt.config, overrides or []), f"run {run_id}")
    learner = build_learner(config)
    layout = Layout.of(learner.init(config.seed))
    if layout.numel != ckpt.server.params.numel():
        raise RunError(
            f"run {run_id}: its checkpoint holds {ckpt.server.params.numel()} parameters, the learner of its config"
            f" with --set {overrides} has {layout.numel}: --set may change how it adapts, not its parameters"
        )
    try:
        state = meta_test_state(learner, ckpt.positions)
    except ValueError as e:  # --set changed which parameters adapt (algorithm.adapt_params): the carry holds others
        raise RunError(
            f"run {run_id}: the inner state its checkpoint carried does not fit the learner of its config with --set"
            f" {overrides} ({e}); add --set algorithm.eval_state=fresh to adapt from a fresh start"
        ) from None
    return config, layout.unflatten(ckpt.server.params), state
