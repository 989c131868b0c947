"""The epoch loop: `train_one_epoch`, `validate`, and `run_epochs`, which checkpoints after each epoch.

Stops are decided at step boundaries, together by every rank: Ctrl-C or SIGTERM (finish the step,
save, stop), a step limit, or a non-finite loss (stop without saving: the last good checkpoint stays).
"""

from __future__ import annotations

import contextlib
import math
import queue
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.utils import dispatch_clip_grad
from torch.nn.parallel import DistributedDataParallel

from imgcls import rundir
from imgcls.config import MONITORS
from imgcls.data import Split, TrainTransform
from imgcls.errors import UserError
from imgcls.evaluation.metrics import balanced_accuracy, confusion_matrix, per_class_report
from imgcls.evaluation.predict import predict_logits
from imgcls.runtime import autocast
from imgcls.training import distributed
from imgcls.training.checkpointer import Checkpointer, EpochMeter, TrainState, global_meter
from imgcls.training.context import TrainingContext
from imgcls.training.imbalance import epoch_order
from imgcls.training.progress import Progress
from imgcls.training.tensorboard import TensorBoardLog
from imgcls.training.transfer import apply_schedule, train_mode

MONITOR_KEYS = {"val_acc": "val_acc", "val_loss": "val_loss", "balanced_acc": "val_balanced_acc",
                "macro_f1": "val_macro_f1"}  # --monitor -> its key in metrics.jsonl


class Interrupted(Exception):
    """Training stopped early (Ctrl-C, SIGTERM or a step limit); last.pt holds the resumable state."""

    def __init__(self, run_dir, epoch: int, step: int, signum: int | None = None):
        super().__init__(f"stopped in epoch {epoch + 1} after step {step}")
        self.run_dir, self.epoch, self.step, self.signum = run_dir, epoch, step, signum


class Diverged(UserError):
    """The loss or the weights became NaN or infinite; nothing from then on was saved."""


class StopOnSignal:
    """First Ctrl-C or SIGTERM: finish the current step, save, stop. A second one: stop at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

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


@dataclass
class Inputs:
    """What the loop feeds: the module trained (the model, or its head on cached features; wrapped in
    DDP or compile when asked), the splits, and the batch transform."""

    trainee: torch.nn.Module
    train: Split
    val: Split  # this rank's share under torchrun
    transform: object  # TrainTransform, or FeatureTargets for cached features
    features_cached: bool = False
    cache_seconds: float = 0.0  # spent computing the cached features


def window_of(step: int, steps: int, accum: int) -> tuple[int, bool]:
    """(size of the accumulation window that micro-step `step` of an epoch of `steps` falls in, and
    whether `step` is its last). Windows are `accum` long; the epoch's last one may be shorter."""
    start = step - step % accum
    size = min(accum, steps - start)
    return size, step == start + size - 1


class Stepper:
    """Optimizer steps from micro-batches: forward and backward of each (under DDP the gradients are
    all-reduced only on a window's last), then unscale, gradient norm, clipping, step, schedule, EMA.
    The loss of a window of n micro-batches is the mean of theirs, so K micro-batches of B take the
    step one batch of K*B would (BatchNorm aside: it normalises each micro-batch)."""

    def __init__(self, ctx: TrainingContext, trainee: torch.nn.Module):
        self.ctx, self.trainee, self.raw = ctx, trainee, _unwrapped(trainee)
        self.params = list(self.raw.parameters())

    def micro_step(self, x: torch.Tensor, targets: torch.Tensor, step: int):
        """(loss, logits, pre-clip gradient norm or None) of micro-step `step` of the epoch."""
        ctx = self.ctx
        window, last = window_of(step, ctx.steps_per_epoch, ctx.cfg.accum_steps)
        sync = contextlib.nullcontext()
        if not last and isinstance(self.trainee, DistributedDataParallel):
            sync = self.trainee.no_sync()
        with sync:  # under the kernel choice train_one_epoch sets (imgcls.kernels)
            with autocast(ctx.device, ctx.precision):
                logits = self.trainee(x)
            loss = ctx.loss(logits, targets)
            ctx.scaler.scale(loss / window).backward()
        return loss, logits, self._step() if last else None

    def _step(self) -> torch.Tensor:
        ctx, cfg = self.ctx, self.ctx.cfg
        ctx.scaler.unscale_(ctx.optimizer)  # clip and measure true gradients under fp16 loss scaling
        trained = [p for p in self.params if p.grad is not None]  # frozen groups have none
        norm = torch.nn.utils.get_total_norm([p.grad for p in trained]) if trained else torch.zeros(())
        if cfg.clip_grad is not None:
            dispatch_clip_grad(trained, cfg.clip_grad, cfg.clip_mode)
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
        ctx.optimizer.zero_grad(set_to_none=True)
        if cfg.schedule != "plateau" or ctx.scheduler.last_epoch < ctx.warmup_steps:
            ctx.scheduler.step()  # under --schedule plateau only the warm-up is per step
        if ctx.ema is not None:
            ctx.ema.update_parameters(self.raw)
        if ctx.lookahead is not None:
            ctx.lookahead.after_step(self.raw)
        return norm


