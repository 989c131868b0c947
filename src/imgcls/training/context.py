"""Everything a run trains with, built once from its config: device, data, model, optimizer, EMA.

`build_context` does the slow and fallible work (loading data, building the model, a trial forward
pass) before any run folder exists, so a bad option fails without leaving anything behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from imgcls.config import (
    KERNEL_FIELDS,
    MONITORS,
    Facts,
    TrainConfig,
    check_crop_padding,
    check_task,
    require_no_validation,
    resolve,
    resolved_strategy,
    unresolved,
)
from imgcls.data import Dataset, load_dataset, normalize, shards
from imgcls.data.exclusions import excluded_names
from imgcls.errors import UserError
from imgcls.inference.engine import Engine
from imgcls.kernels import cache
from imgcls.kernels.apply import configure
from imgcls.kernels.choice import NONE, KernelChoice
from imgcls.kernels.measure import choose_kernels
from imgcls.models import create_model, model_spec
from imgcls.models.contract import whitening
from imgcls.models.init import dirac_init
from imgcls.models.registry import pretrained_preprocessing
from imgcls.models.weights import LoadReport, load_pretrained
from imgcls.runtime import check_precision, resolve_device, seed_everything
from imgcls.training import distributed
from imgcls.training.distributed import World
from imgcls.training.feeders import prefetch_default
from imgcls.training.imbalance import Loss, class_weights, make_loss, positive_weights
from imgcls.training.lookahead import Lookahead
from imgcls.training.transfer import LayerGroup, optimizer_param_groups, plan_groups
from imgcls.training.validation import engine_for

# The KernelChoice field each plan field takes its value from.
KERNEL_SOURCES = {"precision": "precision_train", "eval_precision": "precision_eval",
                  "attention": "attention_train", "eval_attention": "attention_eval",
                  "depthwise_precision": "depthwise_train", "eval_depthwise_precision": "depthwise_eval",
                  "memory_format": "memory_format", "compile": "compile", "eval_batch_size": "eval_batch_size"}


@dataclass
class TrainingContext:
    cfg: TrainConfig  # the run plan: every value resolved (config.resolve)
    world: World
    device: torch.device
    precision: str
    dataset: Dataset
    model: torch.nn.Module  # the bare model (never wrapped in DDP or compile)
    groups: list[LayerGroup]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    steps_per_epoch: int  # micro-batches of --batch-size per epoch
    loaded: LoadReport | None  # what --pretrained loaded (new runs only)
    loss: Loss  # cross-entropy or focal, with the class weights
    class_weights: torch.Tensor | None
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau | None  # --schedule plateau, stepped once per epoch
    lookahead: Lookahead | None = None  # --lookahead
    kernels: KernelChoice | None = None  # the measured (or given) kernels the plan took its values from
    validator: Engine | None = None  # scores the evaluated weights for validation (training/validation.py)
    plan: dict | None = None  # plan.json: the machine, which values were measured, their timings

    @property
    def evaluated(self) -> torch.nn.Module:
        """What validation, best.pt, last.pt's weights and the summary see: the average when EMA is on."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def optimizer_steps_per_epoch(self) -> int:
        return optimizer_steps(self.steps_per_epoch, self.cfg.accum_steps)

    @property
    def warmup_steps(self) -> int:
        return warmup_steps(self.cfg, self.optimizer_steps_per_epoch)

    @property
    def rank_seed(self) -> int:
        """Each rank's own random streams; rank 0's are a single process's."""
        return self.cfg.seed + 1_000_003 * self.world.rank


def load_training_data(cfg: TrainConfig, exclude: list[str] | None = None, download: bool = True) -> Dataset:
    """cfg.data as training loads it: at the model's size (shards: their own) and with its pretrained weights'
    crop and normalisation; `exclude` instead of the names cfg.exclude's file lists now."""
    spec = model_spec(cfg.model)
    normalization, crop_pct = pretrained_preprocessing(cfg, spec)
    # shards hold images at the size they were written at, which is then the default
    size = cfg.img_size or (None if shards.is_shards(cfg.data) else spec.img_size)
    return load_dataset(cfg.data, cfg.data_dir, size, cfg.val_fraction, cfg.split_seed, cfg.data_mode, cfg.workers,
                        download=download, normalize=normalization, crop_pct=crop_pct,
                        exclude=exclude if exclude is not None else excluded_names(cfg), task=cfg.task)


