"""`fit`: train a new run, or continue one, in four steps.

1. build the training context (training/context.py): data, model, optimizer; everything that can
   fail on a bad option fails here, before any run folder exists;
2. open the run folder (rundir.RunFolder): create it, or reopen it for --resume; either way it is
   locked against a second writer, and a resumed run's data must still be the data it was trained on;
3. run the epochs (training/loop.py), checkpointing after each (training/checkpointer.py);
4. write summary.json (training/summary.py).

A run that fails before its first checkpoint is removed, so no folder is left that no command can
use; one killed outright (kill -9) before then is continued from scratch by --resume.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from imgcls import rundir
from imgcls.config import TrainConfig, config_record, load_config, validate
from imgcls.data import Dataset, Preprocessing, per_image_transform
from imgcls.data.audit import quick_audit
from imgcls.data.presets import PixelRecipe, TrainTransform
from imgcls.errors import UserError
from imgcls.evaluation.calibration import reliability_bins
from imgcls.evaluation.metrics import confusion_matrix
from imgcls.evaluation.significance import read_test_predictions
from imgcls.kernels.apply import inference_copy
from imgcls.models import count_parameters
from imgcls.training import distributed
from imgcls.training.checkpointer import Checkpointer, TrainState
from imgcls.training.context import TrainingContext, build_context
from imgcls.training.distributed import World
from imgcls.training.feature_cache import backbone_digest, cached_features
from imgcls.training.loop import Inputs, run_epochs
from imgcls.training.progress import Progress
from imgcls.training.stops import Diverged, Interrupted, StopOnSignal
from imgcls.training.summary import summarize
from imgcls.training.tensorboard import TensorBoardLog, check_installed
from imgcls.training.transfer import NEVER, FeatureTargets, LayerGroup, apply_schedule, cache_features

__all__ = ["Diverged", "Interrupted", "fit"]  # what callers of fit catch


def fit(cfg: TrainConfig | None = None, resume: str | Path | None = None, stop_after_steps: int | None = None, *,
        quiet: bool | None = None, allow_data_change: bool = False, dataset: Dataset | None = None,
        auto_resume: bool = False) -> Path:
    """Train a new run from `cfg`, or continue the run in `resume`. Returns the run folder.

    `auto_resume` (with `cfg`, whose `out` names the run): start cfg.out, or continue it when it was begun
    with the same options, by rundir.auto_resume_target's rule; a run found finished is returned as it is.

    `stop_after_steps` stops (as Ctrl-C would) once that many micro-batches have run in total (at the
    end of the accumulation window it falls in); used to time-box a job and by the resume tests.
    `quiet` overrides the saved setting on resume. Under torchrun every process calls this; they
    train one model together and rank 0 writes the run. `dataset`: a new run trains on these splits
    instead of loading cfg.data's (audit --labels trains its folds so).
    """
    if (cfg is None) == (resume is None) or (dataset is not None and resume is not None):
        raise ValueError("fit takes either a config (and optionally a dataset) or a run folder to resume")
    if auto_resume and (cfg is None or not cfg.out or dataset is not None):
        raise ValueError("auto_resume needs a config that names its run folder (out)")
    if resume is not None:
        cfg = load_config(rundir.require_run(resume) / rundir.CONFIG)
    validate(cfg)  # a resumed run's config too: it may have been edited by hand
    if quiet is not None:
        cfg = cfg.replace(quiet=quiet)
    options = json.loads(json.dumps(config_record(cfg)))  # as given, in plan.json's types; auto resume compares
    world, device_name = distributed.join(cfg.device)
    try:
        if auto_resume:
            resume = _auto_resume_target(cfg, options, world)
            if resume is not None and (resume / rundir.SUMMARY).exists():
                if world.main:  # also when quiet: a requeued job should say why it trained nothing
                    print(f"run {resume} already finished training with these options; nothing to do",
                          file=sys.stderr, flush=True)
                return resume
            if resume is not None:
                cfg = load_config(resume / rundir.CONFIG).replace(quiet=cfg.quiet)
                validate(cfg)
        with StopOnSignal(announce=world.main and not cfg.quiet) as stop:
            return _train(cfg, resume, world, device_name, stop, stop_after_steps, allow_data_change, dataset, options)
    finally:
        distributed.leave(world)


def _auto_resume_target(cfg: TrainConfig, options: dict, world: World) -> Path | None:
    """Rank 0 decides whether cfg.out is started or continued (one decision, before anyone writes), and every
    rank learns it, or its one-line refusal."""
    target, error = None, None
    if world.main:
        try:
            target = rundir.auto_resume_target(cfg.out, options)
        except UserError as e:
            error = str(e)
    target, error = distributed.from_main(world, (target, error))
    if error:
        raise UserError(error)
    return target


def _train(cfg: TrainConfig, resume, world: World, device_name: str, stop: StopOnSignal,
           stop_after_steps: int | None, allow_data_change: bool, dataset: Dataset | None, options: dict) -> Path:
    # Before the slow part, so the user learns at once; on every rank, so none goes on alone.
    if resume is None and cfg.out:
        rundir.refuse_existing(cfg.out)
        # a run inside the images it trains on would become a class folder, its report figures images
        rundir.refuse_run_file(cfg.out, within=rundir.folders(cfg.data, cfg.data_dir))
    if cfg.tensorboard:
        check_installed()
    distributed.barrier(world)  # every rank has checked before rank 0 can create the folder
    has_last = resume is not None and (Path(resume) / rundir.LAST).exists()
    kept = rundir.run_exclusions(resume, cfg) if resume is not None else None  # the list as the run began
    ctx = build_context(cfg, world, device_name, fresh=not has_last, dataset=dataset, exclude=kept)  # the plan
    ctx.plan["options"] = options  # a new run records what was asked, beside what the plan made of it
    if world.main and resume is None and dataset is None:
        for line in quick_audit(ctx.dataset):  # same images in two splits, strong imbalance: one line each
            print(f"warning: {line}", file=sys.stderr, flush=True)
    folder = _open_folder(ctx, resume, allow_data_change)
    run = folder.path if folder is not None else Path(ctx.cfg.out)
    state, aug_gen, tb = TrainState(), torch.Generator(), None
    try:
        if has_last:
            state = Checkpointer(run, ctx).restore(aug_gen, allow_data_change)
        if resume is not None and world.main:  # epochs logged after the last checkpoint are redone
            rundir.keep_metrics(run, state.epoch)
        tb = _tensorboard(ctx, run, state) if cfg.tensorboard and world.main else None
        cache_seconds = _train_epochs(ctx, run, state, aug_gen, stop, stop_after_steps, tb)
        if world.main:
            summary = summarize(ctx, run, state, cache_seconds)
            plan = rundir.read_plan(run)  # how the plan was made, also for a resumed run
            summary["kernels"] = plan and {k: v for k, v in plan.items() if k != "options"}  # config.yaml has them
            summary["metrics_sha256"] = rundir.file_digest(run / rundir.METRICS)  # the epochs it summarises
            rundir.write_sealed_json(run / rundir.SUMMARY, summary)  # the card, report and compare read it
            if tb is not None:
                _finish_tensorboard(tb, ctx, run, summary)
            folder.finish()
        distributed.barrier(world)  # the other ranks return once the run is complete
        return run
    except BaseException:
        # A new run that failed before its first checkpoint holds nothing worth keeping: leave no
        # half-made folder behind. A folder this call did not create is never removed.
        if folder is not None and resume is None and not state.saved:
            folder.remove()
        raise
    finally:
        if tb is not None:
            tb.close()
        if folder is not None:
            folder.release()


def _tensorboard(ctx: TrainingContext, run: Path, state: TrainState) -> TensorBoardLog:
    """The run's event files; a resumed run hides what the interrupted process logged after its checkpoint."""
    done = state.epoch * ctx.optimizer_steps_per_epoch + state.meter.optimizer_steps
    return TensorBoardLog(run, ctx.cfg.to_dict(), purge_step=done + 1 if done else None)


