"""Parameter server: sync averaging, async staleness, non-finite rejection, each share applied once (in-process)."""
import numpy as np
import pytest
import torch

from pipeline.config import OptimizerConfig
from pipeline.optim.adam import adam
from pipeline.runtime.server import ParameterServer, Push

OPT = OptimizerConfig(lr=0.1)


def server(mode="sync", workers=2, staleness=0, steps=100):
    return ParameterServer(ParameterServer.fresh(torch.zeros(3)), OPT, steps, workers, mode, staleness)


def test_sync_waits_for_all_workers_and_weights_by_episodes():
    s = server()
    r0 = s.push(Push(0, 1, 0, np.array([1.0, 0.0, 0.0], np.float32), 3))
    assert r0.accepted and not r0.applied and s.version() == 0
    r1 = s.push(Push(1, 1, 0, np.array([0.0, 4.0, 0.0], np.float32), 1))
    assert r1.applied and s.version() == 1
    expected_grad = torch.tensor([0.75, 1.0, 0.0])
    optimizer = adam(0.1, OPT.betas, OPT.eps)
    delta, _ = optimizer.update(expected_grad, optimizer.init(torch.zeros(3)))
    torch.testing.assert_close(torch.from_numpy(s.pull()[1]), delta)


def test_sync_result_does_not_depend_on_arrival_order():
    g = [np.random.default_rng(i).normal(size=3).astype(np.float32) for i in range(3)]
    a, b = server(workers=3), server(workers=3)
    for i in (0, 1, 2):
        a.push(Push(i, 1, 0, g[i], i + 1))
    for i in (2, 0, 1):
        b.push(Push(i, 1, 0, g[i], i + 1))
    assert np.array_equal(a.pull()[1], b.pull()[1])


def test_sync_rejects_a_second_share_for_a_version_and_old_versions():
    s = server()
    s.push(Push(0, 1, 0, np.ones(3, np.float32), 1))
    assert s.push(Push(0, 2, 0, np.ones(3, np.float32), 1)).reason == "worker 0 already pushed share 1 for version 0"
    s.push(Push(1, 1, 0, np.ones(3, np.float32), 1))
    late = s.push(Push(0, 3, 0, np.ones(3, np.float32), 1))
    assert not late.accepted and s.stats()["rejected_stale"] == 1


def test_async_applies_each_push_and_rejects_stale():
    s = server(mode="async", staleness=1)
    for version in (0, 1):
        assert s.push(Push(0, version + 1, version, np.ones(3, np.float32), 1)).applied
    ok = s.push(Push(1, 1, 1, np.ones(3, np.float32), 1))
    assert ok.applied and ok.staleness == 1
    stale = s.push(Push(1, 2, 1, np.ones(3, np.float32), 1))
    assert not stale.accepted and stale.staleness == 2 and "stale by 2" in stale.reason
    assert s.version() == 3 and s.stats()["rejected_stale"] == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_nonfinite_gradients_are_rejected_and_counted(bad):
    s = server(mode="async")
    before = s.pull()[1]
    r = s.push(Push(0, 1, 0, np.array([1.0, bad, 0.0], np.float32), 1))
    assert not r.accepted and r.reason == "non-finite gradient"
    assert np.array_equal(s.pull()[1], before)
    assert s.stats()["rejected_nonfinite"] == 1 and s.stats()["bad_in_a_row"] == 1


def test_sync_step_with_one_bad_worker_applies_the_good_gradient():
    s = server()
    s.push(Push(0, 1, 0, np.array([np.nan, 0, 0], np.float32), 1))
    r = s.push(Push(1, 1, 0, np.array([1.0, 1.0, 1.0], np.float32), 1))
    assert r.applied and np.isfinite(s.pull()[1]).all()


def test_no_updates_past_the_last_step():
    s = server(mode="async", steps=1)
    assert s.push(Push(0, 1, 0, np.ones(3, np.float32), 1)).applied
    assert s.push(Push(0, 2, 1, np.ones(3, np.float32), 1)).reason == "run complete"


def test_wrong_gradient_shape_is_named():
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        server().push(Push(0, 1, 0, np.ones(2, np.float32), 1))


def test_sgd_with_a_linear_schedule_is_the_reptile_interpolation_of_openai():
    """openai/supervised-reptile: theta <- theta + eps_i * (mean phi - theta), eps_i = (i/n) final + (1 - i/n) initial."""
    steps, initial, final = 4, 1.0, 0.2
    opt = OptimizerConfig(name="sgd", lr=initial, schedule="linear", lr_final=final)
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    s = ParameterServer(ParameterServer.fresh(theta), opt, steps, 1)
    for i in range(steps):
        phi_mean = theta * 0.5 + i  # any adapted weights
        s.push(Push(0, i + 1, i, (theta - phi_mean).numpy().astype(np.float32), 1))  # Reptile's meta_grad
        eps = (i / steps) * final + (1 - i / steps) * initial
        theta = theta + eps * (phi_mean - theta)
        torch.testing.assert_close(torch.from_numpy(s.pull()[1]).double(), theta, atol=1e-5, rtol=1e-6)
    assert s.state().adam.step == steps and s.version() == steps


def test_constant_sgd_is_theta_minus_lr_grad():
    s = ParameterServer(ParameterServer.fresh(torch.ones(3)), OptimizerConfig(name="sgd", lr=0.5), 10, 1)
    s.push(Push(0, 1, 0, np.array([1.0, 2.0, -4.0], np.float32), 1))
    assert np.allclose(s.pull()[1], [0.5, 0.0, 3.0])


