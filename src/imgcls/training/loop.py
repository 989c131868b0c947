"""The epoch loop: `train_one_epoch`, `validate`, and `run_epochs`, which checkpoints after each epoch.

Stops are decided at step boundaries, together by every rank: Ctrl-C or SIGTERM (finish the step,
save, stop), a step limit, or a non-finite loss (stop without saving: the last good checkpoint stays).
"""

from __future__ import annotations

import contextlib
import math
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
        with sync:
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
        if cfg.schedule == "cosine" or ctx.scheduler.last_epoch < ctx.warmup_steps:
            ctx.scheduler.step()  # under --schedule plateau only the warm-up is per step
        if ctx.ema is not None:
            ctx.ema.update_parameters(self.raw)
        return norm


def train_one_epoch(stepper: Stepper, batches, transform: TrainTransform, aug_gen, meter: EpochMeter, *,
                    should_stop, progress: Progress, tb: TensorBoardLog | None = None, step_offset: int = 0) -> bool:
    """Train over `batches`, adding to `meter`. Returns False when `should_stop()` asks to stop early;
    it is asked (by every rank together) at the start of each accumulation window, so a stop never
    splits one. A non-finite loss is recorded in `meter.nonfinite_loss` for the next `should_stop()`.
    `tb` gets the loss and rate every tenth of the epoch's optimizer steps (after `step_offset` earlier ones)."""
    ctx = stepper.ctx
    every = max(1, ctx.optimizer_steps_per_epoch // 10)
    train_mode(stepper.trainee)  # frozen parts stay in eval mode
    batches = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return True
        fetched = time.perf_counter()
        # after the fetch, so a stop at an epoch's last step still ends the epoch
        if meter.steps % ctx.cfg.accum_steps == 0 and should_stop():
            return False
        images, labels = batch[0].to(ctx.device, non_blocking=True), batch[1].to(ctx.device, non_blocking=True)
        x, targets = transform(images, labels, aug_gen)  # augmented, normalised, mixed; soft targets
        if x.dim() == 4:  # images; cached features are B x D
            x = x.contiguous(memory_format=torch.channels_last)
        loss, logits, norm = stepper.micro_step(x, targets, meter.steps)
        n, value = len(labels), loss.item()
        if not math.isfinite(value):
            meter.nonfinite_loss = value
        if norm is not None:
            meter.add_grad_norm(norm.item())
            if tb is not None and meter.optimizer_steps % every == 0:
                tb.step(step_offset + meter.optimizer_steps, value, ctx.optimizer.param_groups[-1]["lr"])
        meter.steps += 1
        meter.images += n
        meter.loss_sum += value * n
        meter.correct += (logits.argmax(1) == targets.argmax(1)).sum().item()  # the dominant label when mixed
        meter.data_seconds += fetched - start
        meter.seconds += time.perf_counter() - start
        progress.update(meter)


def _unwrapped(module):
    """The model itself inside a DistributedDataParallel or torch.compile wrapper."""
    while isinstance(module, DistributedDataParallel) or hasattr(module, "_orig_mod"):
        module = module.module if isinstance(module, DistributedDataParallel) else module._orig_mod
    return module


def validate(ctx: TrainingContext, inputs: Inputs) -> dict:
    """Loss, accuracy, balanced accuracy and macro-F1 of the evaluated weights on the validation split,
    over all ranks (the confusion matrix is summed, so every rank gets the same numbers)."""
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
    return inputs.train.batches(mine, local_batch, seed=_stream_seed(ctx.rank_seed, epoch, 2),
                                first=state.meter.steps * local_batch)


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

        def should_stop(epoch=epoch):
            done = epoch * ctx.steps_per_epoch + state.meter.steps
            asked, bad = distributed.any_rank(world, [stop.requested, state.meter.nonfinite_loss is not None])
            if bad:  # every rank stops together, and nothing is saved from here on
                raise _diverged(ctx, state, f"the loss became {state.meter.nonfinite_loss}", epoch, run)
            return asked or (stop_after_steps is not None and done >= stop_after_steps)

        progress.start_epoch(epoch, state.meter)
        finished = train_one_epoch(stepper, batches, inputs.transform, aug_gen, state.meter, should_stop=should_stop,
                                   progress=progress, tb=tb, step_offset=epoch * per_epoch)
        should_stop()  # a non-finite loss in the epoch's last step
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
    if not math.isfinite(scores["val_loss"]):
        raise _diverged(ctx, state, f"the validation loss became {scores['val_loss']}", epoch, run)
    meter = global_meter(ctx, state.meter)
    record = _epoch_record(ctx, meter, scores, epoch)
    if ctx.world.main:
        rundir.append_metrics(run, record)
    progress.end_epoch(record)
    state.epoch, state.train_seconds, state.meter = epoch + 1, state.train_seconds + meter.seconds, EpochMeter()
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