def _finish_tensorboard(tb: TensorBoardLog, ctx: TrainingContext, run: Path, summary: dict) -> None:
    """The confusion matrix and reliability diagram of the val-selected weights on test, and the hparams."""
    confusion = bins = None
    saved = read_test_predictions(run)  # written by summarize
    if saved is not None:
        labels, probs = (torch.from_numpy(a) for a in saved)
        confusion = confusion_matrix(probs.argmax(1), labels, ctx.dataset.num_classes).tolist()
        bins = reliability_bins(probs, labels)
    tb.finish(summary, confusion, bins, classes=ctx.dataset.classes)


def _open_folder(ctx: TrainingContext, resume, allow_data_change: bool) -> rundir.RunFolder | None:
    """Rank 0 creates (or reopens and checks) the run folder and records the config and the data; every
    rank learns the folder's path, or rank 0's one-line refusal."""
    folder, error = None, None
    if ctx.world.main:
        try:
            folder = _create_or_reopen(ctx, resume, allow_data_change)
        except UserError as e:
            error = str(e)
    path, error = distributed.from_main(ctx.world, (folder.path if folder else None, error))
    if error:
        raise UserError(error)
    ctx.cfg = ctx.cfg.replace(out=str(path))
    return folder


def _create_or_reopen(ctx: TrainingContext, resume, allow_data_change: bool) -> rundir.RunFolder:
    cfg, dataset = ctx.cfg, ctx.dataset
    folder = rundir.RunFolder.reopen(resume) if resume is not None else rundir.RunFolder.create(cfg.out, cfg.data,
                                                                                                cfg.model)
    try:
        if resume is not None:
            folder.check_data(dataset.fingerprint, allow_data_change)
        else:
            written = cfg.replace(out=str(folder.path.resolve()), quiet=False)
            rundir.atomic_write_bytes(folder.path / rundir.CONFIG,
                                      yaml.safe_dump(written.to_dict(), sort_keys=False).encode())
            rundir.write_json(folder.path / rundir.PLAN, ctx.plan)
            if dataset.excluded is not None:
                rundir.write_sealed_json(folder.path / rundir.EXCLUDED, {"names": list(dataset.excluded)})
        if resume is None or not (folder.path / rundir.DATASET).exists():
            rundir.write_json(folder.path / rundir.DATASET, {
                "name": dataset.name, "classes": dataset.classes, "img_size": dataset.img_size,
                "mean": dataset.mean, "std": dataset.std, "crop_pct": dataset.crop_pct,
                "fingerprint": dataset.fingerprint,
            })
    except BaseException:
        folder.remove() if resume is None else folder.release()
        raise
    return folder


