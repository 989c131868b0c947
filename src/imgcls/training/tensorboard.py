"""TensorBoard event files for a run (`--tensorboard`): written to RUN/tb/ beside metrics.jsonl.

Every scalar sits on one axis, the optimizer step (as Lightning and timm do), so that a resumed run
can purge what it redoes with `purge_step`: per-step loss and rate under `step/`, each epoch's
metrics.jsonl line under `epoch/` at the step the epoch ended. At the end: the confusion matrix and
the reliability diagram as images and the hyperparameters with the final metrics (the HPARAMS tab).
metrics.jsonl stays the record; these files only make it browsable.
"""

from __future__ import annotations

import math
from pathlib import Path

from imgcls.errors import UserError

TB_DIR = "tb"
INSTALL = "--tensorboard needs the tensorboard package: pip install 'imgcls[tensorboard]'"


def _summary_writer():
    try:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard, an optional extra
    except ImportError:
        raise UserError(INSTALL) from None
    return SummaryWriter


def check_installed() -> None:
    """Fail in one line, before any run folder exists, when --tensorboard cannot be honoured."""
    _summary_writer()


def _hparam_value(value):
    """TensorBoard takes numbers, strings and booleans; lists and None become text."""
    if isinstance(value, bool | int | float | str):
        return value
    return "none" if value is None else str(value)


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardLog:
    """One run's event files, in `run_dir/tb/` (a comparison's runs each in theirs: `tensorboard --logdir OUT`
    finds them all).

    `hparams` is the run's config (`cfg.to_dict()`); `purge_step` (a resumed run: the optimizer steps
    its checkpoint holds) hides what the interrupted process logged after that step."""

    def __init__(self, run_dir: str | Path, hparams: dict, *, purge_step: int | None = None):
        writer_class = _summary_writer()
        self.logdir = Path(run_dir) / TB_DIR
        self.hparams = {k: _hparam_value(v) for k, v in hparams.items()}
        self.last_step = purge_step or 0
        self.writer = writer_class(log_dir=str(self.logdir), purge_step=purge_step)

    def step(self, global_step: int, loss: float, lr: float) -> None:
        """The training loss and the head's rate after optimizer step `global_step` (at the progress interval)."""
        self.writer.add_scalar("step/loss", loss, global_step)
        self.writer.add_scalar("step/lr", lr, global_step)
        self.last_step = global_step

    def epoch(self, epoch: int, record: dict, global_step: int | None = None) -> None:
        """An epoch's metrics.jsonl record: every finite number in it (train/val loss and accuracy, lr,
        images_per_s, data_time, grad-norm mean/max when logged) as `epoch/<key>`, at `global_step`,
        the optimizer steps done when the epoch ended (default: the last step logged)."""
        step = self.last_step if global_step is None else global_step
        for key, value in _numbers({**record, "epoch": epoch}).items():  # the record holds the epoch already
            self.writer.add_scalar(f"epoch/{key}", value, step)
        self.last_step = step
        self.writer.flush()  # an epoch's figures show up in a running TensorBoard at once

    def finish(self, summary: dict, confusion: list[list[int]] | None, reliability: dict | None,
               classes: list[str] | None = None) -> None:
        """The end of the run: the confusion matrix (with `classes` as labels) and the reliability
        diagram (evaluation.calibration.reliability_bins' dict) as images, and the hyperparameters
        with the summary's final metrics."""
        if confusion is not None:
            self.writer.add_figure("eval/confusion_matrix", confusion_figure(confusion, classes), self.last_step)
        if reliability is not None:
            self.writer.add_figure("eval/reliability", reliability_figure(reliability), self.last_step)
        metrics = {f"hparam/{k}": v for k, v in _numbers(summary).items()}
        # run_name ".": the hparams go into this run's own folder, not a new timestamped one beside it
        self.writer.add_hparams(self.hparams, metrics, run_name=".", global_step=self.last_step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def confusion_figure(confusion: list[list[int]], classes: list[str] | None = None):
    import numpy as np

    from imgcls.plotting import draw_matrix, plt

    counts = np.asarray(confusion, dtype=float)
    k = len(counts)
    side = max(3.5, 0.45 * k + 1.5)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    draw_matrix(ax, counts, classes or [str(i) for i in range(k)])
    fig.tight_layout()
    return fig  # add_figure closes it


def reliability_figure(bins: dict):
    """Accuracy against confidence per bin, the diagonal for reference."""
    import numpy as np

    from imgcls.plotting import plt

    edges = np.asarray(bins["edges"])
    width = edges[1] - edges[0]
    centres = edges[:-1] + width / 2
    filled = np.asarray(bins["count"]) > 0
    acc = np.asarray(bins["accuracy"], dtype=float)
    conf = np.asarray(bins["confidence"], dtype=float)
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.bar(centres[filled], acc[filled], width=width, edgecolor="black", linewidth=0.5, label="accuracy")
    ax.plot(centres[filled], conf[filled], "r_", markersize=14, label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return fig
