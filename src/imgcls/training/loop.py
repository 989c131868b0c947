"""The epoch loop: `train_one_epoch` (fetch, forward, backward, an optimizer step every --accum-steps
micro-batches) and `run_epochs`, which validates, logs and checkpoints after each epoch.

No step waits for the device: the loss, hits and gradient norms are summed on it (`EpochMeter.live`) and
read every tenth of an epoch and at its end. Stops (training/stops.py) are decided at the start of an
accumulation window, together by every rank.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
from timm.utils import dispatch_clip_grad
from torch.nn.parallel import DistributedDataParallel

from imgcls import rundir
from imgcls.config import MONITORS
from imgcls.data import Split
from imgcls.kernels.choice import layout_of
from imgcls.runtime import autocast
from imgcls.training import distributed
from imgcls.training.checkpointer import Checkpointer, EpochMeter, TrainState, global_meter
from imgcls.training.context import TrainingContext
from imgcls.training.feeders import feed
from imgcls.training.order import epoch_batches
from imgcls.training.progress import Progress
from imgcls.training.stops import Interrupted, StopOnSignal, diverged
from imgcls.training.tensorboard import TensorBoardLog
from imgcls.training.transfer import apply_schedule, train_mode
from imgcls.training.validation import validate

MONITOR_KEYS = {"val_acc": "val_acc", "val_loss": "val_loss", "balanced_acc": "val_balanced_acc",
                "macro_f1": "val_macro_f1", "map": "val_map"}  # --monitor -> its key in metrics.jsonl


@dataclass
class Inputs:
    """What the loop feeds: the module trained (the model, or its head on cached features; wrapped in
    DDP or compile when asked), the splits, and the batch transform."""

    trainee: torch.nn.Module
    train: Split
    val: Split | None  # this rank's share under torchrun
    transform: object  # TrainTransform, or FeatureTargets for cached features
    features_cached: bool = False
    cache_seconds: float = 0.0  # spent computing the cached features


def window_of(step: int, steps: int, accum: int) -> tuple[int, bool]:
    """(size of the accumulation window that micro-step `step` of an epoch of `steps` falls in, and
    whether `step` is its last). Windows are `accum` long; the epoch's last one may be shorter."""
    start = step - step % accum
    size = min(accum, steps - start)
    return size, step == start + size - 1


def micro_step(ctx: TrainingContext, trainee: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor, step: int):
    """Forward and backward of micro-batch `step` of the epoch, and the optimizer step on a window's last:
    (loss, logits, the pre-clip gradient norm or None). The loss of a window of n micro-batches is the
    mean of theirs, so K micro-batches of B take the step one batch of K*B would (BatchNorm aside: it
    normalises each micro-batch). Under DDP the gradients are all-reduced only on a window's last."""
    window, last = window_of(step, ctx.steps_per_epoch, ctx.cfg.accum_steps)
    ddp = isinstance(trainee, DistributedDataParallel)
    with trainee.no_sync() if ddp and not last else contextlib.nullcontext():
        with autocast(ctx.device, ctx.precision):
            logits = trainee(x)
        loss = ctx.loss(logits, targets)
        ctx.scaler.scale(loss / window).backward()
    return loss, logits, optimizer_step(ctx, _unwrapped(trainee)) if last else None


def optimizer_step(ctx: TrainingContext, model: torch.nn.Module) -> torch.Tensor:
    """Unscale (fp16), measure and clip the gradients, step, then the schedule, EMA and lookahead."""
    cfg = ctx.cfg
    ctx.scaler.unscale_(ctx.optimizer)  # clip and measure true gradients under fp16 loss scaling
    trained = [p for p in model.parameters() if p.grad is not None]  # frozen groups have none
    norm = torch.nn.utils.get_total_norm([p.grad for p in trained]) if trained else torch.zeros(())
    if cfg.clip_grad is not None:
        dispatch_clip_grad(trained, cfg.clip_grad, cfg.clip_mode)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.optimizer.zero_grad(set_to_none=True)
    if cfg.schedule != "plateau" or ctx.scheduler.last_epoch < ctx.warmup_steps:
        ctx.scheduler.step()  # under --schedule plateau only the warm-up is per step
    if ctx.ema is not None:
        ctx.ema.update_parameters(model)
    if ctx.lookahead is not None:
        ctx.lookahead.after_step(model)
    return norm


