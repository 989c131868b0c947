"""`imgcls lr-find`: Leslie Smith's learning-rate range test.

A fresh copy of the run's model (pretrained weights loaded as `train` would) trains for at most one
epoch while one multiplier sweeps every optimizer group's rate exponentially from --start-lr to
--end-lr (measured on the head's rate), so per-group rates (--layer-decay, --group-lrs) keep their
ratios and a frozen backbone stays frozen. The loss is smoothed by an exponential moving average
(bias-corrected) and the sweep stops when it exceeds 4x its best or a loss is NaN or infinite.
Nothing is saved: no run folder, and the user's weights are only read.

Two suggestions, both read off the smoothed loss against log(lr):
  steepest  the rate where the loss falls fastest;
  valley    fastai's rule: the longest descending stretch of the curve (longest decreasing
            subsequence) and the point about halfway along it (see `_valley`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from imgcls.config import TrainConfig, check_float32
from imgcls.errors import UserError
from imgcls.kernels.choice import layout_of
from imgcls.training.checkpointer import TrainState
from imgcls.training.context import TrainingContext, build_context, optimizer_steps
from imgcls.training.distributed import World
from imgcls.training.loop import micro_step
from imgcls.training.train import prepare_inputs
from imgcls.training.transfer import apply_schedule, train_mode

BETA = 0.98  # smoothing of the loss (fastai's and Smith's choice)
DIVERGE = 4.0  # stop once the smoothed loss exceeds this multiple of its best
MIN_STEPS = 10
PLOT_SUFFIXES = (".png", ".svg", ".pdf")


@dataclass
class RangeTest:
    lrs: list[float]  # the reference (last, i.e. the head's) group's rate at each step
    losses: list[float]  # the raw training loss of each step
    smoothed: list[float]
    stop: str  # why the sweep ended: "end", "diverged" or "non-finite"
    steepest: float | None = None
    valley: float | None = None
    seconds: float = 0.0  # the sweep's wall time


def lr_range_test(optimizer: torch.optim.Optimizer, train_step: Callable[[], float], start_lr: float,
                  end_lr: float, steps: int) -> RangeTest:
    """Sweep the last param group's rate from `start_lr` to `end_lr` over `steps` calls of `train_step`
    (one optimizer step, returning its loss); every other group keeps its ratio to that rate. The
    optimizer's rates are left at the last ones tried."""
    bases = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]  # LambdaLR keeps the peak in initial_lr
    ref = bases[-1]
    result = RangeTest([], [], [], "end")
    avg, best, lr = 0.0, math.inf, start_lr

    def set_rates(lr: float) -> None:
        for group, base in zip(optimizer.param_groups, bases, strict=True):
            group["lr"] = base * lr / ref

    for i in range(steps):
        lr = start_lr * (end_lr / start_lr) ** (i / max(1, steps - 1))
        set_rates(lr)
        loss = train_step()
        if not math.isfinite(loss):
            result.stop = "non-finite"
            break
        avg = BETA * avg + (1 - BETA) * loss
        smooth = avg / (1 - BETA ** (i + 1))  # bias correction: the average starts at 0
        result.lrs.append(lr)
        result.losses.append(loss)
        result.smoothed.append(smooth)
        best = min(best, smooth)
        if smooth > DIVERGE * best:
            result.stop = "diverged"
            break
    set_rates(lr)  # a scheduler stepped inside train_step may have moved them
    result.steepest, result.valley = suggestions(result.lrs, result.smoothed)
    return result


def _window(n: int) -> slice:
    """The points suggestions are read from: fastai drops the first tenth (the average is still
    settling) and the last five (the blow-up) when there are enough."""
    return slice(n // 10, n - 5) if n > 20 else slice(0, n)


def suggestions(lrs: list[float], smoothed: list[float]) -> tuple[float | None, float | None]:
    """(steepest, valley) rates, or None where the curve is too short to tell."""
    window = _window(len(lrs))
    lrs, losses = lrs[window], smoothed[window]
    if len(lrs) < 3:
        return None, None
    logs = [math.log(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i]) / (logs[i + 1] - logs[i]) for i in range(len(lrs) - 1)]
    steepest_i = min(range(len(slopes)), key=slopes.__getitem__)
    steepest = lrs[steepest_i] if slopes[steepest_i] < 0 else None
    return steepest, _valley(lrs, losses)