# CPU prefetch under "auto": off, as measured. A background thread fetching and augmenting the next
# batch while the current one computes gains at most the augmentation's share of a step, and that is
# small: basic aug of a batch of 128 at 32px takes ~6 ms single-threaded against a 1.5 s fastnet_cifar
# step (bf16) on this machine (2 cores, AMD EPYC Zen 5, avx512_bf16, torch 2.14.1), so <0.5%. Timed with
# `python bench/train_speed.py --models fastnet_cifar --steps 6 --repeats 5|3 --prefetch off on --no-classic
# --data-dir $IMGCLS_DATA/cifar10` (alternating, medians; the machine shared with other jobs, load 7-9):
# thread with torch's default 2 threads: 47 img/s vs 84 inline (the two OpenMP teams contend for 2 cores);
# thread running its ops on 1 thread (as below): 80 vs 79 and 72 vs 90 -- no gain beyond the noise.
# Keep it off on the CPU (the default path stays the inline one); --prefetch on still selects it.
CPU_PREFETCH_AUTO = False


def prefetching(cfg, device: torch.device) -> bool:
    """Whether `cfg.prefetch` prepares the next batch ahead: on CUDA (a side stream) unless off; on the
    CPU (a thread) when on, or under auto when that measured faster (CPU_PREFETCH_AUTO)."""
    if cfg.prefetch == "auto":
        return device.type == "cuda" or CPU_PREFETCH_AUTO
    return cfg.prefetch == "on"


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


def _feed(batches, transform, gen: torch.Generator, device: torch.device, prefetch: bool) -> _Inline:
    if not prefetch:
        return _Inline(batches, transform, gen, device)
    return (_CudaStream if device.type == "cuda" else _Thread)(batches, transform, gen, device)