def build_context(cfg: TrainConfig, world: World, device_name: str, fresh: bool,
                  dataset: Dataset | None = None, exclude: list[str] | None = None) -> TrainingContext:
    """The context of a new run (`fresh`: pretrained weights and whitening applied) or of a resumed one
    (its weights come from last.pt afterwards). Resolves the run plan: `ctx.cfg` holds every value.
    `dataset`: train on these splits instead of loading cfg.data's (the folds of audit --labels); `exclude`:
    the names to leave out instead of those cfg.exclude's file lists now (a resumed run's own copy)."""
    device = resolve_device(device_name)
    check_precision(cfg.precision, device)
    check_precision(cfg.eval_precision, device)
    _check_parallel(cfg, world, device)
    spec = model_spec(cfg.model)  # fail fast on an unknown name, before loading data
    dataset = dataset or load_training_data(cfg, exclude)
    if dataset.train.shards is not None and not cfg.cache_features:  # before any measuring
        check_shard_options(cfg)
    check_task(cfg, dataset.task)
    if dataset.val is None:  # --val-fraction 0 on a folder without val/: nothing to validate on
        require_no_validation(cfg)
    check_crop_padding(cfg.crop_padding, dataset.img_size)
    if dataset.multilabel:  # before the kernels are measured: a weights file is refused at once
        weights = positive_weights(dataset.train.labels) if cfg.pos_weight == "auto" else None
    else:
        weights = class_weights(cfg.class_weights, dataset.train.labels, dataset.classes)
    model, loaded = _build_model(cfg, spec, dataset, world, device, fresh)
    kernels = choose_run_kernels(cfg, model, dataset, world, device)
    if kernels.precision_train == NONE:  # cached features: a linear head trains, in fp32 unless told otherwise
        kernels.precision_train = "fp32" if cfg.precision == "auto" else cfg.precision
    precision = kernels.precision_train
    cfg = resolve(cfg, Facts(device.type, precision, kernels.precision_eval, dataset.img_size, dataset.normalization,
                             "memory" if dataset.train.images is not None else "stream",
                             prefetch_default(device.type) if cfg.prefetch == "auto" else cfg.prefetch,
                             default_monitor(dataset) if cfg.monitor == "auto" else cfg.monitor,
                             {f: getattr(kernels, KERNEL_SOURCES[f]) for f in KERNEL_FIELDS}, dataset.task))
    if unresolved(cfg):  # a field added to the schema with an "auto" that resolve() does not decide
        raise RuntimeError(f"the run plan left {', '.join(unresolved(cfg))} undecided")
    configure(model, cfg.attention, cfg.depthwise_precision, cfg.memory_format)
    groups = plan_groups(model, cfg)
    if dataset.train.shards is not None and not cfg.cache_features:
        steps_per_epoch = shards.steps_per_epoch(dataset.train.shards, cfg.batch_size // world.size, world.size)
    else:
        steps_per_epoch = steps_in_epoch(len(dataset.train), cfg.batch_size, world)
    per_epoch = optimizer_steps(steps_per_epoch, cfg.accum_steps)
    optimizer, scheduler = build_optimizer(model, cfg, per_epoch, groups)
    plateau = None
    if cfg.schedule == "plateau":
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, MONITORS[cfg.monitor], cfg.plateau_factor,
                                                             cfg.plateau_patience, threshold=cfg.min_delta,
                                                             threshold_mode="abs")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 needs loss scaling
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True) if cfg.ema else None
    lookahead = Lookahead(model, cfg.epochs * per_epoch) if cfg.lookahead else None
    ctx = TrainingContext(cfg, world, device, precision, dataset, model, groups, optimizer, scheduler, scaler, ema,
                          steps_per_epoch, loaded, make_loss(cfg, weights), weights, plateau, lookahead, kernels)
    ctx.validator = engine_for(ctx.evaluated, cfg, dataset, device)
    ctx.plan = plan_record(kernels, device)
    return ctx


