"""The training loop: `train_one_epoch`, and `fit`, which runs epochs, checkpoints and resumes.

State that decides the numbers (weights, optimizer, schedule, both random streams and the
position inside the epoch) is saved in last.pt at every epoch end and on Ctrl-C, so a resumed
run ends with exactly the metrics of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import torchvision
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import imgcls
from imgcls import rundir
from imgcls.config import TrainConfig, load_config, resolved_strategy
from imgcls.data import Dataset, Split, TrainTransform, load_dataset, per_image_transform
from imgcls.data.datasets import NORMALIZATIONS, normalization_named
from imgcls.data.mixing import soft_cross_entropy
from imgcls.data.presets import DEFAULT_ERASING, normalize
from imgcls.errors import UserError
from imgcls.evaluation.calibration import expected_calibration_error
from imgcls.evaluation.predict import predict_logits
from imgcls.models import count_parameters, create_model, model_spec
from imgcls.models.checkpoint import load_checkpoint, save_checkpoint
from imgcls.models.flops import forward_gflops
from imgcls.models.weights import load_pretrained
from imgcls.runtime import autocast, resolve_device, resolve_precision, seed_everything
from imgcls.training import distributed
from imgcls.training.distributed import World
from imgcls.training.progress import Progress
from imgcls.training.transfer import (
    NEVER,
    FeatureTargets,
    LayerGroup,
    apply_schedule,
    cache_features,
    optimizer_param_groups,
    plan_groups,
    train_mode,
)


class Interrupted(Exception):
    """Training stopped early (Ctrl-C or a step limit); last.pt holds the resumable state."""

    def __init__(self, run_dir: Path, epoch: int, step: int):
        super().__init__(f"stopped in epoch {epoch + 1} after step {step}")
        self.run_dir, self.epoch, self.step = run_dir, epoch, step


@dataclass
class EpochMeter:
    """Running sums of the current epoch; saved with the checkpoint so a resumed epoch adds up."""

    steps: int = 0
    images: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    meter: EpochMeter = field(default_factory=EpochMeter)  # progress inside the next epoch
    best_val_acc: float = -1.0
    best_epoch: int = 0
    train_seconds: float = 0.0


def _stream_seed(seed: int, epoch: int, stream: int) -> int:
    return (seed * 1_000_003 + epoch * 7 + stream) % 2**63


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR factor per step: linear warm-up to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int, groups: list[LayerGroup]):
    """AdamW or Nesterov SGD over every layer group at its own rate (frozen ones join when they get
    gradients), with one warm-up + cosine factor scaling all rates alike. Fused kernels on CPU and
    CUDA: one pass over all parameters instead of one per tensor."""
    param_groups = optimizer_param_groups(model, groups, cfg.weight_decay)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                    fused=fused)
    else:
        optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, fused=fused)
    total = cfg.epochs * steps_per_epoch
    warmup = min(total, round(cfg.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup))
    return optimizer, scheduler


class StopOnSigint:
    """First Ctrl-C: finish the current step, save, stop. Second Ctrl-C: stop at once."""

    def __init__(self, announce: bool = True):
        self.requested, self.announce = False, announce
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\nstopping after this step and saving a resumable checkpoint (Ctrl-C again to abort)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train_one_epoch(model, batches, optimizer, scheduler, transform: TrainTransform, aug_gen, meter: EpochMeter,
                    *, device, precision: str, should_stop, progress: Progress, scaler=None, ema=None) -> bool:
    """Train over `batches`, adding to `meter`. Returns False when asked to stop early.

    `scaler` scales fp16 losses; `ema` is updated after every step."""
    train_mode(model)  # frozen parts stay in eval mode
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    raw = _unwrapped(model)
    for images, labels in batches:
        if should_stop():
            return False
        start = time.perf_counter()
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
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
        n = len(labels)
        meter.steps += 1
        meter.images += n
        meter.loss_sum += loss.item() * n
        meter.correct += (logits.argmax(1) == targets.argmax(1)).sum().item()  # the dominant label when mixed
        meter.seconds += time.perf_counter() - start
        progress.update(meter)
    return True


def _unwrapped(module):
    """The model itself inside a DistributedDataParallel or torch.compile wrapper."""
    while isinstance(module, DistributedDataParallel) or hasattr(module, "_orig_mod"):
        module = module.module if isinstance(module, DistributedDataParallel) else module._orig_mod
    return module


def _rng_state(aug_gen: torch.Generator, device: torch.device) -> dict:
    return {"aug": aug_gen.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(rng: dict, aug_gen: torch.Generator, device: torch.device) -> None:
    aug_gen.set_state(rng["aug"])
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


def _save_last(path: Path, model, optimizer, scheduler, scaler, state: TrainState, cfg: TrainConfig,
               num_classes: int, aug_gen: torch.Generator, device, world: World, ema=None) -> None:
    """Every rank calls this (it gathers each rank's random streams); rank 0 writes."""
    rng = distributed.gather(world, _rng_state(aug_gen, device))
    meter = _global_meter(world, state.meter)
    if not world.main:
        return
    save_checkpoint(
        {
            "model_name": cfg.model,
            "num_classes": num_classes,
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": state.epoch,
            "meter": meter.as_dict(),
            "best_val_acc": state.best_val_acc,
            "best_epoch": state.best_epoch,
            "train_seconds": state.train_seconds,
            "rng": rng,  # one per rank: augmentation, torch (dropout), this rank's GPU
        },
        path,
    )


def _global_meter(world: World, meter: EpochMeter) -> EpochMeter:
    """The epoch so far over all ranks: sums of images, loss and hits; steps and time as rank 0's."""
    images, loss_sum, correct = distributed.all_sum(world, [meter.images, meter.loss_sum, meter.correct])
    return EpochMeter(meter.steps, int(images), loss_sum, int(correct), meter.seconds)


def _versions() -> dict:
    return {
        "imgcls": imgcls.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def fit(cfg: TrainConfig | None = None, resume: str | Path | None = None,
        stop_after_steps: int | None = None) -> Path:
    """Train a new run from `cfg`, or continue the run in `resume`. Returns the run folder.

    `stop_after_steps` stops (as Ctrl-C would) once that many optimizer steps have run in
    total; used to time-box a job and by the resume test. Under torchrun every process calls
    this; they train one model together and rank 0 writes the run.
    """
    if resume is not None:
        run_dir = rundir.require_run(resume)
        cfg = load_config(run_dir / rundir.CONFIG)
        if (run_dir / rundir.SUMMARY).exists():
            raise UserError(f"{run_dir} already finished training; evaluate it with imgcls eval {run_dir}")
        if not (run_dir / rundir.LAST).exists():
            raise UserError(f"{run_dir} has no {rundir.LAST} to resume from; start the run again")
    assert cfg is not None
    world, device_name = distributed.join(cfg.device)
    try:
        return _train(cfg, resume, stop_after_steps, world, device_name)
    finally:
        distributed.leave(world)


def _train(cfg: TrainConfig, resume, stop_after_steps: int | None, world: World, device_name: str) -> Path:
    if resume is None and cfg.out and world.main:
        rundir.refuse_existing(cfg.out)  # before the slow part, so the user learns at once
    device = resolve_device(device_name)
    precision = resolve_precision(cfg.precision, device)
    _check_parallel(cfg, world, device)
    spec = model_spec(cfg.model)  # fail fast on an unknown name, before loading data
    normalization, crop_pct = _preprocessing(cfg, spec)
    dataset = load_dataset(cfg.data, cfg.data_dir, cfg.img_size or spec.img_size, cfg.val_fraction,
                           cfg.split_seed, cfg.data_mode, cfg.workers, normalize=normalization, crop_pct=crop_pct)
    seed_everything(cfg.seed)
    model = create_model(cfg.model, dataset.num_classes, head=cfg.head)
    loaded = None
    if cfg.pretrained and resume is None:  # a resumed run's weights come from last.pt
        loaded = load_pretrained(model, spec, cfg.pretrained)
    if cfg.whiten and resume is None:
        _whiten(model, dataset)
    rank_seed = cfg.seed + 1_000_003 * world.rank  # each rank's own random streams; rank 0's are a single run's
    if world.rank > 0:  # the same initial weights, but each rank its own dropout and drop-path masks
        torch.manual_seed(rank_seed)
    if cfg.sync_bn and world.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device, memory_format=torch.channels_last)
    groups = plan_groups(model, cfg)
    steps_per_epoch = _steps_per_epoch(len(dataset.train), cfg.batch_size, world)
    optimizer, scheduler = build_optimizer(model, cfg, steps_per_epoch, groups)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 needs loss scaling
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    evaluated = ema.module if ema is not None else model  # what validation, best.pt and the summary see
    state, aug_gen = TrainState(), torch.Generator()

    if resume is None:  # the folder is made only once data and model are ready, so a failure leaves none
        run_dir = None
        if world.main:
            run_dir = rundir.new_run_dir(cfg.out, cfg.data, cfg.model)
            cfg.out = str(run_dir)
            # Record resolved values, not "auto"/None, so the config says exactly what ran.
            cfg.img_size, cfg.normalize = dataset.img_size, dataset.normalization
            cfg.strategy = resolved_strategy(cfg)
            if cfg.cache_features:
                cfg.aug = "none"  # the features are computed once, from unaugmented images
            if cfg.random_erasing is None:
                cfg.random_erasing = DEFAULT_ERASING.get(cfg.aug, 0.0)
            rundir.atomic_write_bytes(run_dir / rundir.CONFIG,
                                      yaml.safe_dump(cfg.to_dict(), sort_keys=False).encode())
            rundir.write_json(run_dir / rundir.DATASET, {
                "name": dataset.name, "classes": dataset.classes, "img_size": dataset.img_size,
                "mean": dataset.mean, "std": dataset.std, "crop_pct": dataset.crop_pct,
                "fingerprint": dataset.fingerprint,
            })
        run_dir, written = distributed.from_main(world, (run_dir, cfg.to_dict()))
        if not world.main:
            cfg = TrainConfig(**written)
    else:
        run_dir = rundir.require_run(resume)
        ckpt = load_checkpoint(run_dir / rundir.LAST, cfg.model, dataset.num_classes)
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        meter = EpochMeter(**ckpt["meter"])
        if not world.main:  # rank 0 carries the epoch's sums so far; the others add their own
            meter = EpochMeter(steps=meter.steps, seconds=meter.seconds)
        state = TrainState(ckpt["epoch"], meter, ckpt["best_val_acc"], ckpt["best_epoch"], ckpt["train_seconds"])
        rng = ckpt.get("rng") or [{"aug": ckpt["aug_rng"], "torch": ckpt["torch_rng"], "cuda": None}]  # older runs
        if len(rng) != world.size and meter.steps:
            raise UserError(f"{run_dir} stopped inside an epoch with {len(rng)} process(es); resume it with "
                            f"the same number (torchrun --nproc_per_node={len(rng)})")
        if len(rng) == world.size:  # else, at an epoch boundary, every stream is reseeded from the epoch
            _set_rng_state(rng[world.rank], aug_gen, device)
        if world.main:  # epochs logged after the checkpoint was written are redone, so drop their lines
            kept = [m for m in rundir.read_metrics(run_dir) if m["epoch"] <= state.epoch]
            rundir.atomic_write_bytes(run_dir / rundir.METRICS, "".join(_jsonl(m) for m in kept).encode())

    cache_seconds = 0.0
    if cfg.cache_features:  # the head alone trains, on the frozen backbone's features
        start = time.perf_counter()
        apply_schedule(model, groups, 0)
        train_split, val_split = (
            cache_features(model, split, dataset.mean, dataset.std, device, precision, cfg.eval_batch_size)
            for split in (dataset.train, dataset.val))
        cache_seconds = time.perf_counter() - start
        trainee, transform = model.get_classifier(), FeatureTargets(dataset.num_classes, cfg.label_smoothing)
    else:
        trainee, train_split, val_split = model, dataset.train, dataset.val
        streamed = dataset.train.stream is not None
        if streamed:  # pixel augmentation runs per image in the DataLoader workers
            dataset.train.stream.transform = per_image_transform(cfg.aug, dataset.img_size)
        transform = TrainTransform(
            cfg.aug, dataset.img_size, dataset.mean, dataset.std, dataset.num_classes, cfg.random_erasing,
            cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.mix_switch_prob, cfg.label_smoothing, pixels_done=streamed,
        )
    if world.distributed:
        apply_schedule(model, groups, state.epoch)  # DDP must see which parameters train (fixed from here on)
        trainee = DistributedDataParallel(trainee)
    if cfg.compile:
        trainee = torch.compile(trainee)
    local_batch = cfg.batch_size // world.size
    val_part = val_split  # under torchrun each rank scores its share
    if world.distributed:
        if len(val_split) < world.size:
            raise UserError(f"{len(val_split)} validation images cannot be shared by {world.size} processes; "
                            "raise --val-fraction or use fewer processes")
        val_part = val_split.subset(torch.arange(world.rank, len(val_split), world.size))
    last_path, best_path = run_dir / rundir.LAST, run_dir / rundir.BEST
    progress = Progress(cfg.epochs, steps_per_epoch, local_batch, quiet=cfg.quiet or not world.main)
    with StopOnSigint(announce=world.main) as sigint, progress:
        if not cfg.quiet and world.main:  # printed once Ctrl-C is handled, so a caller may interrupt from here on
            where = f"{device.type} {precision}" + (f", {world.size} processes" if world.distributed else "")
            print(f"run {run_dir}: {cfg.model} ({count_parameters(model) / 1e6:.2f}M params) on "
                  f"{dataset.name} {dataset.img_size}px, train/val/test "
                  f"{len(dataset.train)}/{len(dataset.val)}/{len(dataset.test) if dataset.test else 0}, "
                  f"{where}", flush=True)
            if loaded is not None:
                print(loaded, flush=True)
            if cfg.strategy != "scratch":
                trained = ", ".join(_describe(g) for g in groups if g.unfreeze_epoch != NEVER)
                frozen = ", ".join(g.name for g in groups if g.unfreeze_epoch == NEVER)
                print(f"{cfg.strategy}: {trained}" + (f"; frozen: {frozen}" if frozen else ""), flush=True)
            if cfg.cache_features:
                print(f"cached {len(train_split) + len(val_split)} feature vectors in {cache_seconds:.1f} s",
                      flush=True)
        for epoch in range(state.epoch, cfg.epochs):
            apply_schedule(model, groups, epoch)
            order = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(
                _stream_seed(cfg.seed, epoch, 0)))[: steps_per_epoch * cfg.batch_size]
            if state.meter.steps == 0:
                aug_gen.manual_seed(_stream_seed(rank_seed, epoch, 1))
            mine = distributed.rank_order(order, cfg.batch_size, world)[state.meter.steps * local_batch :]
            batches = train_split.batches(mine, local_batch, seed=_stream_seed(rank_seed, epoch, 2))

            def should_stop(epoch=epoch):
                done = epoch * steps_per_epoch + state.meter.steps
                asked = distributed.any_rank(world, sigint.requested)  # all ranks stop at the same step
                return asked or (stop_after_steps is not None and done >= stop_after_steps)

            progress.start_epoch(epoch, state.meter)
            finished = train_one_epoch(
                trainee, batches, optimizer, scheduler, transform, aug_gen, state.meter,
                device=device, precision=precision, should_stop=should_stop, progress=progress,
                scaler=scaler, ema=ema,
            )
            distributed.share_buffers(world, model)
            if ema is not None:
                distributed.share_buffers(world, ema)
            if not finished:
                _save_last(last_path, model, optimizer, scheduler, scaler, state, cfg, dataset.num_classes, aug_gen,
                           device, world, ema)
                raise Interrupted(run_dir, epoch, state.meter.steps)

            if cfg.cache_features:
                logits, labels = head_logits(trainee, val_part, device, precision), val_part.labels
            else:
                logits, labels = predict_logits(evaluated, val_part, dataset.mean, dataset.std, device,
                                                precision, cfg.eval_batch_size)
            val_loss, val_correct, val_n = distributed.all_sum(world, [
                F.cross_entropy(logits, labels, reduction="sum").item(),
                (logits.argmax(1) == labels).sum().item(), len(labels)])
            meter = _global_meter(world, state.meter)
            record = {
                "epoch": epoch + 1,
                "train_loss": meter.loss_sum / meter.images,
                "train_acc": meter.correct / meter.images,
                "val_loss": val_loss / val_n,
                "val_acc": val_correct / val_n,
                "lr": optimizer.param_groups[-1]["lr"],  # the head's
                "epoch_time": meter.seconds,
                "images_per_s": meter.images / max(meter.seconds, 1e-9),
            }
            if world.main:
                with open(run_dir / rundir.METRICS, "a") as f:
                    f.write(_jsonl(record))
            progress.end_epoch(record)
            state.epoch, state.train_seconds = epoch + 1, state.train_seconds + meter.seconds
            state.meter = EpochMeter()
            if record["val_acc"] > state.best_val_acc:
                state.best_val_acc, state.best_epoch = record["val_acc"], epoch + 1
                if world.main:
                    save_checkpoint({"model_name": cfg.model, "num_classes": dataset.num_classes,
                                     "model": evaluated.state_dict(), "epoch": epoch + 1,
                                     "val_acc": record["val_acc"]}, best_path)
            _save_last(last_path, model, optimizer, scheduler, scaler, state, cfg, dataset.num_classes, aug_gen,
                       device, world, ema)

    if world.main:
        state.train_seconds += cache_seconds  # the feature pass is part of what training cost
        summary = _summarize(run_dir, cfg, dataset, evaluated, state, device, precision)
        summary.update(strategy=cfg.strategy, pretrained=cfg.pretrained, layer_groups=[g.record() for g in groups],
                       trainable_params=sum(_numel(model, g) for g in groups if g.unfreeze_epoch < cfg.epochs),
                       feature_cache_s=cache_seconds, processes=world.size)
        rundir.write_json(run_dir / rundir.SUMMARY, summary)
    distributed.barrier(world)  # the other ranks return once the run is complete
    return run_dir