def _train_epochs(ctx: TrainingContext, run: Path, state: TrainState, aug_gen: torch.Generator,
                  stop: StopOnSignal, stop_after_steps: int | None, tb: TensorBoardLog | None) -> float:
    """Run the epochs left; returns the seconds spent caching features (part of the training cost)."""
    cfg, world = ctx.cfg, ctx.world
    loud = not cfg.quiet and world.main
    if loud:
        _announce(ctx, run)  # before anything slow: caching features can take minutes
    inputs = prepare_inputs(ctx, state, say=print if loud else None)
    local_batch = cfg.batch_size // world.size
    progress = Progress(cfg.epochs, ctx.steps_per_epoch, local_batch, quiet=cfg.quiet or not world.main)
    with progress:
        run_epochs(ctx, inputs, state, Checkpointer(run, ctx), run, progress, stop, aug_gen, stop_after_steps, tb)
    return inputs.cache_seconds


def prepare_inputs(ctx: TrainingContext, state: TrainState, say=None) -> Inputs:
    """The trained module, the splits and the batch transform; with --cache-features, the frozen
    backbone's features replace the images and the head alone trains (`say`: where to tell of them)."""
    cfg, dataset, world = ctx.cfg, ctx.dataset, ctx.world
    cache_seconds = 0.0
    if cfg.cache_features:
        start = time.perf_counter()
        apply_schedule(ctx.model, ctx.groups, 0)
        prep = Preprocessing(dataset.img_size, dataset.mean, dataset.std, dataset.crop_pct)
        key = {"model": cfg.model, "weights": backbone_digest(ctx.model), "data": dataset.fingerprint,
               "preprocessing": prep.as_dict(), "precision": cfg.eval_precision, "attention": cfg.eval_attention,
               "depthwise": cfg.eval_depthwise_precision, "device": ctx.device.type, "torch": torch.__version__}
        train, val = (None if split is None else _features(ctx, split, name, prep, {**key, "split": name}, say)
                      for name, split in (("train", dataset.train), ("val", dataset.val)))
        cache_seconds = time.perf_counter() - start
        trainee, transform = ctx.model.get_classifier(), FeatureTargets(dataset.num_classes, cfg.label_smoothing)
    else:
        trainee, train, val = ctx.model, dataset.train, dataset.val
        streamed = train.stream is not None
        if streamed and cfg.alt_flip:
            raise UserError("--alt-flip flips whole in-memory epochs; these images are streamed from disk: add "
                            "--data-mode memory or drop --alt-flip")
        recipe = PixelRecipe.of(cfg)
        if streamed:  # pixel augmentation runs per image in the DataLoader workers
            train.stream.transform = per_image_transform(recipe, dataset.img_size)
        transform = TrainTransform(recipe, dataset.img_size, dataset.mean, dataset.std, dataset.num_classes,
                                   cfg.random_erasing, cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.mix_switch_prob,
                                   cfg.label_smoothing, pixels_done=streamed, random_flip=not cfg.alt_flip)
    if world.distributed:
        apply_schedule(ctx.model, ctx.groups, state.epoch)  # DDP must see which parameters train (fixed from here)
        trainee = DistributedDataParallel(trainee)
    if cfg.compile == "on":  # the plan's value: --compile auto was timed by imgcls.kernels
        trainee = torch.compile(trainee)
    return Inputs(trainee, train, _val_share(val, world), transform, cfg.cache_features, cache_seconds)


