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
from imgcls.evaluation.predict import predict_logits
from imgcls.models import count_parameters
from imgcls.models.checkpoint import load_checkpoint
from imgcls.models.flops import forward_gflops
from imgcls.training.checkpointer import TrainState
from imgcls.training.context import TrainingContext


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
    inference speed; without a test split, only the speed, measured on (part of) val."""
    cfg, dataset, model = ctx.cfg, ctx.dataset, ctx.evaluated
    if dataset.test is None:
        _, _, ips = predict(dataset.val.subset(torch.arange(min(len(dataset.val), 512))))
        return {"test_acc": None, "test_acc_final": None, "test_ece": None, "inference_images_per_s": ips}
    final_logits, labels, _ = predict(dataset.test)
    if state.best_epoch != cfg.epochs:  # else the final weights are the val-selected ones
        model.load_state_dict(load_checkpoint(run / rundir.BEST, cfg.model, dataset.num_classes)["model"])
    logits, labels, ips = predict(dataset.test)
    return {"test_acc": (logits.argmax(1) == labels).float().mean().item(),
            "test_acc_final": (final_logits.argmax(1) == labels).float().mean().item(),
            "test_ece": expected_calibration_error(logits.softmax(dim=1), labels),
            "inference_images_per_s": ips}


def summarize(ctx: TrainingContext, run: Path, state: TrainState, cache_seconds: float) -> dict:
    """The summary of a finished run. Loads best.pt into the evaluated model to score it."""
    cfg, dataset, model = ctx.cfg, ctx.dataset, ctx.evaluated
    metrics = rundir.read_metrics(run)

    def predict(split):
        start = time.perf_counter()
        logits, labels = predict_logits(model, split, dataset.mean, dataset.std, ctx.device, ctx.precision,
                                        cfg.eval_batch_size)
        return logits, labels, len(labels) / (time.perf_counter() - start)

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
        "best_epoch": state.best_epoch,
        "best_val_acc": state.best_val_acc,
        "final_val_acc": metrics[-1]["val_acc"],
        "test_acc": scores["test_acc"],
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
    }