def _steps_per_epoch(n: int, batch_size: int, world: World) -> int:
    """Global steps per epoch. Under torchrun a last batch too small to give every rank an image is dropped."""
    if world.distributed and 0 < n % batch_size < world.size:
        return n // batch_size
    return math.ceil(n / batch_size)


def _check_parallel(cfg: TrainConfig, world: World, device: torch.device) -> None:
    if cfg.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); drop it on the CPU")
    if not world.distributed:
        return
    distributed.check_batch_size(world, cfg.batch_size)
    if cfg.cache_features or resolved_strategy(cfg) == "gradual":
        raise UserError("--cache-features and --strategy gradual run in one process only; "
                        "launch them without torchrun")


def _whiten(model, dataset: Dataset) -> None:
    if not hasattr(model, "init_whitening"):
        raise UserError(f"--whiten initialises a fastnet_* stem; {model.__class__.__name__} has none, drop --whiten")
    if dataset.train.images is None:
        raise UserError("--whiten needs the training images in memory; use --data-mode memory")
    model.init_whitening(normalize(dataset.train.images[:5000], dataset.mean, dataset.std))


def _preprocessing(cfg: TrainConfig, spec) -> tuple[str, float]:
    """(normalisation, crop_pct): pretrained weights bring their own; otherwise the dataset's."""
    prep = spec.preprocessing if cfg.pretrained else None
    if prep is None:
        return cfg.normalize, 1.0
    if cfg.normalize != "auto":
        return cfg.normalize, prep.crop_pct
    name = normalization_named(prep.mean, prep.std)
    if name is None:
        raise UserError(f"{cfg.model}'s weights expect mean {prep.mean} and std {prep.std}, which imgcls does not "
                        f"know by name; pass --normalize with the closest of {', '.join(NORMALIZATIONS)}")
    return name, prep.crop_pct


