"""Training progress for a person at a terminal and for a job log.

On a terminal: a tqdm bar with the step, the last training loss and accuracy and
the last validation value under labels of their own (``train_loss``, ``train_acc``,
``val_acc``/``val_mse``) and the throughput. Anywhere else (``ray job logs``,
``python -m pipeline submit --follow``, a file, a pipe), where a bar's carriage
returns would show nothing until the run ends: one plain line every
``train.log_every`` steps and at the last, e.g.

    step 40/300 (13%)  train loss 0.5234 accuracy 81.25%  val accuracy 79.10% (step 30)  33.2 episodes/s  ETA 02:13

Evaluations after the loop (the meta-test) get a line when they start and one when they end.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

from tqdm import tqdm

from pipeline.runtime.callbacks import StepEnd


def _value(metric: str, value: float) -> str:
    """An accuracy as a percentage, anything else (loss, mse) with 4 decimals."""
    return f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.4f}"


class Progress:
    """A step callback that shows the run's progress on ``stream`` (a bar on a terminal, else plain lines).

    ``total``: the run's last step; ``initial``: the step it starts from (a resumed run);
    ``every``: steps between plain lines; ``stream``: default sys.stderr; ``enabled=False`` shows nothing; ``clock``:
    seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        total: int,
        initial: int,
        every: int,
        stream: TextIO | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        stream = stream or sys.stderr  # looked up now: tests and tools replace sys.stderr
        self._total, self._every, self._stream, self._enabled, self._clock = total, every, stream, enabled, clock
        self._bar = tqdm(total=total, initial=initial, unit="step", file=stream, disable=not (enabled and stream.isatty()))
        self._start_step, self._start_time = initial, clock()
        self._line_time, self._line_episodes = self._start_time, 0
        self._val: tuple[str, float, int] | None = None

    @property
    def plain(self) -> bool:
        """Whether progress goes out as plain lines (enabled, and the stream is not a terminal)."""
        return self._enabled and self._bar.disable

    def on_step(self, step: StepEnd) -> None:
        for metric in ("accuracy", "mse"):
            if f"val/{metric}" in step.metrics:
                self._val = (metric, step.metrics[f"val/{metric}"], step.version)
        self._line_episodes += sum(r.n_episodes for r in step.reports)
        if not self._bar.disable:
            self._bar.update(step.version - self._bar.n)  # back after a server restore
            self._bar.set_postfix(self._postfix(step.metrics), refresh=False)
        elif self.plain and (step.version % self._every == 0 or step.last):
            self._stream.write(self.line(step) + "\n")
            self._stream.flush()

    def _postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        shown = {label: f"{metrics[key]:.4f}" for key, label in (("train/loss", "train_loss"), ("train/accuracy", "train_acc"))
                 if key in metrics}
        if self._val is not None:
            metric, value, _ = self._val
            shown["val_acc" if metric == "accuracy" else "val_mse"] = f"{value:.4f}"
        shown["ep/s"] = f"{metrics['throughput/episodes_per_s']:.1f}"
        return shown

    def line(self, step: StepEnd) -> str:
        """The plain line of ``step``: step/total, train loss and accuracy, the last validation, episodes/s since the
        previous line and the ETA at the mean pace since the start (both include validation time)."""
        now = self._clock()
        parts = [f"step {step.version}/{self._total} ({100 * step.version // self._total}%)"]
        train = [f"{name} {_value(name, step.metrics[f'train/{name}'])}" for name in ("loss", "accuracy") if f"train/{name}" in step.metrics]
        if train:
            parts.append("train " + " ".join(train))
        if self._val is not None:
            metric, value, at = self._val
            parts.append(f"val {metric} {_value(metric, value)} (step {at})")
        elapsed = now - self._line_time
        if elapsed > 0:
            parts.append(f"{self._line_episodes / elapsed:.1f} episodes/s")
        done = step.version - self._start_step
        if done > 0 and not step.last:
            parts.append(f"ETA {tqdm.format_interval((now - self._start_time) / done * (self._total - step.version))}")
        self._line_time, self._line_episodes = now, 0
        return "  ".join(parts)

    @contextmanager
    def evaluating(self, what: str, episodes: int) -> Iterator[None]:
        """Lines around an evaluation of ``episodes`` episodes: ``<what>: N episodes...`` and ``<what>: done in T``."""
        if not self._enabled:
            yield
            return
        self._bar.close()  # the loop is over: the lines go below its bar
        start = self._clock()
        print(f"{what}: {episodes} episodes...", file=self._stream, flush=True)
        yield
        print(f"{what}: done in {tqdm.format_interval(self._clock() - start)}", file=self._stream, flush=True)

    def close(self) -> None:
        """End the bar (plain lines need no ending)."""
        self._bar.close()
