"""Progress: plain lines for a job log (any stream that is not a terminal), a labelled bar on a terminal."""
from __future__ import annotations

import io
from types import SimpleNamespace

from pipeline.runtime.callbacks import StepEnd
from pipeline.runtime.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def step(version: int, episodes: int = 8, last: bool = False, **metrics: float) -> StepEnd:
    reports = [SimpleNamespace(n_episodes=episodes // 2), SimpleNamespace(n_episodes=episodes - episodes // 2)]
    return StepEnd(version, last, reports, {"throughput/episodes_per_s": 10.0, **metrics})


def test_a_stream_that_is_not_a_terminal_gets_a_plain_line_every_log_every_steps_and_at_the_last():
    stream, clock = io.StringIO(), Clock()
    progress = Progress(total=10, initial=0, every=4, stream=stream, clock=clock)
    assert progress.plain
    for version in range(1, 11):
        clock.now += 2.0  # 2 s per step of 8 episodes: 4 episodes/s
        metrics = {"train/loss": 0.5 / version, "train/accuracy": 0.05 * version}
        if version == 3:
            metrics["val/accuracy"] = 0.625
        progress.on_step(step(version, last=version == 10, **metrics))
    progress.close()
    assert stream.getvalue().splitlines() == [
        "step 4/10 (40%)  train loss 0.1250 accuracy 20.00%  val accuracy 62.50% (step 3)  4.0 episodes/s  ETA 00:12",
        "step 8/10 (80%)  train loss 0.0625 accuracy 40.00%  val accuracy 62.50% (step 3)  4.0 episodes/s  ETA 00:04",
        "step 10/10 (100%)  train loss 0.0500 accuracy 50.00%  val accuracy 62.50% (step 3)  4.0 episodes/s",
    ]
    assert "\r" not in stream.getvalue()


def test_plain_lines_of_a_resumed_regression_run_count_from_where_it_resumed():
    stream, clock = io.StringIO(), Clock()
    progress = Progress(total=100, initial=90, every=5, stream=stream, clock=clock)
    clock.now += 10.0
    progress.on_step(step(95, episodes=50, **{"train/loss": 0.25, "val/mse": 0.125}))
    assert stream.getvalue() == "step 95/100 (95%)  train loss 0.2500  val mse 0.1250 (step 95)  5.0 episodes/s  ETA 00:10\n"


def test_a_terminal_gets_a_bar_with_train_and_validation_under_their_own_labels():
    stream = Terminal()
    progress = Progress(total=10, initial=0, every=4, stream=stream)
    assert not progress.plain
    progress.on_step(step(4, **{"train/loss": 0.5, "train/accuracy": 0.75, "val/accuracy": 0.625}))
    progress.on_step(step(5, **{"train/loss": 0.25, "train/accuracy": 0.875}))
    progress._bar.refresh()
    assert progress._bar.n == 5
    assert "train_loss=0.2500, train_acc=0.8750, val_acc=0.6250, ep/s=10.0" in stream.getvalue().split("\r")[-1]
    progress.on_step(step(2, **{"val/mse": 0.125}))  # back after a server restore
    progress._bar.refresh()
    assert progress._bar.n == 2 and "val_mse=0.1250" in stream.getvalue().split("\r")[-1]
    progress.close()
    assert "\n" not in stream.getvalue()[:-1]  # one bar, redrawn in place


def test_an_evaluation_gets_a_line_when_it_starts_and_ends_and_quiet_shows_nothing():
    stream, clock = io.StringIO(), Clock()
    progress = Progress(total=10, initial=0, every=4, stream=stream, clock=clock)
    with progress.evaluating("meta-test", 600):
        assert stream.getvalue() == "meta-test: 600 episodes...\n"
        clock.now += 75.0
    assert stream.getvalue().splitlines()[-1] == "meta-test: done in 01:15"

    quiet_stream = Terminal()
    quiet = Progress(total=10, initial=0, every=1, stream=quiet_stream, enabled=False)
    quiet.on_step(step(1, last=True, **{"train/loss": 0.5}))
    with quiet.evaluating("meta-test", 600):
        pass
    quiet.close()
    assert not quiet.plain and quiet_stream.getvalue() == ""
