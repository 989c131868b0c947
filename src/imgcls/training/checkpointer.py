"""What last.pt and best.pt hold, written and read back in one place.

last.pt  the full training state: the evaluated weights under "model" (the average when EMA is on,
         so `--checkpoint last` scores what the summary scored), the raw training weights when they
         differ, optimizer, schedule, loss scaler, the epoch and the position inside it, and every
         rank's random streams. A resumed run ends with exactly the metrics of an uninterrupted one.
best.pt  the evaluated weights of the epoch with the best validation score (--monitor).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from imgcls import rundir
from imgcls.config import config_change, config_record
from imgcls.data.presets import PixelRecipe
from imgcls.errors import UserError
from imgcls.models.checkpoint import load_checkpoint, save_checkpoint
from imgcls.training import distributed
from imgcls.training.context import TrainingContext


@dataclass
class EpochMeter:
    """Running sums of the current epoch; saved with the checkpoint so a resumed epoch adds up.

    During the epoch the sums a step adds to (loss, hits, gradient norms) live in `live`, one float64
    tensor on the training device, so a step never waits for the device to tell the host a number;
    `read()` copies them into the Python fields, at the progress interval and at the epoch's end.
    `live` starts from the Python fields (a resumed epoch goes on from its checkpoint's sums) and is
    never reset while the epoch runs, so the additions, and the sums, do not depend on when it is read."""

    steps: int = 0
    images: int = 0
    loss_sum: float = 0.0
    correct: float = 0  # images right (a count), or for a multi-label run the sum of their shares of labels right
    seconds: float = 0.0  # wall time of the steps, waiting for data included
    data_seconds: float = 0.0  # of which waiting for the next batch
    compute_seconds: float = 0.0  # of which the step: transfer, inline augmentation, forward, backward, optimizer
    nonfinite_loss: float | None = None  # set by a read that found the loss sum NaN or infinite (never saved)
    grad_norm_sum: float = 0.0  # of the gradient's global norm before clipping, over optimizer steps
    grad_norm_max: float = 0.0
    optimizer_steps: int = 0
    live: torch.Tensor | None = field(default=None, repr=False, compare=False)  # [loss_sum, correct, norm sum, max]

    def start(self, device: torch.device) -> None:
        """Put the sums on `device`, where the steps add to them (unless they are there already)."""
        if self.live is None or self.live.device != device:
            self.live = torch.tensor([self.loss_sum, self.correct, self.grad_norm_sum, self.grad_norm_max],
                                     dtype=torch.float64, device=device)

    def add_batch(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
                  multilabel: bool = False) -> None:
        """One micro-batch's mean loss and hits (the dominant label when mixed; multi-label: the share of an
        image's labels decided right at 0.5), added on the device. float64 as the Python sums were, so a
        read gives exactly what `loss.item() * n` summed to."""
        n = len(targets)
        self.live[0].add_(loss.detach().double() * n)
        if multilabel:
            self.live[1].add_(((logits.detach() > 0) == (targets > 0.5)).double().mean(dim=1).sum())
        else:
            self.live[1].add_((logits.detach().argmax(1) == targets.argmax(1)).sum())
        self.steps += 1
        self.images += n

    def add_grad_norm(self, norm: torch.Tensor) -> None:
        """One optimizer step's gradient norm (a tensor, not read). An infinite one (fp16 loss scaling
        overflowed, so the GradScaler skips the step) counts as a step but not in the norms."""
        norm = norm.detach().double()
        finite = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
        self.live[2].add_(finite)
        torch.maximum(self.live[3], finite, out=self.live[3])
        self.optimizer_steps += 1

    def add_time(self, data: float, compute: float) -> None:
        """A step's seconds: waiting for its batch, and the rest of it."""
        self.data_seconds += data
        self.compute_seconds += compute
        self.seconds += data + compute

    def read(self) -> EpochMeter:
        """Copy the device sums into the Python fields: the one device-to-host transfer (a sync on a
        GPU). A NaN or infinite loss sum means a step's loss was: it is kept in `nonfinite_loss`."""
        if self.live is not None:
            loss_sum, correct, norm_sum, norm_max = self.live.tolist()
            self.loss_sum, self.correct, self.grad_norm_sum, self.grad_norm_max = \
                loss_sum, int(correct) if correct.is_integer() else correct, norm_sum, norm_max
            if not math.isfinite(loss_sum) and self.nonfinite_loss is None:
                self.nonfinite_loss = loss_sum
        return self

    def as_dict(self) -> dict:
        """The Python numbers (read first), what last.pt holds."""
        self.read()
        return {k: v for k, v in asdict(replace(self, live=None)).items() if k != "live"}


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    meter: EpochMeter = field(default_factory=EpochMeter)  # progress inside the next epoch
    best_score: float | None = None  # the best value of --monitor so far, at best_epoch
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the monitor last improved (for --patience)
    stopped_early: bool = False  # --patience ended the run
    train_seconds: float = 0.0
    saved: bool = False  # whether last.pt holds this run's state (else a failure leaves nothing worth keeping)
    best_loss: float | None = None  # the val loss at best_epoch: breaks a tie of --monitor


