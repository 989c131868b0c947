"""A multi-label run's report contents: per-label AP and precision-recall curves, calibration per label
before and after, test-time augmentation, the label pairs most often confused or missed, the highest-loss
images, and Grad-CAM for every label predicted on the most confident images.

Every decision is each label's probability at its threshold (tuned on val, carried through the calibration the
report shows), as predict decides; analysis.py writes what this computes.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from imgcls.data import Split
from imgcls.errors import UserError
from imgcls.evaluation.calibration import (
    check_multilabel_calibration_data,
    check_scaling,
    fit_multilabel_scaling,
    label_reliability_bins,
    multilabel_calibration_metrics,
)
from imgcls.evaluation.cam import explain
from imgcls.evaluation.evaluate import parse_tta_flag, tta_side
from imgcls.evaluation.gallery import gallery_pixels
from imgcls.evaluation.multilabel import label_errors, multilabel_metrics, precision_recall_curve
from imgcls.inference.engine import Engine
from imgcls.inference.run import TrainedRun
from imgcls.inference.scaling import Scaling

MAX_CAM_LABELS = 4  # Grad-CAMs per image: one for each predicted label, the most probable first


def analyze_multilabel(trained: TrainedRun, engine: Engine, split: Split, seen: torch.Tensor, logits: torch.Tensor,
                       targets: torch.Tensor, split_name: str, tta: str, gallery: int):
    """(analysis, loss-gallery pixels, CAM pixels, heat-maps) of a multi-label run scored on `split` (`logits`,
    raw, and `targets`, multi-hot, of the images `seen`)."""
    classes = trained.classes
    scaling, where = _report_scaling(trained, engine)
    thresholds = scaling.carry(trained.thresholds(calibrated=False))
    before, after = logits.sigmoid(), scaling.apply(logits).sigmoid()
    calibrated = replace(engine, scaling=scaling, thresholds=thresholds)
    tta_scores, tta_targets = calibrated.score_split(split, parse_tta_flag(tta), where=f"the {split_name} split")
    result = multilabel_metrics(after, targets.float(), classes, thresholds)
    predicted, truth = after >= thresholds.view(1, -1), targets > 0.5
    curves = [precision_recall_curve(after[:, k], truth[:, k]) for k in range(len(classes))]
    result.update(
        task="multilabel", classes=classes, split=split_name, run=str(trained.path), weights=trained.digest,
        calibration={"where": where, "scaling": scaling.as_dict(),
                     "before": multilabel_calibration_metrics(before, targets),
                     "after": multilabel_calibration_metrics(after, targets),
                     "bins_before": label_reliability_bins(before, targets),
                     "bins_after": label_reliability_bins(after, targets)},
        tta={"mode": tta, "without": tta_side(after, targets, classes, thresholds),
             "with": tta_side(tta_scores.probs, tta_targets, classes, thresholds)},
        pr_curves={c: curve for c, curve in zip(classes, curves, strict=True) if curve is not None},
        label_errors=label_errors(predicted, truth, classes))
    loss = F.binary_cross_entropy(after.clamp(1e-12, 1 - 1e-12), truth.double(), reduction="none").sum(1)
    top_losses, loss_pixels = gallery_pixels(split, seen, loss.argsort(descending=True)[:gallery])

    def names(row: torch.Tensor) -> list[str]:
        return [classes[k] for k in torch.nonzero(row).flatten().tolist()]

    result["top_losses"] = [{"index": seen[i].item(), "true": names(truth[i]), "predicted": names(predicted[i]),
                             "loss": loss[i].item()} for i in top_losses.tolist()]
    _, cam_pixels, cams = _cams_per_label(engine, split, seen, after, predicted, truth, gallery // 2, result)
    return result, loss_pixels, cam_pixels, cams


def _report_scaling(trained: TrainedRun, engine: Engine) -> tuple[Scaling, str]:
    """The per-label calibration the report shows, and where it comes from: the run's own, else a temperature per
    label fitted here on val; none (every scale 1) when the validation split cannot fit one, saying why."""
    if trained.scaling is not None:
        return trained.scaling, f"stored by imgcls calibrate ({trained.scaling.method})"
    k = len(trained.classes)
    identity = Scaling("temperature", [1.0] * k, [0.0] * k)
    if not trained.has_split("val"):
        return identity, "none: no validation split to fit one on (trained with --val-fraction 0)"
    scores, targets = engine.score_split(trained.split("val"), where="the val split")  # raw logits: no scaling yet
    try:
        check_multilabel_calibration_data(scores.logits.double(), targets, trained.classes, "temperature")
        scaling = fit_multilabel_scaling(scores.logits.double(), targets, "temperature")
        check_scaling(scaling)
    except UserError as e:
        return identity, f"none: {e}"
    return scaling, "a temperature per label, fitted on val for this report"


def _cams_per_label(engine: Engine, split: Split, seen: torch.Tensor, probs: torch.Tensor, predicted: torch.Tensor,
                    truth: torch.Tensor, count: int, result: dict):
    """Grad-CAM of each predicted label (at most MAX_CAM_LABELS, the most probable first) on the `count` images
    predicted with the most labels (the most confident first): (their positions, pixels, heat-maps), one heat-map
    per (image, label), described in result["cam"]."""
    n_predicted = predicted.sum(1)
    confidence = torch.where(predicted, probs, torch.zeros_like(probs)).sum(1) / n_predicted.clamp(min=1)
    candidates = torch.nonzero(n_predicted > 0).flatten()
    order = sorted(candidates.tolist(), key=lambda i: (-int(n_predicted[i]), -float(confidence[i])))
    positions, pixels = gallery_pixels(split, seen, torch.tensor(order[:count], dtype=torch.long))
    items, image_of, labels = [], [], []
    for j, i in enumerate(positions.tolist()):
        chosen = sorted(torch.nonzero(predicted[i]).flatten().tolist(), key=lambda k: -float(probs[i, k]))
        chosen = chosen[:MAX_CAM_LABELS]
        items.append({"index": seen[i].item(), "true": [engine.classes[k] for k in torch.nonzero(truth[i]).flatten()],
                      "labels": [{"class": engine.classes[k], "probability": float(probs[i, k]),
                                  "right": bool(truth[i, k])} for k in chosen]})
        image_of += [j] * len(chosen)
        labels += chosen
    result["cam"] = {"method": "gradcam", "per_label": items}
    if not labels:
        return positions, pixels, torch.zeros(0, 1, 1)
    images = pixels[torch.tensor(image_of)].permute(0, 2, 3, 1)
    cams = explain(engine, images, torch.tensor(labels))[0]
    return positions, pixels, cams