def choose_run_kernels(cfg: TrainConfig, model, dataset: Dataset, world: World, device: torch.device) -> KernelChoice:
    """The kernels for the run (imgcls.kernels: measured for each `auto`, cached per machine; a resolved
    config's values are taken as given, so a resumed run keeps its plan). Under torchrun rank 0 measures
    and every rank takes its choice."""
    choice = None
    if world.main:
        evaluated = max(len(s) for s in (dataset.val, dataset.test, dataset.train) if s is not None)
        choice = choose_kernels(
            model, (cfg.batch_size // world.size, 3, dataset.img_size, dataset.img_size), device, cfg.precision,
            precision_eval=cfg.eval_precision, attention=cfg.attention, attention_eval=cfg.eval_attention,
            depthwise=cfg.depthwise_precision,
            depthwise_eval=cfg.eval_depthwise_precision, memory_format=cfg.memory_format, compile=cfg.compile,
            eval_batch_size=cfg.eval_batch_size, data_size=evaluated, name=cfg.model,
            train=not cfg.cache_features)  # on cached features only the head trains: no attention, no compile
    return distributed.from_main(world, choice)


def plan_record(kernels: KernelChoice, device: torch.device) -> dict:
    """plan.json: the machine the plan was made on, which of its values were measured (or read from that
    machine's cache), and the timings measured now."""
    measured = [f for f, k in KERNEL_SOURCES.items() if kernels.source.get(k) in ("measured", "cache")]
    return {"machine": cache.machine(device), "measured": measured, "sources": dict(kernels.source),
            "timings": {f: kernels.timings[k] for f, k in KERNEL_SOURCES.items() if k in kernels.timings}}


IMBALANCED = 1.5  # largest over smallest training class from which --monitor auto chooses balanced accuracy


def default_monitor(dataset: Dataset) -> str:
    """--monitor auto: balanced accuracy when the training classes are imbalanced, where plain accuracy can
    barely move (a small class is a few images of the val split) and would keep an early epoch; else val_acc."""
    if dataset.multilabel:
        return "map"
    counts = torch.bincount(dataset.train.labels, minlength=dataset.num_classes).double()
    return "balanced_acc" if counts.min() == 0 or counts.max() / counts.min() >= IMBALANCED else "val_acc"


def optimizer_steps(micro_batches: int, accum_steps: int) -> int:
    """Optimizer steps in an epoch of `micro_batches`: one per window of `accum_steps` (the last may be short)."""
    return math.ceil(micro_batches / accum_steps)


def warmup_steps(cfg: TrainConfig, optimizer_steps_per_epoch: int) -> int:
    """--warmup-epochs in optimizer steps, at most half the run, so the schedule always leaves the warm-up
    (and a cosine reaches 0 at --epochs)."""
    return min(cfg.epochs * optimizer_steps_per_epoch // 2, round(cfg.warmup_epochs * optimizer_steps_per_epoch))


def _build_model(cfg: TrainConfig, spec, dataset: Dataset, world: World, device: torch.device, fresh: bool):
    seed_everything(cfg.seed)
    model = create_model(cfg.model, dataset.num_classes, head=cfg.head)
    loaded = load_pretrained(model, spec, cfg.pretrained) if cfg.pretrained and fresh else None
    if cfg.init == "dirac" and fresh and dirac_init(model) == 0:
        raise UserError(f"--init dirac starts stride-1 convolutions as the identity; {cfg.model} has none, "
                        "drop --init")
    if cfg.whiten and fresh:
        _whiten(model, dataset)
    _check_forward(model, cfg.model, dataset.img_size)
    if world.rank > 0:  # the same initial weights, but each rank its own dropout and drop-path masks
        torch.manual_seed(cfg.seed + 1_000_003 * world.rank)
    if cfg.sync_bn and world.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device), loaded  # laid out by the kernel choice (build_context)


def _check_forward(model: torch.nn.Module, name: str, img_size: int) -> None:
    """One image through the model in eval mode (no random numbers drawn), so a model that cannot take
    this input size fails now, in one line, not after the run folder exists."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size))
    except (RuntimeError, ValueError, AssertionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{name} cannot take {img_size}x{img_size} inputs ({first}); "
                        f"choose another --img-size, e.g. the model's native size (imgcls models)") from None
    finally:
        model.train(was_training)


def warmup_factor(step: int, warmup_steps: int, start: float = 0.0) -> float:
    """Linear warm-up to 1. From 0 it reaches 1/warmup at the first step; from `start` > 0 it begins there
    exactly (airbench's warm-up from 0.2)."""
    if start == 0.0:
        return (step + 1) / warmup_steps
    return start + (1.0 - start) * step / warmup_steps


def warmup_cosine(total_steps: int, warmup_steps: int, start: float = 0.0):
    """LR factor per step: linear warm-up to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_factor(step, warmup_steps, start)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def warmup_linear(total_steps: int, warmup_steps: int, start: float = 0.0, end: float = 0.0):
    """LR factor per step: linear warm-up to 1, then linear decay to `end` at the last step (airbench94:
    from 0.2 over 23% of the steps, down to 0.07)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return warmup_factor(step, warmup_steps, start)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return (1.0 - progress) + end * progress

    return factor


def warmup_constant(warmup_steps: int, start: float = 0.0):
    """LR factor per step: linear warm-up to 1, then 1 (ReduceLROnPlateau cuts the rates from there)."""
    return lambda step: warmup_factor(step, warmup_steps, start) if step < warmup_steps else 1.0


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, steps_per_epoch: int, groups: list[LayerGroup]):
    """AdamW or Nesterov SGD over every layer group at its own rate (frozen ones join when they get
    gradients), with one warm-up + cosine (or linear) factor scaling all rates alike (warm-up only, then 1,
    under --schedule plateau). `steps_per_epoch` counts optimizer steps. Fused kernels on CPU and CUDA: one
    pass over all parameters instead of one per tensor."""
    param_groups = optimizer_param_groups(model, groups, cfg.weight_decay, cfg.bn_bias_lr_scale, cfg.decay_all)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                    fused=fused)
    else:
        optimizer = torch.optim.AdamW(param_groups, lr=cfg.lr, fused=fused)
    total, warmup = cfg.epochs * steps_per_epoch, warmup_steps(cfg, steps_per_epoch)
    start = cfg.warmup_start_factor
    factor = {"cosine": lambda: warmup_cosine(total, warmup, start),
              "linear": lambda: warmup_linear(total, warmup, start, cfg.final_lr_factor),
              "plateau": lambda: warmup_constant(warmup, start)}[cfg.schedule]()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return optimizer, scheduler


