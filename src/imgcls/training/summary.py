"""summary.json: what a finished run scored on test and what the model costs."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import timm
import torch
import torchvision

import imgcls
from imgcls import rundir
from imgcls.evaluation.calibration import expected_calibration_error
from imgcls.evaluation.metrics import balanced_accuracy, confusion_matrix, per_class_report
from imgcls.evaluation.multilabel import DEFAULT_THRESHOLD, best_f1_thresholds, multilabel_metrics
from imgcls.evaluation.significance import write_test_predictions
from imgcls.models import count_parameters
from imgcls.models.checkpoint import load_checkpoint
from imgcls.models.flops import forward_gflops
from imgcls.training.checkpointer import TrainState
from imgcls.training.context import TrainingContext

MULTILABEL_KEYS = ("task", "thresholds", "test_map", "test_micro_f1", "test_hamming_loss", "test_per_class_ap")


def versions() -> dict:
    return {
        "imgcls": imgcls.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def _test_scores(ctx: TrainingContext, run: Path, state: TrainState, predict) -> dict:
    """Test accuracy of the final weights and of the val-selected ones (with its ECE), and the
    inference speed; without a test split, only the speed, measured on (part of) val (train when there
    is no val either)."""
    cfg, dataset, model = ctx.cfg, ctx.dataset, ctx.evaluated
    if dataset.multilabel:
        return _multilabel_test_scores(ctx, run, state, predict)
    if dataset.test is None:
        timed = dataset.val if dataset.val is not None else dataset.train
        _, _, ips = predict(timed.subset(torch.arange(min(len(timed), 512))))
        return {"test_acc": None, "test_balanced_acc": None, "test_macro_f1": None, "test_acc_final": None,
                "test_ece": None, "inference_images_per_s": ips}
    final_logits, labels, _ = predict(dataset.test)
    if state.best_epoch != state.epoch:  # else the final weights are the val-selected ones
        model.load_state_dict(load_checkpoint(run / rundir.BEST, cfg.model, dataset.num_classes)["model"])
    logits, labels, ips = predict(dataset.test)
    write_test_predictions(run, labels.numpy(), logits.softmax(dim=1).numpy())  # for paired comparisons
    cm = confusion_matrix(logits.argmax(1), labels, dataset.num_classes)
    report = per_class_report(cm, dataset.classes)
    return {"test_acc": (logits.argmax(1) == labels).float().mean().item(),
            "test_balanced_acc": balanced_accuracy(cm),
            "test_macro_f1": sum(r["f1"] for r in report) / len(report),
            "test_acc_final": (final_logits.argmax(1) == labels).float().mean().item(),
            "test_ece": expected_calibration_error(logits.softmax(dim=1), labels),
            "inference_images_per_s": ips}


def _multilabel_test_scores(ctx: TrainingContext, run: Path, state: TrainState, predict) -> dict:
    """A multi-label run's test scores at per-class thresholds tuned on val (each class's best F1 there; 0.5
    without val), which predict and the export apply; test_acc is subset accuracy (every label right)."""
    cfg, dataset, model = ctx.cfg, ctx.dataset, ctx.evaluated
    final = predict(dataset.test)[0] if dataset.test is not None else None
    if state.best_epoch != state.epoch:
        model.load_state_dict(load_checkpoint(run / rundir.BEST, cfg.model, dataset.num_classes)["model"])
    thresholds = torch.full((dataset.num_classes,), DEFAULT_THRESHOLD, dtype=torch.float64)
    if dataset.val is not None:
        val_logits, val_targets, _ = predict(dataset.val)
        thresholds = best_f1_thresholds(val_logits.sigmoid(), val_targets.float())
    out = {"task": "multilabel", "thresholds": thresholds.tolist(), "test_balanced_acc": None, "test_ece": None}
    if dataset.test is None:
        timed = dataset.val if dataset.val is not None else dataset.train
        _, _, ips = predict(timed.subset(torch.arange(min(len(timed), 512))))
        return {**out, "test_acc": None, "test_macro_f1": None, "test_acc_final": None, "test_map": None,
                "inference_images_per_s": ips}
    logits, targets, ips = predict(dataset.test)
    write_test_predictions(run, targets.numpy(), logits.sigmoid().numpy())  # for paired comparisons
    found = multilabel_metrics(logits.sigmoid(), targets.float(), dataset.classes, thresholds)
    final_found = multilabel_metrics(final.sigmoid(), targets.float(), dataset.classes, thresholds)
    return {**out, "test_acc": found["subset_accuracy"], "test_macro_f1": found["macro_f1"],
            "test_acc_final": final_found["subset_accuracy"], "test_map": found["map"],
            "test_micro_f1": found["micro_f1"], "test_hamming_loss": found["hamming_loss"],
            "test_per_class_ap": {r["class"]: r["ap"] for r in found["per_class"]}, "inference_images_per_s": ips}


def _selection(cfg, dataset) -> str:
    """How best.pt was chosen."""
    if dataset.val is None:
        return "final epoch (no validation split: --val-fraction 0)"
    return f"best {cfg.monitor} on the validation split"


def _why_it_ended(cfg, state: TrainState) -> str:
    if state.stopped_early:
        return (f"early stop after epoch {state.epoch}: {cfg.monitor} did not improve by more than {cfg.min_delta:g} "
                f"for {cfg.patience} epochs")
    return f"all {cfg.epochs} epochs done"


def summarize(ctx: TrainingContext, run: Path, state: TrainState, cache_seconds: float) -> dict:
    """The summary of a finished run. Loads best.pt into the evaluated model to score it."""
    cfg, dataset, model = ctx.cfg, ctx.dataset, ctx.evaluated
    metrics = rundir.read_metrics(run)

    def predict(split):  # the validation engine: it sees the evaluated weights, best.pt's once loaded
        start = time.perf_counter()
        scores, labels = ctx.validator.score_split(split, where="the test split")
        return scores.logits, labels, len(labels) / (time.perf_counter() - start)

    scores = _test_scores(ctx, run, state, predict)
    train_seconds = state.train_seconds + cache_seconds  # the feature pass is part of what training cost
    images = sum(m["epoch_time"] * m["images_per_s"] for m in metrics)
    params = dict(ctx.model.named_parameters())
    return {
        "run": str(run),
        "model": cfg.model,
        "data": dataset.name,
        "num_classes": dataset.num_classes,
        "params": count_parameters(model),
        "gflops": forward_gflops(model, dataset.img_size),
        "epochs": cfg.epochs,
        "epochs_run": state.epoch,
        "ended": _why_it_ended(cfg, state),
        "monitor": cfg.monitor if dataset.val is not None else None,  # None: no validation split
        "selection": _selection(cfg, dataset),
        "best_score": state.best_score,
        "best_epoch": state.best_epoch,
        "val_split": dataset.val is not None,
        "best_val_acc": next((m.get("val_acc") for m in metrics if m["epoch"] == state.best_epoch), None),
        "effective_batch_size": cfg.batch_size * cfg.accum_steps,
        "class_weights": ctx.class_weights.tolist() if ctx.class_weights is not None else None,
        "final_val_acc": metrics[-1].get("val_acc") if metrics else None,
        "test_acc": scores["test_acc"],
        "test_balanced_acc": scores["test_balanced_acc"],
        "test_macro_f1": scores["test_macro_f1"],
        "test_acc_final": scores["test_acc_final"],
        "test_ece": scores["test_ece"],
        "test_split": "test" if dataset.test is not None else None,
        "train_time_s": train_seconds,
        "train_images_per_s": images / max(train_seconds, 1e-9),
        "inference_images_per_s": scores["inference_images_per_s"],
        "device": ctx.device.type,
        "precision": ctx.precision,
        "seed": cfg.seed,
        "versions": versions(),
        "strategy": cfg.strategy,
        "pretrained": cfg.pretrained,
        "layer_groups": [g.record() for g in ctx.groups],
        "trainable_params": sum(params[n].numel() for g in ctx.groups if g.unfreeze_epoch < cfg.epochs
                                for n in g.params),
        "feature_cache_s": cache_seconds,
        "processes": ctx.world.size,
        "nodes": ctx.world.nodes,
        "restarts": ctx.world.restarts,  # torchrun's worker restarts before the attempt that finished
        **{k: scores[k] for k in MULTILABEL_KEYS if k in scores},
    }

