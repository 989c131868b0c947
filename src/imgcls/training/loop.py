"""The epoch loop: `train_one_epoch`, `validate`, and `run_epochs`, which checkpoints after each epoch.

Stops are decided at step boundaries, together by every rank: Ctrl-C or SIGTERM (finish the step,
save, stop), a step limit, or a non-finite loss (stop without saving: the last good checkpoint stays).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from imgcls import rundir
from imgcls.data import Split, TrainTransform
from imgcls.data.mixing import soft_cross_entropy
from imgcls.errors import UserError
from imgcls.evaluation.predict import predict_logits
from imgcls.runtime import autocast
from imgcls.training import distributed
from imgcls.training.checkpointer import Checkpointer, EpochMeter, TrainState, global_meter
from imgcls.training.context import TrainingContext
from imgcls.training.progress import Progress
from imgcls.training.transfer import apply_schedule, train_mode


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
        self.announce = announce
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum
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


def train_one_epoch(model, batches, optimizer, scheduler, transform: TrainTransform, aug_gen, meter: EpochMeter,
                    *, device, precision: str, should_stop, progress: Progress, scaler=None, ema=None) -> bool:
    """Train over `batches`, adding to `meter`. Returns False when `should_stop()` asks to stop early.

    `scaler` scales fp16 losses; `ema` is updated after every step. A non-finite loss is recorded in
    `meter.nonfinite_loss` and reported by the next `should_stop()`, which every rank calls."""
    train_mode(model)  # frozen parts stay in eval mode
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    raw = _unwrapped(model)
    batches = iter(batches)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        if batch is None:
            return True
        fetched = time.perf_counter()
        if should_stop():  # after the fetch, so a stop at an epoch's last step still ends the epoch
            return False
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        x, targets = transform(images, labels, aug_gen)  # augmented, normalised, mixed; soft targets
        if x.dim() == 4:  # images; cached features are B x D
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, precision):
            logits = model(x)
        loss = soft_cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(raw)
        n, value = len(labels), loss.item()
        if not math.isfinite(value):
            meter.nonfinite_loss = value
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


def validate(ctx: TrainingContext, inputs: Inputs) -> tuple[float, float]:
    """(loss, accuracy) of the evaluated weights on the validation split, summed over ranks."""
    if inputs.features_cached:
        logits, labels = head_logits(inputs.trainee, inputs.val, ctx.device, ctx.precision), inputs.val.labels
    else:
        logits, labels = predict_logits(ctx.evaluated, inputs.val, ctx.dataset.mean, ctx.dataset.std, ctx.device,
                                        ctx.precision, ctx.cfg.eval_batch_size)
    loss, correct, n = distributed.all_sum(ctx.world, [F.cross_entropy(logits, labels, reduction="sum").item(),
                                                       (logits.argmax(1) == labels).sum().item(), len(labels)])
    return loss / n, correct / n


@torch.inference_mode()
def head_logits(head, features: Split, device, precision: str) -> torch.Tensor:
    head.eval()
    with autocast(device, precision):
        return head(features.images.to(device)).float().cpu()


def _stream_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7 + stream) % 2**63


def _epoch_batches(ctx: TrainingContext, inputs: Inputs, state: TrainState, epoch: int, aug_gen: torch.Generator):
    """This rank's remaining batches of `epoch`: one seeded permutation shared by every rank, each rank
    taking its share of every global batch, skipping the steps a resumed run already took."""
    cfg, world = ctx.cfg, ctx.world
    order = torch.randperm(len(ctx.dataset.train), generator=torch.Generator().manual_seed(
        _stream_seed(cfg.seed, epoch, 0)))[: ctx.steps_per_epoch * cfg.batch_size]
    if state.meter.steps == 0:
        aug_gen.manual_seed(_stream_seed(ctx.rank_seed, epoch, 1))
    local_batch = cfg.batch_size // world.size
    mine = distributed.rank_order(order, cfg.batch_size, world)[state.meter.steps * local_batch :]
    return inputs.train.batches(mine, local_batch, seed=_stream_seed(ctx.rank_seed, epoch, 2))


def _finite_weights(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def _diverged(ctx: TrainingContext, state: TrainState, what: str, epoch: int, run) -> Diverged:
    kept = (f"the last good state (epoch {state.epoch}) is in {run / rundir.LAST}" if state.saved
            else "no checkpoint was written, so the run folder is removed")
    return Diverged(f"training diverged: {what} in epoch {epoch + 1} (step {state.meter.steps}); {kept}; lower "
                    f"--lr (now {ctx.cfg.lr:g}) or lengthen --warmup-epochs, and train a new run")


def run_epochs(ctx: TrainingContext, inputs: Inputs, state: TrainState, checkpointer: Checkpointer, run,
               progress: Progress, stop: StopOnSignal, aug_gen: torch.Generator,
               stop_after_steps: int | None = None) -> None:
    """Train from `state` to the last epoch: after each, validate, log, keep best.pt and save last.pt."""
    cfg, world = ctx.cfg, ctx.world
    for epoch in range(state.epoch, cfg.epochs):
        apply_schedule(ctx.model, ctx.groups, epoch)
        batches = _epoch_batches(ctx, inputs, state, epoch, aug_gen)

        def should_stop(epoch=epoch):
            done = epoch * ctx.steps_per_epoch + state.meter.steps
            asked, bad = distributed.any_rank(world, [stop.requested, state.meter.nonfinite_loss is not None])
            if bad:  # every rank stops together, and nothing is saved from here on
                raise _diverged(ctx, state, f"the loss became {state.meter.nonfinite_loss}", epoch, run)
            return asked or (stop_after_steps is not None and done >= stop_after_steps)

        progress.start_epoch(epoch, state.meter)
        finished = train_one_epoch(inputs.trainee, batches, ctx.optimizer, ctx.scheduler, inputs.transform, aug_gen,
                                   state.meter, device=ctx.device, precision=ctx.precision, should_stop=should_stop,
                                   progress=progress, scaler=ctx.scaler, ema=ctx.ema)
        should_stop()  # a non-finite loss in the epoch's last step
        distributed.share_buffers(world, ctx.model)
        if ctx.ema is not None:
            distributed.share_buffers(world, ctx.ema)
        if not _finite_weights(ctx.evaluated):
            raise _diverged(ctx, state, "the weights became NaN or infinite", epoch, run)
        if not finished:
            checkpointer.save_last(state, aug_gen)
            raise Interrupted(run, epoch, state.meter.steps, stop.signum)
        _end_epoch(ctx, inputs, state, checkpointer, run, progress, epoch, aug_gen)


def _end_epoch(ctx: TrainingContext, inputs: Inputs, state: TrainState, checkpointer: Checkpointer, run,
               progress: Progress, epoch: int, aug_gen: torch.Generator) -> None:
    val_loss, val_acc = validate(ctx, inputs)
    if not math.isfinite(val_loss):
        raise _diverged(ctx, state, f"the validation loss became {val_loss}", epoch, run)
    meter = global_meter(ctx, state.meter)
    record = {
        "epoch": epoch + 1,
        "train_loss": meter.loss_sum / meter.images,
        "train_acc": meter.correct / meter.images,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": ctx.optimizer.param_groups[-1]["lr"],  # the head's
        "epoch_time": meter.seconds,
        "data_time": meter.data_seconds,
        "images_per_s": meter.images / max(meter.seconds, 1e-9),
    }
    if ctx.world.main:
        rundir.append_metrics(run, record)
    progress.end_epoch(record)
    state.epoch, state.train_seconds, state.meter = epoch + 1, state.train_seconds + meter.seconds, EpochMeter()
    if val_acc > state.best_val_acc:
        state.best_val_acc, state.best_epoch = val_acc, epoch + 1
        checkpointer.save_best(state, val_acc)
    checkpointer.save_last(state, aug_gen)
