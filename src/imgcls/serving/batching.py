"""Micro-batching: images that arrive together are scored in one engine call, on one inference thread.

Request handlers `submit` images and await their futures; the thread takes the first waiting image, waits
at most `max_wait_s` for up to `max_batch - 1` more, and hands them to `process` at once. The queue is
bounded by `capacity` images (waiting or being scored): a request that would pass it is refused whole, at
once (`QueueFull`, a 503), so that an accepted request is never dropped and a refused one never waits.
`close` lets the thread finish everything accepted before it stops.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

_STOP = object()


class QueueFull(Exception):
    """The server holds as many images as it may; the client should retry shortly."""


class MicroBatcher:
    def __init__(self, process: Callable[[list], list], max_batch: int, max_wait_s: float, capacity: int):
        self.process, self.max_batch, self.max_wait_s, self.capacity = process, max_batch, max_wait_s, capacity
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="imgcls-inference", daemon=True)

    @property
    def pending(self) -> int:
        """Images accepted and not yet answered."""
        return self._pending

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._closed

    def start(self) -> None:
        self._thread.start()

    def submit(self, items: list) -> list[Future]:
        """One future per item, answered in order; all of them accepted, or QueueFull and none."""
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._pending + len(items) > self.capacity:
                raise QueueFull(f"{self._pending} images are waiting, and {len(items)} more would pass the queue's "
                                f"{self.capacity}")
            self._pending += len(items)
            futures = [Future() for _ in items]
            for item, future in zip(items, futures, strict=True):
                self._queue.put((item, future))
        return futures

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, finish what was accepted, stop the thread."""
        with self._lock:
            self._closed = True
            self._queue.put(_STOP)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            batch, stop = self._next_batch()
            if batch:
                self._answer(batch)
            if stop:
                return

    def _next_batch(self) -> tuple[list, bool]:
        """(the next batch, whether the stop mark came after it)."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, deadline = [first], time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:  # what is already queued joins at once; then wait for the rest of max_wait_s
                entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    def _answer(self, batch: list) -> None:
        live = [(item, future) for item, future in batch if future.set_running_or_notify_cancel()]
        items, futures = [item for item, _ in live], [future for _, future in live]  # a gone client's are skipped
        try:
            results = self.process(items) if items else []
        except Exception as e:  # noqa: BLE001 - the error goes to every waiting request; the thread lives on
            for future in futures:
                future.set_exception(e)
        else:
            for future, result in zip(futures, results, strict=True):
                future.set_result(result)
        finally:
            with self._lock:
                self._pending -= len(batch)