def check_shard_options(cfg: TrainConfig) -> None:
    """The options shards cannot honour: holding the images in memory, and picking training images by index
    (shards are read in their own order)."""
    if cfg.data_mode == "memory":
        raise UserError("--data-mode memory holds images decoded in memory; shards are streamed a shard at a time: "
                        "drop --data-mode, or train on the image folder")
    given = [f for f, on in (("--sampler", cfg.sampler != "uniform"), ("--alt-flip", cfg.alt_flip)) if on]
    if given:
        raise UserError(f"{' and '.join(given)} choose{'s' * (len(given) == 1)} training images by index; shards "
                        "are read a shard at a time in a shuffled order: drop it, or train on the image folder")


def steps_in_epoch(n: int, batch_size: int, world: World) -> int:
    """Global steps per epoch. Under torchrun a last batch too small to give every rank an image is dropped."""
    if world.distributed and 0 < n % batch_size < world.size:
        return n // batch_size
    return math.ceil(n / batch_size)


def _check_parallel(cfg: TrainConfig, world: World, device: torch.device) -> None:
    if cfg.sync_bn and device.type != "cuda":
        raise UserError("--sync-bn needs CUDA (torch's SyncBatchNorm has no CPU kernel); drop it on the CPU")
    if not world.distributed:
        return
    if cfg.whiten_bias_epochs is not None:
        raise UserError("--whiten-bias-epochs changes which parameters train mid-run, which DistributedDataParallel "
                        "cannot follow; run it in one process")
    distributed.check_batch_size(world, cfg.batch_size)
    if cfg.cache_features or resolved_strategy(cfg) == "gradual":
        raise UserError("--cache-features and --strategy gradual run in one process only; "
                        "launch them without torchrun")


def _whiten(model, dataset: Dataset) -> None:
    stem = whitening(model)
    if stem is None:
        raise UserError(f"--whiten initialises a fastnet_* stem; {model.__class__.__name__} has none, drop --whiten")
    if dataset.train.images is None:
        raise UserError("--whiten needs the training images in memory; use --data-mode memory")
    stem.init(normalize(dataset.train.images[:5000], dataset.mean, dataset.std))


