"""A live progress bar (loss, accuracy, images/s, time left) and a line per epoch; silent with --quiet.

The loss and accuracy shown are read from the device every `interval` micro-steps (a tenth of the
epoch), never per step: the training loop reads its device sums only then (and at the epoch's end).
In a log (no terminal) the bar is not drawn: each epoch is one line, and a long epoch adds a progress
line with its time left at a read only when the log has been silent for LOG_SILENCE_S seconds."""

from __future__ import annotations

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

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def start_epoch(self, epoch: int, meter) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task("train", total=self.steps, completed=meter.steps, epoch=epoch + 1,
                                      epochs=self.epochs, loss=0.0, acc=0.0, ips=0.0)

    def advance(self, meter) -> None:
        """After each step: the step count and rate only (Python numbers, nothing read from the device)."""
        if not self.quiet:
            self.bar.update(self.task, completed=meter.steps, ips=meter.images / max(meter.seconds, 1e-9))

    def update(self, meter) -> None:
        """At a read (every `interval` steps): the loss and accuracy, which `meter` has just read."""
        if self.quiet:
            return
        n = max(meter.images, 1)
        loss, acc, ips = meter.loss_sum / n, meter.correct / n, meter.images / max(meter.seconds, 1e-9)
        self.bar.update(self.task, completed=meter.steps, loss=loss, acc=acc, ips=ips)
        if not self.console.is_terminal and time.monotonic() - self.last_line >= LOG_SILENCE_S:
            left = (self.steps - meter.steps) * meter.seconds / max(meter.steps, 1)
            self.log(f"  step {meter.steps}/{self.steps}  loss {loss:.4f}  acc {acc:.4f}  {ips:.0f} img/s  "
                     f"epoch left {duration(left)}")

    def log(self, line: str) -> None:
        self.console.print(line, soft_wrap=True)
        self.last_line = time.monotonic()

    def end_epoch(self, record: dict) -> None:
        if self.quiet:
            return
        left = (self.epochs - record["epoch"]) * record["epoch_time"]
        self.log(f"epoch {record['epoch']:>3}/{self.epochs}  train loss {record['train_loss']:.4f} "
                 f"acc {record['train_acc']:.4f}  "
                 + (f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f}  " if "val_acc" in record else "")
                 + f"lr {record['lr']:.2e}  {record['epoch_time']:.1f}s  {record['images_per_s']:.0f} img/s"
                 + (f"  left {duration(left)}" if left > 0 else ""))