def _valley(lrs: list[float], losses: list[float]) -> float | None:
    """The valley suggestion of fastai's lr_find (fastai.callback.schedule.valley): find the longest
    strictly decreasing subsequence of the loss, take the index range [end - length + 1, end] such a run
    would cover without gaps, and suggest the rate a third plus a sixth of the way along it (int(d/3) +
    int(d/6) steps into a range d steps long), about halfway down. fastai starts the range one point
    earlier, at end - length; imgcls has always used the first point of the gap-free run. None when the
    longest run has fewer than 3 points.

    The length of the longest decreasing run ending at each point comes from patience sorting, in
    O(n log n): -tails[k] is the largest loss that ends a run of k + 1 points so far (those losses fall
    as k grows), so bisection finds how long a run each new loss can extend. Of several runs of the greatest
    length, the one that ends first is taken. A NaN compares with nothing, so it forms only a run of one.
    """
    from bisect import bisect_left

    tails: list[float] = []  # negated, so that bisect sees an increasing list
    best_length, end = 0, 0
    for i, loss in enumerate(losses):
        if math.isnan(loss):
            length = 1
        else:
            slot = bisect_left(tails, -loss)  # the runs ending above `loss` that it can extend
            tails[slot : slot + 1] = [-loss]
            length = slot + 1
        if length > best_length:
            best_length, end = length, i
    if best_length < 3:  # the loss never really fell
        return None
    span = best_length - 1
    return lrs[end - span + span // 3 + span // 6]


def run_lr_find(cfg: TrainConfig, device_name: str, start_lr: float, end_lr: float, steps: int | None,
                out: str | Path) -> tuple[RangeTest, Path]:
    """The range test on a fresh copy of `cfg`'s model; writes the plot to `out` and returns both.
    `steps` counts optimizer steps (each --accum-steps micro-batches), at most one epoch's."""
    _check_request(start_lr, end_lr, steps, out)
    ctx = build_context(cfg, World(), device_name, fresh=True)  # never makes a run folder
    cfg = ctx.cfg
    per_epoch = optimizer_steps(ctx.steps_per_epoch, cfg.accum_steps)
    steps = min(100, per_epoch) if steps is None else steps
    if steps > per_epoch:
        raise UserError(f"--steps {steps} is more than one epoch ({per_epoch} optimizer steps of --batch-size "
                        f"{cfg.batch_size} x --accum-steps {cfg.accum_steps}); lower --steps or --batch-size")
    train_step = _train_step(ctx, steps)
    if not cfg.quiet:
        print(f"lr-find: {cfg.model} on {ctx.dataset.name}, {ctx.device.type} {ctx.precision}: the head's rate "
              f"{start_lr:g} to {end_lr:g} over {steps} steps of batch {cfg.batch_size * cfg.accum_steps}",
              flush=True)
    started = time.perf_counter()
    result = lr_range_test(ctx.optimizer, train_step, start_lr, end_lr, steps)
    result.seconds = time.perf_counter() - started
    if not result.lrs:
        raise UserError(f"the loss of the first step (lr {start_lr:g}) was not finite; check the data and --pretrained "
                        "weights, or lower --start-lr")
    return result, plot_range_test(result, out, cfg)


def _train_step(ctx: TrainingContext, steps: int) -> Callable[[], float]:
    """One optimizer step as `train` takes it (the same loss, accumulation, clipping and augmentation,
    via the loop's micro_step), over the first `steps` windows of a seeded shuffle; returns its mean loss."""
    cfg = ctx.cfg
    apply_schedule(ctx.model, ctx.groups, 0)  # what trains in the first epoch: the head alone when frozen
    inputs = prepare_inputs(ctx, TrainState())
    order = torch.randperm(len(inputs.train), generator=torch.Generator().manual_seed(cfg.seed))
    batches = iter(inputs.train.batches(order[: steps * cfg.accum_steps * cfg.batch_size], cfg.batch_size,
                                        seed=cfg.seed))
    aug_gen = torch.Generator().manual_seed(cfg.seed)
    train_mode(inputs.trainee)
    micro = 0

    def train_step() -> float:
        nonlocal micro
        losses = []
        while True:
            images, labels = next(batches)
            x, targets = inputs.transform(images.to(ctx.device), labels.to(ctx.device), aug_gen)
            if x.dim() == 4:  # images; cached features are B x D
                x = x.contiguous(memory_format=layout_of(cfg.memory_format))
            loss, _, norm = micro_step(ctx, inputs.trainee, x, targets, micro)
            micro += 1
            losses.append(loss.item())
            if norm is not None:  # the window's last micro-batch: the optimizer stepped
                return sum(losses) / len(losses)

    return train_step


def _check_request(start_lr: float, end_lr: float, steps: int | None, out: str | Path) -> None:
    """The sweep's own options, checked before the slow part."""
    if not 0 < start_lr < end_lr or not math.isfinite(end_lr):
        raise UserError(f"--start-lr {start_lr:g} and --end-lr {end_lr:g} must be positive with start < end; "
                        "e.g. --start-lr 1e-7 --end-lr 10")
    for name, rate in (("start_lr", start_lr), ("end_lr", end_lr)):  # the update multiplies float32 gradients
        check_float32(name, rate, zero_allowed=False)
    if steps is not None and steps < MIN_STEPS:
        raise UserError(f"--steps {steps} is too few to read a curve from; give at least {MIN_STEPS}")
    out = Path(out)
    if out.suffix.lower() not in PLOT_SUFFIXES or out.is_dir():
        raise UserError(f"--out {out} must name a {', '.join(PLOT_SUFFIXES)} file for the plot; e.g. --out lr_find.png")


def plot_range_test(result: RangeTest, out: str | Path, cfg: TrainConfig | None = None) -> Path:
    """Loss against the head's rate (log x): raw and smoothed, both suggestions marked."""
    from imgcls.plotting import plt, save_figure

    out = Path(out)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", label="smoothed loss")
    for lr, name, colour in ((result.steepest, "steepest", "C3"), (result.valley, "valley", "C2")):
        if lr is not None:
            ax.axvline(lr, color=colour, linestyle="--", linewidth=1, label=f"{name} {lr:.2g}")
    ax.set_xscale("log")
    if result.smoothed:  # the blow-up would flatten the interesting part
        ax.set_ylim(min(result.smoothed) * 0.9, min(max(result.losses), result.smoothed[0] * 1.5))
    ax.set_xlabel("learning rate (the head's; other groups keep their ratio)")
    ax.set_ylabel("training loss")
    if cfg is not None:
        ax.set_title(f"lr-find: {cfg.model}, batch {cfg.batch_size}, {cfg.optimizer}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def describe(result: RangeTest, start_lr: float, end_lr: float, group_lrs: bool = False) -> list[str]:
    """What the CLI prints: how the sweep ended and the suggested --lr (with --group-lrs, the head's rate)."""
    ended = {"end": f"swept {start_lr:g} to {end_lr:g}",
             "diverged": f"stopped at lr {result.lrs[-1]:.2g}: the loss exceeded {DIVERGE:g}x its best",
             "non-finite": f"stopped at lr {result.lrs[-1]:.2g}: the next loss was not finite"}[result.stop]
    lines = [f"{ended} after {len(result.lrs)} steps ({result.seconds:.1f} s); lowest smoothed loss "
             f"{min(result.smoothed):.3f}"]
    for name, lr in (("steepest descent", result.steepest), ("valley", result.valley)):
        what = "head rate (scale --group-lrs to it)" if group_lrs else "--lr"
        lines.append(f"suggested {what} {lr:.2g} ({name})" if lr is not None
                     else f"no {name} suggestion: the loss did not fall over the sweep; widen --start-lr/--end-lr "
                          "or raise --steps")
    return lines
