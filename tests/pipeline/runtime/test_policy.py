"""The failure policy's decision for each failure case; it decides, it does not act."""
import numpy as np
import pytest

from pipeline.runtime.policy import MAX_SERVER_RESTORES, Continue, FailurePolicy, GiveUp, ReplaceWorker, RestoreServer
from pipeline.runtime.server import PushResult
from pipeline.runtime.worker import StepReport

policy = FailurePolicy(max_bad_grads=3)


def report(worker: int, accepted: bool) -> StepReport:
    result = PushResult(accepted, "" if accepted else "non-finite gradient", 0, False, 0)
    return StepReport(worker, 0, 4, {"loss": np.nan}, {}, {}, result)


@pytest.mark.parametrize("deaths, decision", [(1, ReplaceWorker(1)), (3, ReplaceWorker(1))], ids=["first-death", "third-death"])
def test_a_dead_worker_is_replaced(deaths, decision):
    assert policy.worker_died(1, deaths, RuntimeError("killed")) == decision


def test_a_worker_dying_four_times_in_one_step_ends_the_run():
    decision = policy.worker_died(1, 4, RuntimeError("killed"))
    assert decision == GiveUp("worker 1 died or hung 4 times in one call: killed")


@pytest.mark.parametrize("in_a_row", range(1, MAX_SERVER_RESTORES + 1), ids=lambda n: f"restore-{n}")
def test_a_dead_server_is_restored_while_checkpoints_come_between(in_a_row):
    assert policy.server_died(in_a_row, RuntimeError("gone")) == RestoreServer()


def test_a_server_dying_again_and_again_without_a_checkpoint_ends_the_run():
    decision = policy.server_died(MAX_SERVER_RESTORES + 1, RuntimeError("gone"))
    assert isinstance(decision, GiveUp) and not decision.checkpoint
    assert decision.reason == f"the parameter server died {MAX_SERVER_RESTORES + 1} times with no checkpoint between: gone"


@pytest.mark.parametrize("bad_in_a_row", [0, 2], ids=["none", "below-limit"])
def test_rejected_gradients_below_the_limit_go_on(bad_in_a_row):
    assert policy.after_step(bad_in_a_row, [report(0, True), report(1, False)]) == Continue()


def test_max_bad_grads_in_a_row_stop_the_run_with_a_checkpoint_naming_the_workers():
    decision = policy.after_step(3, [report(0, True), report(1, False)])
    assert decision == GiveUp(
        "3 rejected gradients in a row (train.max_bad_grads=3); last: ['worker 1 at version 0: non-finite gradient']", checkpoint=True
    )