def grads(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(size=3).astype(np.float32) for _ in range(n)]


def sync_steps(s: ParameterServer, g: list[np.ndarray], lost: tuple[int, int] | None = None) -> list[np.ndarray]:
    """Two workers, one share each per step from ``g`` (step k: g[2k], g[2k+1]), each share pulled with
    ``pull_for``; ``lost`` = (step, worker): that push lands, its answer is lost, and the worker's replacement
    redoes the share (same number, pulled again). The parameters after each step."""
    after = []
    for step in range(len(g) // 2):
        for worker in (0, 1):
            version, _ = s.pull_for(worker, step + 1)
            first = s.push(Push(worker, step + 1, version, g[2 * step + worker], 1 + worker))
            if lost == (step, worker):
                version, flat = s.pull_for(worker, step + 1)
                assert version == step and np.array_equal(flat, after[-1] if after else np.zeros(3, np.float32))
                assert s.push(Push(worker, step + 1, version, g[2 * step + worker], 1 + worker)) == first
        after.append(s.pull()[1])
    return after


@pytest.mark.parametrize("worker", [0, 1], ids=["step-pending", "step-applied"])
def test_a_redone_share_whose_push_landed_is_applied_once(worker):
    """The redo of a call whose push landed and whose reply was lost pulls the parameters the lost call had and
    gets the first push's answer: every step's parameters equal an undisturbed run's. Worker 1's push completes
    the step, so its redo comes after the update (the multi-node fault); worker 0's while the step waits."""
    g = grads(8)
    undisturbed = sync_steps(server(), g)
    s = server()
    assert [a.tolist() for a in sync_steps(s, g, lost=(2, worker))] == [a.tolist() for a in undisturbed]
    assert s.version() == 4 and s.stats()["duplicate_shares"] == 1 and s.stats()["rejected_stale"] == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_late_push_of_a_replaced_worker_is_not_applied(mode):
    """A hung worker's share arriving after its replacement's, or after the slot's next share, changes nothing."""
    g = grads(3)
    s = server(mode=mode, workers=1)
    first = s.push(Push(0, 1, 0, g[0], 1))  # the replacement's share 1
    once = s.pull()[1]
    assert s.push(Push(0, 1, 0, g[1], 1)) == first  # the hung worker's share 1: the first push's answer
    assert np.array_equal(s.pull()[1], once) and s.version() == 1
    s.push(Push(0, 2, 1, g[2], 1))
    twice = s.pull()[1]
    old = s.push(Push(0, 1, 0, g[1], 1))
    assert not old.accepted and old.reason == "share 1 of worker 0 is older than its last, 2"
    assert np.array_equal(s.pull()[1], twice) and s.version() == 2 and s.stats()["duplicate_shares"] == 2


def test_an_async_redo_pulls_the_parameters_its_lost_call_had_while_they_are_the_last_ones():
    g = grads(3)
    s = server(mode="async")
    start = s.pull()[1]
    first = s.push(Push(0, 1, 0, g[0], 1))  # lands, its answer lost
    version, flat = s.pull_for(0, 1)
    assert version == 0 and np.array_equal(flat, start)
    s.push(Push(1, 1, 1, g[1], 1))  # another worker's update: version 0's parameters are gone
    now = s.pull()[1]
    version, flat = s.pull_for(0, 1)
    assert version == 2 and np.array_equal(flat, now)
    assert s.push(Push(0, 1, 2, g[2], 1)) == first and np.array_equal(s.pull()[1], now) and s.version() == 2


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_server_restored_from_its_state_applies_no_share_it_had_again(mode):
    """The record of shares is part of the state a checkpoint holds: the redo of a share that completed a step
    before the state was taken gets its answer and the parameters it was computed at, and changes nothing."""
    g = grads(3)
    s = server(mode=mode, workers=1)
    s.push(Push(0, 1, 0, g[0], 1))
    first = s.push(Push(0, 2, 1, g[1], 1))  # lands; its report is lost
    restored = ParameterServer(s.state(), OPT, 100, 1, mode)
    after = restored.pull()[1]
    version, flat = restored.pull_for(0, 2)
    assert version == 1 and np.array_equal(flat, s.state().before[1].numpy())
    assert restored.push(Push(0, 2, 1, g[2], 1)) == first
    assert np.array_equal(restored.pull()[1], after) and restored.version() == 2
    assert restored.push(Push(0, 3, 2, g[2], 1)).applied and restored.version() == 3


def test_the_state_leaves_out_a_sync_share_waiting_for_its_step_and_its_record():
    """Pending pushes are not in the state, so neither is their record: restored, the server takes the redo."""
    s = server()
    s.push(Push(0, 1, 0, grads(1)[0], 1))
    s.push(Push(1, 1, 0, grads(1)[0], 1))
    s.push(Push(0, 2, 1, grads(1)[0], 1))
    state = s.state()
    assert state.pending == {} and set(state.received) == {1} and state.before[0] == 0


def test_a_share_refused_because_the_run_was_complete_counts_in_a_longer_resumed_run():
    """``train.steps`` may grow on --resume: a push the shorter run refused is applied by the longer one."""
    g = grads(2)
    s = server(mode="async", steps=1)
    s.push(Push(0, 1, 0, g[0], 1))
    assert s.push(Push(1, 1, 0, g[1], 1)).reason == "run complete"
    longer = ParameterServer(s.state(), OPT, 2, 2, "async", 1)
    assert longer.push(Push(1, 1, 0, g[1], 1)).applied and longer.version() == 2