def train_one_epoch(stepper: Stepper, batches, transform: TrainTransform, aug_gen, meter: EpochMeter, *,
                    should_stop, progress: Progress, tb: TensorBoardLog | None = None, step_offset: int = 0) -> bool:
    """Train over `batches`, adding to `meter`. Returns False when `should_stop` asks to stop early.

    No step waits for the device: the loss, hits and gradient norms are summed on it (`meter.live`)
    and read every `progress.interval` micro-steps and when the loop returns (so the caller's
    `should_stop()` after it sees a non-finite loss before anything is saved). `should_stop(read)`
    is asked at the start of each accumulation window, so a stop never splits one; `read` is true
    at the reads, where it may talk to the other ranks and checks `meter.nonfinite_loss`; between
    reads it decides only on what every rank knows without a collective. `tb` gets the loss of the
    interval and the rate at each read (optimizer steps counted after `step_offset` earlier ones).
    With --prefetch the next batch is fetched and augmented while the current one computes."""
    ctx = stepper.ctx
    train_mode(stepper.trainee)  # frozen parts stay in eval mode
    meter.start(ctx.device)
    next_read, logged = meter.steps + progress.interval, (meter.images, meter.loss_sum)
    finished = False
    kernels = ctx.kernels.context(stepper.trainee, train=True) if ctx.kernels is not None else contextlib.nullcontext()
    layout = ctx.kernels.layout if ctx.kernels is not None else torch.channels_last
    with kernels:  # the attention and depthwise kernels chosen for training (imgcls.kernels), set once an epoch
        feed = _feed(batches, transform, aug_gen, ctx.device, prefetching(ctx.cfg, ctx.device))
        try:
            while True:
                start = time.perf_counter()
                batch = feed.next()
                if batch is None:
                    finished = True
                    break
                fetched = time.perf_counter()
                # after the fetch, so a stop at an epoch's last step still ends the epoch
                if meter.steps % ctx.cfg.accum_steps == 0:
                    read = meter.steps >= next_read
                    if read:
                        next_read, logged = meter.steps + progress.interval, _report(stepper, meter, progress, tb,
                                                                                     step_offset, logged)
                    if should_stop(read):
                        break
                x, targets = feed.prepare(batch)  # augmented, normalised, mixed; soft targets
                if x.dim() == 4:  # images; cached features are B x D
                    x = x.contiguous(memory_format=layout)
                loss, logits, norm = stepper.micro_step(x, targets, meter.steps)
                feed.launched()
                meter.add_batch(loss, logits, targets)
                if norm is not None:
                    meter.add_grad_norm(norm)
                end = time.perf_counter()
                meter.data_seconds += fetched - start
                meter.compute_seconds += end - fetched
                meter.seconds += end - start
                progress.advance(meter)
        finally:
            feed.close(stopped=not finished)
    if ctx.device.type == "cuda":  # the steps were only launched: the time they ran to is now
        start = time.perf_counter()
        torch.cuda.synchronize(ctx.device)
        waited = time.perf_counter() - start
        meter.compute_seconds += waited
        meter.seconds += waited
    _report(stepper, meter, progress, tb, step_offset, logged)
    return finished


def _report(stepper: Stepper, meter: EpochMeter, progress: Progress, tb: TensorBoardLog | None, step_offset: int,
            logged: tuple[int, float]) -> tuple[int, float]:
    """A read of the device sums: the bar's loss and accuracy, and TensorBoard's loss over the images since
    the last read (`logged`: images and loss sum then). Returns the new `logged`."""
    meter.read()
    progress.update(meter)
    images, loss_sum = logged
    if tb is not None and meter.images > images:
        tb.step(step_offset + meter.optimizer_steps, (meter.loss_sum - loss_sum) / (meter.images - images),
                stepper.ctx.optimizer.param_groups[-1]["lr"])
    return meter.images, meter.loss_sum


def _unwrapped(module):
    """The model itself inside a DistributedDataParallel or torch.compile wrapper."""
    while isinstance(module, DistributedDataParallel) or hasattr(module, "_orig_mod"):
        module = module.module if isinstance(module, DistributedDataParallel) else module._orig_mod
    return module


def validate(ctx: TrainingContext, inputs: Inputs) -> dict:
    """Loss, accuracy, balanced accuracy and macro-F1 of the evaluated weights on the validation split,
    over all ranks (the confusion matrix is summed, so every rank gets the same numbers); {} when there
    is no validation split (--val-fraction 0)."""
    if inputs.val is None:
        return {}
    if inputs.features_cached:
        logits, labels = head_logits(inputs.trainee, inputs.val, ctx.device, ctx.precision), inputs.val.labels
    else:
        logits, labels = predict_logits(ctx.evaluated, inputs.val, ctx.dataset.mean, ctx.dataset.std, ctx.device,
                                        ctx.precision, ctx.cfg.eval_batch_size)
    k = ctx.dataset.num_classes
    cm = confusion_matrix(logits.argmax(1), labels, k).flatten().tolist()
    loss, *cm = distributed.all_sum(ctx.world, [F.cross_entropy(logits, labels, reduction="sum").item(), *cm])
    cm = torch.tensor(cm, dtype=torch.int64).view(k, k)
    report = per_class_report(cm, ctx.dataset.classes)
    return {"val_loss": loss / cm.sum().item(), "val_acc": cm.diag().sum().item() / cm.sum().item(),
            "val_balanced_acc": balanced_accuracy(cm), "val_macro_f1": sum(r["f1"] for r in report) / k}


