"""Validation after each epoch, through the inference engine `imgcls eval` uses: the evaluated weights
(the EMA average when on) seen through an inference copy that shares their tensors, with the plan's
inference kernels, precision and batch size. On cached features the head alone is scored."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imgcls.data import Preprocessing, Split
from imgcls.evaluation.metrics import balanced_accuracy, confusion_matrix, per_class_report
from imgcls.evaluation.multilabel import multilabel_metrics
from imgcls.inference.engine import Engine, TorchBackend
from imgcls.inference.graph import InferenceModel
from imgcls.kernels.apply import inference_copy
from imgcls.kernels.choice import layout_of
from imgcls.runtime import autocast
from imgcls.training import distributed


def engine_for(model: torch.nn.Module, cfg, dataset, device: torch.device) -> Engine:
    """The engine that scores `model`'s current weights (a resolved `cfg`: its inference kernels, precision,
    batch size and layout), uncalibrated; non-finite outputs reach the validation loss (the loop's check)."""
    prep = Preprocessing(dataset.img_size, dataset.mean, dataset.std, dataset.crop_pct)
    view = inference_copy(model, cfg.eval_attention, cfg.eval_depthwise_precision)
    graph = InferenceModel(view, prep, memory_format=layout_of(cfg.memory_format))
    return Engine(TorchBackend(graph, device, cfg.eval_precision), dataset.classes, prep, cfg.eval_batch_size,
                  precision=cfg.eval_precision, source="training", device=device, outputs_checked=False)


def validate(ctx, val: Split | None, features: bool = False, head: torch.nn.Module | None = None) -> dict:
    """Loss, accuracy, balanced accuracy and macro-F1 of the evaluated weights on `val` (this rank's share),
    summed over ranks (the confusion matrix too, so every rank gets the same numbers); {} when there is no
    validation split (--val-fraction 0). With `features`, `val` holds cached features scored by `head`."""
    if val is None:
        return {}
    if features:
        logits, labels = head_logits(head, val, ctx.device, ctx.cfg.eval_precision), val.labels
    else:
        scores, labels = ctx.validator.score_split(val, where="the validation split", progress=False)
        logits = scores.logits
    if ctx.dataset.multilabel:
        return _multilabel_scores(ctx, logits, labels)
    k = ctx.dataset.num_classes
    cm = confusion_matrix(logits.argmax(1), labels, k).flatten().tolist()
    loss, *cm = distributed.all_sum(ctx.world, [F.cross_entropy(logits.float(), labels, reduction="sum").item(), *cm])
    cm = torch.tensor(cm, dtype=torch.int64).view(k, k)
    report = per_class_report(cm, ctx.dataset.classes)
    return {"val_loss": loss / cm.sum().item(), "val_acc": cm.diag().sum().item() / cm.sum().item(),
            "val_balanced_acc": balanced_accuracy(cm), "val_macro_f1": sum(r["f1"] for r in report) / k}


def _multilabel_scores(ctx, logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """A multi-label run's validation: binary cross-entropy, mAP, macro-F1 at 0.5 and subset accuracy (as
    val_acc: every label of an image right), over every rank's share (gathered: AP needs all the scores)."""
    shares = distributed.gather(ctx.world, (logits.float().cpu(), targets.cpu()))
    logits = torch.cat([s[0] for s in shares])
    targets = torch.cat([s[1] for s in shares]).float()
    if not bool(torch.isfinite(logits).all()):  # the run diverged: the loop stops on the loss
        return {"val_loss": float("nan")}
    found = multilabel_metrics(logits.sigmoid(), targets, ctx.dataset.classes)
    return {"val_loss": F.binary_cross_entropy_with_logits(logits, targets).item(),
            "val_acc": found["subset_accuracy"], "val_map": found["map"], "val_macro_f1": found["macro_f1"],
            "val_micro_f1": found["micro_f1"], "val_hamming_loss": found["hamming_loss"]}


@torch.inference_mode()
def head_logits(head: torch.nn.Module, features: Split, device: torch.device, precision: str) -> torch.Tensor:
    head.eval()
    with autocast(device, precision):
        return head(features.images.to(device)).float().cpu()