def _features(ctx: TrainingContext, split, name: str, prep: Preprocessing, parts: dict, say) -> object:
    """The frozen backbone's features of one split: from the feature cache when an earlier run computed
    them with the same key `parts` (weights, data, split, preprocessing, kernels), else computed now (and
    kept for the next run)."""
    cfg = ctx.cfg

    def compute():
        if say:
            say(f"features: computing the frozen backbone's features of the {len(split)} {name} images")
        backbone = inference_copy(ctx.model, cfg.eval_attention, cfg.eval_depthwise_precision)  # the frozen weights
        return cache_features(backbone, split, prep, ctx.device, cfg.eval_precision, cfg.eval_batch_size,
                              f"features: {name}", progress=say is not None)

    start = time.perf_counter()
    features, reused = cached_features(split, parts, compute)
    if say:
        say(f"features: reused the {len(split)} {name} feature vectors of an earlier run ({reused})" if reused else
            f"features: {len(split)} {name} feature vectors in {time.perf_counter() - start:.1f} s (kept for reuse)")
    return features


def _val_share(val, world: World):
    """Under torchrun each rank scores its strided share of the validation split (None: there is none)."""
    if val is None or not world.distributed:
        return val
    if len(val) < world.size:
        raise UserError(f"{len(val)} validation images cannot be shared by {world.size} processes; "
                        "raise --val-fraction or use fewer processes")
    return val.subset(torch.arange(world.rank, len(val), world.size))


def _announce(ctx: TrainingContext, run: Path) -> None:
    """The run's one-paragraph header, printed once Ctrl-C is handled (a caller may interrupt from here on)."""
    cfg, dataset, world = ctx.cfg, ctx.dataset, ctx.world
    where = (f"{ctx.device.type} {ctx.precision}" + (f", {world.size} processes" if world.distributed else "")
             + (f" on {world.nodes} nodes" if world.nodes > 1 else ""))
    print(f"run {run}: {cfg.model} ({count_parameters(ctx.model) / 1e6:.2f}M params) on {dataset.name} "
          f"{dataset.img_size}px, train/val/test {len(dataset.train)}/{len(dataset.val) if dataset.val else 0}/"
          f"{len(dataset.test) if dataset.test else 0}, {where}"
          + (f", batch {cfg.batch_size} x {cfg.accum_steps} accumulated = {cfg.batch_size * cfg.accum_steps}"
             if cfg.accum_steps > 1 else ""), flush=True)
    if ctx.loaded is not None:
        print(ctx.loaded, flush=True)
    if cfg.strategy != "scratch":
        trained = ", ".join(_describe(g) for g in ctx.groups if g.unfreeze_epoch != NEVER)
        frozen = ", ".join(g.name for g in ctx.groups if g.unfreeze_epoch == NEVER)
        print(f"{cfg.strategy}: {trained}" + (f"; frozen: {frozen}" if frozen else ""), flush=True)
    if ctx.kernels is not None:
        print(ctx.kernels.describe(), flush=True)


def _describe(group: LayerGroup) -> str:
    later = f" from epoch {int(group.unfreeze_epoch) + 1}" if group.unfreeze_epoch > 0 else ""
    return f"{group.name} lr {group.lr:.3g}{later}"