def _describe(group: LayerGroup) -> str:
    later = f" from epoch {int(group.unfreeze_epoch) + 1}" if group.unfreeze_epoch > 0 else ""
    return f"{group.name} lr {group.lr:.3g}{later}"


def _numel(model, group: LayerGroup) -> int:
    params = dict(model.named_parameters())
    return sum(params[n].numel() for n in group.params)


@torch.inference_mode()
def head_logits(head, features: Split, device, precision: str) -> torch.Tensor:
    head.eval()
    with autocast(device, precision):
        return head(features.images.to(device)).float().cpu()


def _jsonl(record: dict) -> str:
    return json.dumps(record) + "\n"


def _summarize(run_dir: Path, cfg: TrainConfig, dataset: Dataset, model, state: TrainState,
               device, precision: str) -> dict:
    """Test accuracy (and ECE) of the checkpoint chosen on validation, accuracy of the final weights,
    and the cost of the model: forward GFLOPs per image and inference throughput."""
    metrics = rundir.read_metrics(run_dir)

    def predict(split):
        start = time.perf_counter()
        logits, labels = predict_logits(model, split, dataset.mean, dataset.std, device, precision,
                                        cfg.eval_batch_size)
        return logits, labels, len(labels) / (time.perf_counter() - start)

    test_final = test_best = test_ece = None
    if dataset.test is not None:
        final_logits, labels, _ = predict(dataset.test)
        if state.best_epoch != cfg.epochs:  # else the final weights are the val-selected ones
            model.load_state_dict(load_checkpoint(run_dir / rundir.BEST, cfg.model, dataset.num_classes)["model"])
        logits, labels, inference_ips = predict(dataset.test)
        test_final = (final_logits.argmax(1) == labels).float().mean().item()
        test_best = (logits.argmax(1) == labels).float().mean().item()
        test_ece = expected_calibration_error(logits.softmax(dim=1), labels)
    else:  # validation metrics are in metrics.jsonl already; time the model on (part of) val
        _, _, inference_ips = predict(dataset.val.subset(torch.arange(min(len(dataset.val), 512))))
    images = sum(m["epoch_time"] * m["images_per_s"] for m in metrics)
    return {
        "run": str(run_dir),
        "model": cfg.model,
        "data": dataset.name,
        "num_classes": dataset.num_classes,
        "params": count_parameters(model),
        "gflops": forward_gflops(model, dataset.img_size),
        "epochs": cfg.epochs,
        "best_epoch": state.best_epoch,
        "best_val_acc": state.best_val_acc,
        "final_val_acc": metrics[-1]["val_acc"],
        "test_acc": test_best,
        "test_acc_final": test_final,
        "test_ece": test_ece,
        "test_split": "test" if dataset.test is not None else None,
        "train_time_s": state.train_seconds,
        "train_images_per_s": images / max(state.train_seconds, 1e-9),
        "inference_images_per_s": inference_ips,
        "device": device.type,
        "precision": precision,
        "seed": cfg.seed,
        "versions": _versions(),
    }