@torch.inference_mode()
def head_logits(head, features: Split, device, precision: str) -> torch.Tensor:
    head.eval()
    with autocast(device, precision):
        return head(features.images.to(device)).float().cpu()


def _stream_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7 + stream) % 2**63


def _epoch_batches(ctx: TrainingContext, inputs: Inputs, state: TrainState, epoch: int, aug_gen: torch.Generator):
    """This rank's remaining batches of `epoch`: one seeded order shared by every rank (a permutation, or
    a class-rebalancing draw with --sampler), each rank taking its share of every global batch, skipping
    the steps a resumed run already took."""
    cfg, world = ctx.cfg, ctx.world
    order = epoch_order(cfg.sampler, ctx.dataset.train.labels, torch.Generator().manual_seed(
        _stream_seed(cfg.seed, epoch, 0)))[: ctx.steps_per_epoch * cfg.batch_size]
    if state.meter.steps == 0:
        aug_gen.manual_seed(_stream_seed(ctx.rank_seed, epoch, 1))
    local_batch = cfg.batch_size // world.size
    mine = distributed.rank_order(order, cfg.batch_size, world)[state.meter.steps * local_batch :]
    batches = inputs.train.batches(mine, local_batch, seed=_stream_seed(ctx.rank_seed, epoch, 2),
                                   first=state.meter.steps * local_batch)
    if cfg.alt_flip and not inputs.features_cached:
        return alternating_flips(batches, mine, local_batch, len(inputs.train), cfg.seed, epoch)
    return batches


def alternating_flips(batches, order: torch.Tensor, batch_size: int, n: int, seed: int, epoch: int):
    """airbench's alternating flip: image i is mirrored in epoch e when (its coin, drawn once from the run's
    seed) XOR (e is odd). Each image is thus seen both ways in turn rather than at random. `order` lists
    the images `batches` yields, in order."""
    coins = torch.rand(n, generator=torch.Generator().manual_seed(_stream_seed(seed, 0, 3))) < 0.5
    for k, (images, labels) in enumerate(batches):
        flip = coins[order[k * batch_size : (k + 1) * batch_size]] ^ (epoch % 2 == 1)
        yield torch.where(flip.view(-1, 1, 1, 1).to(images.device), images.flip(3), images), labels


