"""A live progress bar (loss, accuracy, images/s, time left) and a line per epoch; silent with --quiet.

The loss and accuracy shown are read from the device every `interval` micro-steps (a tenth of the
epoch), never per step: the training loop reads its device sums only then (and at the epoch's end).
In a log (no terminal) the bar is not drawn: each epoch is one line, and a long epoch adds a progress
line with its time left whenever the log has been silent for LOG_SILENCE_S seconds (a timer looks each
second, so a line comes even between two reads; it shows the loss and accuracy of the last read)."""

from __future__ import annotations

import threading
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from imgcls.progress import duration

LOG_SILENCE_S = 30.0  # a log never goes longer than this without a line while an epoch runs (at 10% reads)


class Progress:
    def __init__(self, epochs: int, steps_per_epoch: int, batch_size: int, quiet: bool = False):
        self.epochs, self.steps, self.quiet = epochs, steps_per_epoch, quiet
        # micro-steps between two reads of the device sums: the loss check, the bar's loss and
        # accuracy, a log file's line and TensorBoard's per-step scalars all happen at these reads
        self.interval = max(1, steps_per_epoch // 10)
        self.console = Console(stderr=True)
        self.bar = RichProgress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  acc {task.fields[acc]:.3f}  {task.fields[ips]:.0f} img/s"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=quiet,
        )
        self.task = None
        self.last_line = time.monotonic()  # when the log last got a line
        self.meter, self.read = None, None  # the epoch's meter, and its loss and accuracy at the last read
        self.stop = threading.Event()
        self.watch = None

    def __enter__(self):
        self.bar.__enter__()
        if not self.quiet and not self.console.is_terminal:  # a log: a timer keeps it from going silent
            self.watch = threading.Thread(target=self._watch, daemon=True)
            self.watch.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.watch is not None:
            self.watch.join()
        self.bar.__exit__(*exc)

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            if self.meter is not None:
                self._step_line(self.meter)

    def start_epoch(self, epoch: int, meter) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task("train", total=self.steps, completed=meter.steps, epoch=epoch + 1,
                                      epochs=self.epochs, loss=0.0, acc=0.0, ips=0.0)

    def advance(self, meter) -> None:
        """After each step: the step count and rate only (Python numbers, nothing read from the device)."""
        self.meter = meter
        if not self.quiet:
            self.bar.update(self.task, completed=meter.steps, ips=meter.images / max(meter.seconds, 1e-9))

    def update(self, meter) -> None:
        """At a read (every `interval` steps): the loss and accuracy, which `meter` has just read."""
        if self.quiet:
            return
        n = max(meter.images, 1)
        loss, acc, ips = meter.loss_sum / n, meter.correct / n, meter.images / max(meter.seconds, 1e-9)
        self.meter, self.read = meter, (loss, acc)
        self.bar.update(self.task, completed=meter.steps, loss=loss, acc=acc, ips=ips)
        self._step_line(meter)

    def _step_line(self, meter) -> None:
        """In a log that has been silent for LOG_SILENCE_S: where the epoch is (the loss and accuracy of the
        last read), from a read or from the timer."""
        if self.console.is_terminal or time.monotonic() - self.last_line < LOG_SILENCE_S:
            return
        ips = meter.images / max(meter.seconds, 1e-9)
        left = (self.steps - meter.steps) * meter.seconds / max(meter.steps, 1)
        read = f"  loss {self.read[0]:.4f}  acc {self.read[1]:.4f}" if self.read else ""  # none read yet
        self.log(f"  step {meter.steps}/{self.steps}{read}  {ips:.0f} img/s  epoch left {duration(left)}")

    def log(self, line: str) -> None:
        self.console.print(line, soft_wrap=True)
        self.last_line = time.monotonic()

    def end_epoch(self, record: dict) -> None:
        self.meter = None  # between epochs the timer has no steps to tell of
        if self.quiet:
            return
        left = (self.epochs - record["epoch"]) * record["epoch_time"]
        self.log(f"epoch {record['epoch']:>3}/{self.epochs}  train loss {record['train_loss']:.4f} "
                 f"acc {record['train_acc']:.4f}  "
                 + (f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f}  " if "val_acc" in record else "")
                 + f"lr {record['lr']:.2e}  {record['epoch_time']:.1f}s  {record['images_per_s']:.0f} img/s"
                 + (f"  left {duration(left)}" if left > 0 else ""))

