"""Progress of one phase of known size (decoding, feature caching, scoring, calibration, parity, Grad-CAM,
audit): on stderr, so that stdout keeps only results.

In a terminal: a rich bar with the count, the rate and the time left, from the first item on. In a log
(stderr not a terminal) a phase that ends within FIRST_LINE_S prints nothing, so short phases add no lines;
a longer one prints a line at FIRST_LINE_S, then one every LOG_EVERY_S with the rate and the time left (from
a timer, so even one slow item cannot leave the log silent longer), and one when it ends."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

FIRST_LINE_S = 2.0  # a phase longer than this says so in a log, with its size
LOG_EVERY_S = 30.0  # and then never leaves the log silent longer than this


class _Rate(ProgressColumn):
    """The rate once rich has one (blank before the first items, not 'None /s')."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text("" if task.speed is None else f"{task.speed:.1f} {self.unit}/s")


class Phase:
    """`with Phase("scoring the test split", 2000) as phase: ... phase.advance(n)`."""

    def __init__(self, label: str, total: int, unit: str = "images", enabled: bool = True):
        self.label, self.total, self.unit, self.enabled = label, total, unit, enabled
        self.done, self.start, self.lines = 0, time.monotonic(), 0
        self.bar: Progress | None = None
        self.task = None
        self.stop = threading.Event()
        self.timer: threading.Thread | None = None

    def __enter__(self) -> Phase:
        if not self.enabled or self.total <= 0:
            return self
        console = Console(stderr=True)
        if console.is_terminal:
            self.bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), _Rate(self.unit),
                                TimeRemainingColumn(), console=console)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.label, total=self.total)
        else:
            self.timer = threading.Thread(target=self._log_lines, daemon=True)
            self.timer.start()
        return self

    def advance(self, n: int = 1) -> None:
        self.done += n  # a Python int: the timer thread only reads it
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
        if self.timer is not None:
            self.stop.set()
            self.timer.join()
            if self.lines and exc[0] is None:
                seconds = time.monotonic() - self.start
                self._line(f"{self.done:,} {self.unit} in {duration(seconds)} "
                           f"({self.done / max(seconds, 1e-9):.1f} {self.unit}/s)")

    def _log_lines(self) -> None:
        if self.stop.wait(FIRST_LINE_S):
            return
        self._line(f"{self.total:,} {self.unit}, {self._state()}")
        while not self.stop.wait(LOG_EVERY_S):
            self._line(self._state())

    def _state(self) -> str:
        done, seconds = self.done, time.monotonic() - self.start
        if not done:
            return f"0 done after {duration(seconds)}"
        rate = done / seconds
        return (f"{done:,}/{self.total:,} ({done / self.total:.0%}), {rate:.1f} {self.unit}/s, "
                f"{duration((self.total - done) / rate)} left")

    def _line(self, text: str) -> None:
        print(f"{self.label}: {text}", file=sys.stderr, flush=True)
        self.lines += 1


def track(items: Iterable, total: int, label: str, unit: str = "images", enabled: bool = True) -> Iterator:
    """`items` passed through, one step of a Phase each."""
    with Phase(label, total, unit, enabled) as phase:
        for item in items:
            yield item
            phase.advance()


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