def _finite_weights(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def _diverged(ctx: TrainingContext, state: TrainState, what: str, epoch: int, run) -> Diverged:
    kept = (f"the last good state (epoch {state.epoch}) is in {run / rundir.LAST}" if state.saved
            else "no checkpoint was written, so the run folder is removed")
    return Diverged(f"training diverged: {what} in epoch {epoch + 1} (step {state.meter.steps}); {kept}; lower "
                    f"--lr (now {ctx.cfg.lr:g}) or lengthen --warmup-epochs, and train a new run")


def run_epochs(ctx: TrainingContext, inputs: Inputs, state: TrainState, checkpointer: Checkpointer, run,
               progress: Progress, stop: StopOnSignal, aug_gen: torch.Generator,
               stop_after_steps: int | None = None, tb: TensorBoardLog | None = None) -> None:
    """Train from `state` to the last epoch, or until --patience ends the run: after each epoch,
    validate, log (metrics.jsonl, and `tb` when given), keep best.pt and save last.pt."""
    cfg, world = ctx.cfg, ctx.world
    stepper, per_epoch = Stepper(ctx, inputs.trainee), ctx.optimizer_steps_per_epoch
    for epoch in range(state.epoch, cfg.epochs):
        if state.stopped_early:
            break
        apply_schedule(ctx.model, ctx.groups, epoch)
        batches = _epoch_batches(ctx, inputs, state, epoch, aug_gen)

        def should_stop(read: bool = True, epoch=epoch):
            done = epoch * ctx.steps_per_epoch + state.meter.steps
            limit = stop_after_steps is not None and done >= stop_after_steps
            if not read:  # between reads: no collective (a sync under NCCL), only what every rank knows alike
                return limit or (not world.distributed and stop.requested)
            asked, bad = distributed.any_rank(world, [stop.requested, state.meter.nonfinite_loss is not None])
            if bad:  # every rank stops together, and nothing is saved from here on
                raise _diverged(ctx, state, f"the loss became {state.meter.nonfinite_loss}", epoch, run)
            return asked or limit

        progress.start_epoch(epoch, state.meter)
        finished = train_one_epoch(stepper, batches, inputs.transform, aug_gen, state.meter, should_stop=should_stop,
                                   progress=progress, tb=tb, step_offset=epoch * per_epoch)
        should_stop()  # a non-finite loss since the last read (train_one_epoch read the sums as it returned)
        distributed.share_buffers(world, ctx.model)
        if ctx.ema is not None:
            distributed.share_buffers(world, ctx.ema)
        if not _finite_weights(ctx.evaluated):
            raise _diverged(ctx, state, "the weights became NaN or infinite", epoch, run)
        if not finished:
            checkpointer.save_last(state, aug_gen)
            raise Interrupted(run, epoch, state.meter.steps, stop.signum)
        record = _end_epoch(ctx, inputs, state, checkpointer, run, progress, epoch, aug_gen)
        if tb is not None:
            tb.epoch(epoch + 1, record, global_step=(epoch + 1) * per_epoch)


def _epoch_record(ctx: TrainingContext, meter: EpochMeter, scores: dict, epoch: int) -> dict:
    """The epoch's line in metrics.jsonl."""
    return {
        "epoch": epoch + 1,
        "train_loss": meter.loss_sum / meter.images,
        "train_acc": meter.correct / meter.images,
        **scores,
        "lr": ctx.optimizer.param_groups[-1]["lr"],  # the head's
        "grad_norm_mean": meter.grad_norm_sum / max(meter.optimizer_steps, 1),  # before clipping
        "grad_norm_max": meter.grad_norm_max,
        "epoch_time": meter.seconds,
        "data_time": meter.data_seconds,
        "compute_time": meter.compute_seconds,
        "images_per_s": meter.images / max(meter.seconds, 1e-9),
    }


def improved(monitor: str, score: float, best: float | None, min_delta: float) -> bool:
    """Whether `score` of `monitor` beats `best` by more than `min_delta` (the first score always does)."""
    if best is None:
        return True
    return score < best - min_delta if MONITORS[monitor] == "min" else score > best + min_delta


def _end_epoch(ctx: TrainingContext, inputs: Inputs, state: TrainState, checkpointer: Checkpointer, run,
               progress: Progress, epoch: int, aug_gen: torch.Generator) -> dict:
    """Validate, log and checkpoint the epoch just trained; returns its metrics.jsonl record."""
    cfg = ctx.cfg
    scores = validate(ctx, inputs)
    if scores and not math.isfinite(scores["val_loss"]):
        raise _diverged(ctx, state, f"the validation loss became {scores['val_loss']}", epoch, run)
    meter = global_meter(ctx, state.meter)
    record = _epoch_record(ctx, meter, scores, epoch)
    if ctx.world.main:
        rundir.append_metrics(run, record)
    progress.end_epoch(record)
    state.epoch, state.train_seconds, state.meter = epoch + 1, state.train_seconds + meter.seconds, EpochMeter()
    if not scores:  # no validation split: nothing to select on, so best.pt is always the newest (final) epoch
        state.best_score, state.best_epoch, state.bad_epochs = None, epoch + 1, 0
        checkpointer.save_best(state, scores)
        checkpointer.save_last(state, aug_gen)
        return record
    score = scores[MONITOR_KEYS[cfg.monitor]]
    if improved(cfg.monitor, score, state.best_score, cfg.min_delta):
        state.best_score, state.best_epoch, state.bad_epochs = score, epoch + 1, 0
        checkpointer.save_best(state, scores)
    else:
        state.bad_epochs += 1
    state.stopped_early = cfg.patience is not None and state.bad_epochs >= cfg.patience and state.epoch < cfg.epochs
    if ctx.plateau is not None and ctx.scheduler.last_epoch >= ctx.warmup_steps:
        ctx.plateau.step(score)  # after the warm-up: cut the rates when the monitor stalls
    checkpointer.save_last(state, aug_gen)
    return record