def train_one_epoch(ctx: TrainingContext, trainee: torch.nn.Module, batches, transform, aug_gen: torch.Generator,
                    meter: EpochMeter, *, should_stop, progress: Progress, tb: TensorBoardLog | None = None,
                    step_offset: int = 0) -> bool:
    """Train over `batches`, adding to `meter`; False when `should_stop(read)` asked to stop early. It is
    asked at the start of each accumulation window (so a stop never splits one); `read` is true every
    `progress.interval` micro-steps, where the device sums are read (and may be talked over between
    ranks). `tb` gets the loss and rate at each read (optimizer steps counted after `step_offset`)."""
    cfg, layout = ctx.cfg, layout_of(ctx.cfg.memory_format)
    train_mode(trainee)  # frozen parts stay in eval mode
    meter.start(ctx.device)
    next_read, logged = meter.steps + progress.interval, (meter.images, meter.loss_sum)
    source, finished = feed(batches, transform, aug_gen, ctx.device, cfg.prefetch == "on"), False
    try:
        while True:
            start = time.perf_counter()
            batch = source.next()
            if batch is None:
                finished = True
                break
            fetched = time.perf_counter()
            if meter.steps % cfg.accum_steps == 0:  # after the fetch: a stop at the last step still ends the epoch
                read = meter.steps >= next_read
                if read:
                    next_read, logged = meter.steps + progress.interval, _report(ctx, meter, progress, tb,
                                                                                 step_offset, logged)
                if should_stop(read):
                    break
            x, targets = source.prepare(batch)  # augmented, normalised, mixed; soft targets
            loss, logits, norm = micro_step(ctx, trainee, x.contiguous(memory_format=layout) if x.dim() == 4 else x,
                                            targets, meter.steps)
            source.launched()
            meter.add_batch(loss, logits, targets, ctx.dataset.multilabel)
            if norm is not None:
                meter.add_grad_norm(norm)
            meter.add_time(fetched - start, time.perf_counter() - fetched)
            progress.advance(meter)
    finally:
        source.close(stopped=not finished)
    if ctx.device.type == "cuda":  # the steps were only launched: the time they ran to is now
        start = time.perf_counter()
        torch.cuda.synchronize(ctx.device)
        meter.add_time(0.0, time.perf_counter() - start)
    _report(ctx, meter, progress, tb, step_offset, logged)
    return finished


def _report(ctx: TrainingContext, meter: EpochMeter, progress: Progress, tb: TensorBoardLog | None, step_offset: int,
            logged: tuple[int, float]) -> tuple[int, float]:
    """A read of the device sums: the bar's loss and accuracy, and TensorBoard's loss over the images since
    the last read (`logged`: images and loss sum then). Returns the new `logged`."""
    meter.read()
    progress.update(meter)
    images, loss_sum = logged
    if tb is not None and meter.images > images:
        tb.step(step_offset + meter.optimizer_steps, (meter.loss_sum - loss_sum) / (meter.images - images),
                ctx.optimizer.param_groups[-1]["lr"])
    return meter.images, meter.loss_sum


def _unwrapped(module):
    """The model itself inside a DistributedDataParallel or torch.compile wrapper."""
    while isinstance(module, DistributedDataParallel) or hasattr(module, "_orig_mod"):
        module = module.module if isinstance(module, DistributedDataParallel) else module._orig_mod
    return module


def _finite_weights(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def _diverged(ctx: TrainingContext, state: TrainState, what: str, epoch: int, run):
    return diverged(what, epoch, state.meter.steps, state.epoch if state.saved else None, run, ctx.cfg.lr)


def run_epochs(ctx: TrainingContext, inputs: Inputs, state: TrainState, checkpointer: Checkpointer, run,
               progress: Progress, stop: StopOnSignal, aug_gen: torch.Generator,
               stop_after_steps: int | None = None, tb: TensorBoardLog | None = None) -> None:
    """Train from `state` to the last epoch, or until --patience ends the run: after each epoch,
    validate, log (metrics.jsonl, and `tb` when given), keep best.pt and save last.pt."""
    cfg, world = ctx.cfg, ctx.world
    per_epoch = ctx.optimizer_steps_per_epoch
    for epoch in range(state.epoch, cfg.epochs):
        if state.stopped_early:
            break
        apply_schedule(ctx.model, ctx.groups, epoch)
        batches = epoch_batches(ctx, inputs.train, state.meter.steps, epoch, aug_gen, not inputs.features_cached)

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
        finished = train_one_epoch(ctx, inputs.trainee, batches, inputs.transform, aug_gen, state.meter,
                                   should_stop=should_stop, progress=progress, tb=tb, step_offset=epoch * per_epoch)
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


def improved(monitor: str, score: float, best: float | None, min_delta: float, loss: float | None = None,
             best_loss: float | None = None) -> bool:
    """Whether `score` of `monitor` beats `best` by more than `min_delta` (the first score always does), or
    equals it at a lower validation loss: on a small val split accuracies tie often, and of two epochs
    that get the same images right the one more confident on them is the better choice."""
    if best is None:
        return True
    if score == best and loss is not None and best_loss is not None:
        return loss < best_loss
    return score < best - min_delta if MONITORS[monitor] == "min" else score > best + min_delta


def _end_epoch(ctx: TrainingContext, inputs: Inputs, state: TrainState, checkpointer: Checkpointer, run,
               progress: Progress, epoch: int, aug_gen: torch.Generator) -> dict:
    """Validate, log and checkpoint the epoch just trained; returns its metrics.jsonl record."""
    cfg = ctx.cfg
    scores = validate(ctx, inputs.val, inputs.features_cached, inputs.trainee)
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
    if improved(cfg.monitor, score, state.best_score, cfg.min_delta, scores["val_loss"], state.best_loss):
        state.best_score, state.best_loss, state.best_epoch, state.bad_epochs = score, scores["val_loss"], epoch + 1, 0
        checkpointer.save_best(state, scores)
    else:
        state.bad_epochs += 1
    state.stopped_early = cfg.patience is not None and state.bad_epochs >= cfg.patience and state.epoch < cfg.epochs
    if ctx.plateau is not None and ctx.scheduler.last_epoch >= ctx.warmup_steps:
        ctx.plateau.step(score)  # after the warm-up: cut the rates when the monitor stalls
    checkpointer.save_last(state, aug_gen)
    return record
