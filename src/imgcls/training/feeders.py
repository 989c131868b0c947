"""What feeds a training step: batches fetched and augmented inline, or prepared one ahead (a CUDA side
stream, or a CPU thread), each able to hand the augmentation stream back as an inline run would leave it,
so a stopped run resumes exactly."""

from __future__ import annotations

import queue
import threading

import torch


def prefetch_default(device_type: str) -> str:
    """--prefetch auto: on for CUDA (a side stream); off on the CPU, where a thread fetching and augmenting
    the next batch measured no faster on two cores (the augmentation is a small share of a step; figures
    and the command in docs/results.md)."""
    return "on" if device_type == "cuda" else "off"


class _Inline:
    """Batches fetched as they are needed and augmented on the main thread (counted as compute)."""

    def __init__(self, batches, transform, gen: torch.Generator, device: torch.device):
        self.batches, self.transform, self.gen, self.device = iter(batches), transform, gen, device

    def next(self):
        return next(self.batches, None)

    def prepare(self, batch):
        """(inputs, soft targets) on the device, augmented, normalised and mixed."""
        images = batch[0].to(self.device, non_blocking=True)
        labels = batch[1].to(self.device, non_blocking=True)
        return self.transform(images, labels, self.gen)

    def launched(self) -> None:
        pass

    def close(self, stopped: bool) -> None:
        pass


class _Ahead(_Inline):
    """Batches prepared one ahead. Each carries the augmentation stream's state from before its
    augmentation, so a stop rewinds the stream to the first batch not trained on and the checkpoint
    holds the stream an inline run would (a resumed run augments exactly as an uninterrupted one)."""

    def close(self, stopped: bool) -> None:
        if stopped and self.handed is not None:
            self.gen.set_state(self.handed)

    def prepare(self, batch):
        return batch[1:]


class _Thread(_Ahead):
    """CPU: a background thread fetches and augments the next batch while the main one trains. torch
    ops release the GIL, so the thread's work overlaps the step's."""

    _END = object()

    def __init__(self, batches, transform, gen, device):
        super().__init__(batches, transform, gen, device)
        self.handed, self.done = None, threading.Event()
        self.queue: queue.Queue = queue.Queue(maxsize=1)  # with the one being prepared: two ahead at most
        self.thread = threading.Thread(target=self._work, name="imgcls-prefetch", daemon=True)
        self.thread.start()

    def _work(self) -> None:
        # one thread for the augmentation's ops: the main thread's steps keep the cores (torch's thread
        # count is per thread, so the steps' is unchanged); two teams on two cores would contend
        torch.set_num_threads(1)
        try:
            for batch in self.batches:
                state = self.gen.get_state()
                item = (state, *_Inline.prepare(self, batch))
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # handed to the main thread, raised there
            self._put(e)

    def _put(self, item) -> bool:
        while not self.done.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def next(self):
        item = self.queue.get()
        if item is self._END:
            return None
        if isinstance(item, BaseException):
            raise item
        self.handed = item[0]
        return item

    def close(self, stopped: bool) -> None:
        self.done.set()
        self.thread.join()  # after its current batch: the stream is then the thread's to set back
        super().close(stopped)


class _CudaStream(_Ahead):
    """CUDA: the next batch is copied (from pinned memory) and augmented on a side stream, launched
    right after the current step, so the copy and augmentation kernels overlap the step's."""

    def __init__(self, batches, transform, gen, device):
        super().__init__(batches, transform, gen, device)
        self.stream, self.ahead, self.handed, self.exhausted = torch.cuda.Stream(device), None, None, False

    def _prepare_next(self) -> None:
        batch = None if self.exhausted else next(self.batches, None)
        if batch is None:
            self.exhausted = True
            return
        state = self.gen.get_state()
        with torch.cuda.stream(self.stream):
            images = batch[0].pin_memory().to(self.device, non_blocking=True)
            labels = batch[1].pin_memory().to(self.device, non_blocking=True)
            self.ahead = (state, *self.transform(images, labels, self.gen))

    def next(self):
        if self.ahead is None:
            self._prepare_next()
        item, self.ahead = self.ahead, None
        if item is None:
            return None
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)  # the step's kernels start after the batch is ready (no host wait)
        for t in item[1:]:
            t.record_stream(main)  # made on the side stream, used on the main one
        self.handed = item[0]
        return item

    def launched(self) -> None:
        if self.ahead is None:
            self._prepare_next()


def feed(batches, transform, gen: torch.Generator, device: torch.device, prefetch: bool) -> _Inline:
    if not prefetch:
        return _Inline(batches, transform, gen, device)
    return (_CudaStream if device.type == "cuda" else _Thread)(batches, transform, gen, device)
