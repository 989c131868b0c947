"""How training stops before its last epoch: Ctrl-C, SIGTERM or SIGUSR1 (finish the step, save, `Interrupted`;
SIGTERM and SIGUSR1 are what clusters send before preempting a job),
or a non-finite loss or weight (`Diverged`: stop without saving, the last good checkpoint stays). Stops
are decided at step boundaries, together by every rank (loop.py)."""

from __future__ import annotations

import signal
import threading
import time

from imgcls import rundir
from imgcls.errors import UserError


class Interrupted(Exception):
    """Training stopped early (Ctrl-C, SIGTERM, SIGUSR1 or a step limit); last.pt holds the resumable state."""

    def __init__(self, run_dir, epoch: int, step: int, signum: int | None = None):
        super().__init__(f"stopped in epoch {epoch + 1} after step {step}")
        self.run_dir, self.epoch, self.step, self.signum = run_dir, epoch, step, signum


class Diverged(UserError):
    """The loss or the weights became NaN or infinite; nothing from then on was saved."""


class StopOnSignal:
    """First Ctrl-C, SIGTERM or SIGUSR1: finish the current step, save, stop. A second one: stop at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, announce: bool = True):
        self.signum: int | None = None
        self.announce, self._first = announce, 0.0
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        # torchrun forwards the Ctrl-C each worker already got from the terminal: a repeat within a
        # second is that echo, not a second request
        if self.requested and time.monotonic() - self._first > 1.0:
            raise KeyboardInterrupt
        if self.requested:
            return
        self.signum, self._first = signum, time.monotonic()
        if self.announce:
            print("\nstopping after this step and saving a resumable checkpoint (again to abort)", flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def diverged(what: str, epoch: int, step: int, saved_epoch: int | None, run, lr: float) -> Diverged:
    """The one line for a run that diverged in `epoch` (0-based) at `step`; `saved_epoch`: the last good
    checkpoint's epoch, None when none was written (the run folder is then removed)."""
    kept = (f"the last good state (epoch {saved_epoch}) is in {run / rundir.LAST}" if saved_epoch is not None
            else "no checkpoint was written, so the run folder is removed")
    return Diverged(f"training diverged: {what} in epoch {epoch + 1} (step {step}); {kept}; lower "
                    f"--lr (now {lr:g}) or lengthen --warmup-epochs, and train a new run")