def rng_state(aug_gen: torch.Generator, device: torch.device) -> dict:
    return {"aug": aug_gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(rng: dict, aug_gen: torch.Generator, device: torch.device) -> None:
    aug_gen.set_state(rng["aug"])
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def global_meter(ctx: TrainingContext, meter: EpochMeter) -> EpochMeter:
    """The epoch so far over all ranks: sums of images, loss and hits; steps, times and gradient norms
    (the same on every rank after the all-reduce) as rank 0's. Reads the device sums first."""
    meter.read()
    images, loss_sum, correct = distributed.all_sum(ctx.world, [meter.images, meter.loss_sum, meter.correct])
    return replace(meter, images=int(images), loss_sum=loss_sum, correct=int(correct), live=None)  # numbers only


def pixels_of(dataset, cfg) -> dict:
    """What the weights were trained to see (dataset.json and config.yaml must say the same): size, crop and
    normalisation, and the recipe's pixel stage that `--tta N` and an export's TTA redraw."""
    return {"img_size": dataset.img_size, "crop_pct": dataset.crop_pct, "mean": [float(v) for v in dataset.mean],
            "std": [float(v) for v in dataset.std], "recipe": PixelRecipe.of(cfg).as_dict()}


def _check_same_weights(ckpt: dict, now: torch.Tensor | None, spec: str, path: Path) -> None:
    """A resumed run weighs its classes as it began (a --class-weights FILE edited meanwhile would change the loss
    half-way, and the summary would report the new weights for the whole run)."""
    if "class_weights" not in ckpt:  # checkpoints of older runs did not say
        return
    before = ckpt["class_weights"]
    if (before is None) != (now is None) or before is not None and not torch.equal(before, now):
        raise UserError(f"--class-weights {spec} now gives other weights than {path.parent} began with "
                        f"({'none' if before is None else [round(float(w), 4) for w in before]}): the file was edited; "
                        "restore it, or train a new run")


class Checkpointer:
    def __init__(self, run: Path, ctx: TrainingContext):
        self.last, self.best, self.ctx = Path(run) / rundir.LAST, Path(run) / rundir.BEST, ctx

    def save_last(self, state: TrainState, aug_gen: torch.Generator) -> None:
        """Every rank calls this (it gathers each rank's random streams); rank 0 writes."""
        ctx = self.ctx
        rng = distributed.gather(ctx.world, rng_state(aug_gen, ctx.device))
        meter = global_meter(ctx, state.meter)
        if ctx.world.main:
            save_checkpoint({
                "role": "last",  # a last.pt copied over best.pt is then told apart
                "fingerprint": ctx.dataset.fingerprint,  # the data it trained on, whatever dataset.json says
                "model_name": ctx.cfg.model,
                "num_classes": ctx.dataset.num_classes,
                "classes": ctx.dataset.classes,
                "preprocessing": pixels_of(ctx.dataset, ctx.cfg),
                "class_weights": ctx.class_weights,  # from a file, perhaps: an edit of it must not go unseen
                "config": config_record(ctx.cfg),  # config.yaml must say the same when the run is resumed or read
                "model": ctx.evaluated.state_dict(),
                "train_weights": ctx.model.state_dict() if ctx.ema is not None else None,
                "ema": ctx.ema.state_dict() if ctx.ema is not None else None,
                "optimizer": ctx.optimizer.state_dict(),
                "scheduler": ctx.scheduler.state_dict(),
                "scaler": ctx.scaler.state_dict(),
                "plateau": ctx.plateau.state_dict() if ctx.plateau is not None else None,
                "lookahead": ctx.lookahead.state_dict() if ctx.lookahead is not None else None,
                "epoch": state.epoch,
                "meter": meter.as_dict(),
                "best_score": state.best_score,
                "best_loss": state.best_loss,
                "best_epoch": state.best_epoch,
                "bad_epochs": state.bad_epochs,
                "stopped_early": state.stopped_early,
                "train_seconds": state.train_seconds,
                "rng": rng,  # one per rank: augmentation, torch (dropout), this rank's GPU
            }, self.last)
        state.saved = True

    def save_best(self, state: TrainState, scores: dict) -> None:
        ctx = self.ctx
        if ctx.world.main:
            save_checkpoint({"role": "best", "fingerprint": ctx.dataset.fingerprint,
                             "model_name": ctx.cfg.model, "num_classes": ctx.dataset.num_classes,
                             "classes": ctx.dataset.classes, "preprocessing": pixels_of(ctx.dataset, ctx.cfg),
                             "config": config_record(ctx.cfg),
                             "model": ctx.evaluated.state_dict(), "epoch": state.epoch,
                             "val_acc": scores.get("val_acc"),  # None: no validation split, the newest epoch
                             "monitor": ctx.cfg.monitor if scores else None, "score": state.best_score}, self.best)

    def restore(self, aug_gen: torch.Generator, allow_data_change: bool = False) -> TrainState:
        """Load last.pt into the context's model, optimizer and random streams; return where it stopped.
        The data must be what last.pt trained on (its own record of it, not dataset.json's) unless allowed."""
        ctx, world = self.ctx, self.ctx.world
        ckpt = load_checkpoint(self.last, ctx.cfg.model, ctx.dataset.num_classes)
        if ckpt.get("fingerprint") is not None:  # checkpoints of older runs carry none
            rundir.check_same_data(self.last.parent, ckpt["fingerprint"], ctx.dataset.fingerprint, allow_data_change)
        changed = config_change(ckpt.get("config"), ctx.cfg)
        if changed:
            raise UserError(f"{self.last.parent / rundir.CONFIG} was edited since the run began ({changed} in "
                            f"{self.last.name}); restore it to resume, or train a new run with the new options")
        _check_same_weights(ckpt, ctx.class_weights, ctx.cfg.class_weights, self.last)
        # Older runs kept the raw weights under "model" and no "train_weights".
        ctx.model.load_state_dict(ckpt.get("train_weights") or ckpt["model"])
        if ctx.ema is not None:
            ctx.ema.load_state_dict(ckpt["ema"])
        ctx.optimizer.load_state_dict(ckpt["optimizer"])
        ctx.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            ctx.scaler.load_state_dict(ckpt["scaler"])
        if ctx.plateau is not None and ckpt.get("plateau"):
            ctx.plateau.load_state_dict(ckpt["plateau"])
        if ctx.lookahead is not None and ckpt.get("lookahead"):
            ctx.lookahead.load_state_dict(ckpt["lookahead"])
        meter = EpochMeter(**ckpt["meter"])
        if not world.main:  # rank 0 carries the epoch's sums so far; the others add their own
            meter = replace(meter, images=0, loss_sum=0.0, correct=0)
        best = ckpt["best_score"] if "best_score" in ckpt else ckpt["best_val_acc"]  # older runs monitored val_acc
        state = TrainState(ckpt["epoch"], meter, best, ckpt["best_epoch"], ckpt.get("bad_epochs", 0),
                           ckpt.get("stopped_early", False), ckpt["train_seconds"], saved=True,
                           best_loss=ckpt.get("best_loss"))  # older runs broke no ties
        rng = ckpt.get("rng") or [{"aug": ckpt["aug_rng"], "torch": ckpt["torch_rng"], "cuda": None}]  # older runs
        if len(rng) != world.size and meter.steps:
            raise UserError(f"{self.last.parent} stopped inside an epoch with {len(rng)} process(es); resume it with "
                            f"the same number (torchrun --nproc_per_node={len(rng)})")
        # else (an epoch boundary, another process count) the augmentation stream is reseeded from the epoch;
        # torch's global stream (dropout, drop-path) goes on from each rank's seed instead
        if len(rng) == world.size:
            set_rng_state(rng[world.rank], aug_gen, ctx.device)
        return state
