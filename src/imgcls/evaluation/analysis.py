"""Everything a run's report shows, computed once: metrics, calibration before and after temperature
scaling, test-time augmentation, the top losses, and Grad-CAM on right and wrong predictions (a multi-label
run's contents come from multilabel_analysis.py).

Writes report/analysis.json (numbers) and report/analysis.npz (gallery images and heat-maps) into
the run; reporting/ turns them into figures and one HTML page.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from imgcls import rundir
from imgcls.errors import UserError
from imgcls.evaluation.calibration import (
    calibration_metrics,
    check_calibration_data,
    check_scaling,
    fit_scaling,
    reliability_bins,
)
from imgcls.evaluation.cam import explain
from imgcls.evaluation.evaluate import parse_tta_flag
from imgcls.evaluation.gallery import by_index, gallery_pixels, hwc
from imgcls.evaluation.metrics import classification_metrics
from imgcls.evaluation.multilabel_analysis import analyze_multilabel
from imgcls.evaluation.rejection import number_in, stored_ood
from imgcls.inference.engine import Engine
from imgcls.inference.reject import default_rule
from imgcls.inference.run import TrainedRun, load_run, run_engine
from imgcls.inference.scaling import Scaling
from imgcls.models.checkpoint import safe_torch_load
from imgcls.rundir import file_digest
from imgcls.runtime import resolve_device


def analyze_run(run: str | Path, tta: str = "flip", gallery: int = 8, device: str = "auto",
                allow_data_change: bool = False) -> Path:
    """Compute the report's contents for a trained run; returns the report folder."""
    training_record(run)  # a damaged summary or metrics file is refused before minutes of inference
    trained = load_run(run, "best", resolve_device(device), allow_data_change)
    # figures inside the images the run trains on would become training images of the next run
    rundir.refuse_run_file(trained.path / rundir.REPORT_DIR, "the report folder",
                           within=rundir.folders(trained.config.data, trained.config.data_dir))
    split_name = "test" if trained.has_split("test") else "val"
    ood = stored_ood(trained.path, split_name, trained.digest)  # and a damaged OOD result, before it too
    if not trained.has_split(split_name):
        raise UserError(f"{trained.path} has neither a test split nor a validation split (trained with --val-fraction "
                        "0) to report on; add a test/ folder of class folders, or train with --val-fraction 0.1")
    engine = run_engine(trained)
    split = trained.split(split_name)
    # Labelled by index, the pass says which images it saw: a streamed file that became unreadable
    # after scanning is dropped, and every position after it would otherwise point at its neighbour.
    scores, seen = engine.score_split(by_index(split), where=f"the {split_name} split")
    logits, labels = scores.logits.double(), split.labels[seen]
    analyze = analyze_multilabel if trained.multilabel else _analyze_multiclass
    result, loss_pixels, cam_pixels, cams = analyze(trained, engine, split, seen, logits, labels, split_name, tta,
                                                    gallery)
    result["ood"] = ood
    out = trained.path / rundir.REPORT_DIR
    out.mkdir(exist_ok=True)
    rundir.write_sealed_json(out / rundir.ANALYSIS_JSON, result)
    with rundir.atomic_path(out / rundir.ANALYSIS_NPZ) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, loss_images=hwc(loss_pixels), cam_images=hwc(cam_pixels),
                            cams=cams.float().cpu().numpy())
    return out


def _analyze_multiclass(trained: TrainedRun, engine: Engine, split, seen: torch.Tensor, logits: torch.Tensor,
                        labels: torch.Tensor, split_name: str, tta: str, gallery: int):
    """(analysis, loss-gallery pixels, CAM pixels, heat-maps) of a one-label-per-image run scored on `split`."""
    scaling, where = _report_scaling(trained, engine)
    before, after = logits.softmax(1), scaling.apply(logits).softmax(1)
    tta_scores, tta_labels = replace(engine, scaling=scaling).score_split(split, parse_tta_flag(tta),
                                                                    where=f"the {split_name} split")
    after_metrics = calibration_metrics(after, labels)
    result = classification_metrics(after, labels, trained.classes)
    result.update(
        split=split_name, run=str(trained.path), weights=trained.digest,
        calibration={"temperature": scaling.temperature, "where": where,
                     "before": calibration_metrics(before, labels), "after": after_metrics,
                     "bins_before": reliability_bins(before, labels), "bins_after": reliability_bins(after, labels)},
        tta={"mode": tta, "without": after_metrics, "with": calibration_metrics(tta_scores.probs, tta_labels)},
        risk_coverage=trained.risk_coverage, reject_rule=default_rule(trained.risk_coverage),
    )
    loss_pixels, cam_pixels, cams = _galleries(engine, split, seen, after, labels, gallery, result)
    return result, loss_pixels, cam_pixels, cams


def _report_scaling(trained: TrainedRun, engine: Engine) -> tuple[Scaling, str]:
    """The temperature the report shows, and where it comes from: the run's own, else one fitted here on
    val; a validation split too small to fit one (calibration.py's checks) gets none (T = 1), and says why."""
    stored = trained.scaling
    if stored is not None and stored.method == "temperature":
        return stored, "stored by imgcls calibrate"
    identity = Scaling.identity(len(trained.classes))
    if not trained.has_split("val"):
        return identity, "none: no validation split to fit one on (trained with --val-fraction 0)"
    scores, labels = engine.score_split(trained.split("val"), where="the val split")
    logits = scores.logits.double()
    try:
        check_calibration_data(labels, len(trained.classes), trained.classes, logits)
        scaling = fit_scaling(logits, labels, "temperature")
        check_scaling(scaling)
    except UserError as e:
        return identity, f"none: {e}"
    return scaling, "fitted on val for this report"


def _galleries(engine: Engine, split, seen, after, labels, gallery: int, result: dict):
    """The highest-loss images, and Grad-CAM on the most confident right and wrong predictions: their
    descriptions go into `result`; returns (loss-gallery pixels, CAM pixels, heat-maps)."""
    classes = engine.classes
    loss = -after[torch.arange(len(labels)), labels].clamp(min=1e-12).log()
    predicted, confidence = after.argmax(1), after.max(1).values
    top_losses = loss.argsort(descending=True)[:gallery]
    right = torch.nonzero(predicted == labels).flatten()
    wrong = torch.nonzero(predicted != labels).flatten()
    right = right[confidence[right].argsort(descending=True)][: gallery // 2]
    wrong = wrong[confidence[wrong].argsort(descending=True)][: gallery // 2]
    top_losses, loss_pixels = gallery_pixels(split, seen, top_losses)
    right, right_pixels = gallery_pixels(split, seen, right)
    wrong, wrong_pixels = gallery_pixels(split, seen, wrong)
    cam_idx, cam_pixels = torch.cat([right, wrong]), torch.cat([right_pixels, wrong_pixels])
    cams = explain(engine, cam_pixels.permute(0, 2, 3, 1))[0] if len(cam_idx) else torch.zeros(0, 1, 1)

    def describe(indices):
        return [{"index": seen[i].item(), "true": classes[labels[i]], "predicted": classes[predicted[i]],
                 "probability": after[i, predicted[i]].item(), "loss": loss[i].item()} for i in indices.tolist()]

    result["top_losses"] = describe(top_losses)
    result["cam"] = {"right": describe(right), "wrong": describe(wrong), "method": "gradcam"}
    return loss_pixels, cam_pixels, cams


SUMMARY_KEYS = {"model": str, "data": str, "params": int, "epochs": int, "best_epoch": int, "best_val_acc": None,
                "train_time_s": float, "train_images_per_s": float, "device": str, "precision": str}
# (lowest, highest) of the numbers the report and the model card print; None: no bound on that side
SUMMARY_BOUNDS = {"params": (1, None), "epochs": (1, None), "best_epoch": (1, None), "best_val_acc": (0, 1),
                  "train_time_s": (0, None), "train_images_per_s": (0, None)}
METRIC_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")  # what the training curves draw
VAL_METRIC_KEYS = ("val_loss", "val_acc")  # absent from a run without a validation split
METRIC_BOUNDS = {"train_loss": (0, None), "val_loss": (0, None), "train_acc": (0, 1), "val_acc": (0, 1)}


def _fits(value, kind: type | None, bounds: tuple = (None, None)) -> bool:
    """`value` is of `kind` (None: a number or null), finite and within `bounds`."""
    if kind is None:  # a number or null (an accuracy of no images is written as null)
        return value is None or _fits(value, float, bounds)
    if kind is str:
        return isinstance(value, str)
    low, high = bounds
    return number_in(value, -math.inf if low is None else low, math.inf if high is None else high) and \
        (kind is float or value == int(value))


def training_record(run: str | Path) -> tuple[dict, list[dict]]:
    """(summary.json, metrics.jsonl lines) of a finished run, checked for what the report and the model card
    read: types, finite numbers, accuracies in [0, 1], epochs 1..epochs_run."""
    run = rundir.require_run(run)
    if not (run / rundir.SUMMARY).is_file():
        raise UserError(f"{run} has not finished training (no {rundir.SUMMARY}); finish it with "
                        f"imgcls train --resume {run}, then report it")
    summary = rundir.read_sealed_json(run / rundir.SUMMARY, "restore it, or train the run again")
    metrics = rundir.read_metrics(run)
    bad = [k for k, kind in SUMMARY_KEYS.items()
           if not isinstance(summary, dict) or not _fits(summary.get(k), kind, SUMMARY_BOUNDS.get(k, (None, None)))]
    if not bad:
        ran = summary.get("epochs_run", len(metrics))  # older summaries did not say
        bad = [k for k, ok in (("epochs_run", _fits(ran, int, (1, summary["epochs"]))),
                               ("best_epoch", summary["best_epoch"] <= summary["epochs"])) if not ok]
    if bad:
        raise UserError(f"{run / rundir.SUMMARY} is damaged (missing or wrong {', '.join(bad)}); restore it or "
                        "train the run again")
    keys = METRIC_KEYS if summary.get("val_split", True) else tuple(k for k in METRIC_KEYS if k not in VAL_METRIC_KEYS)
    broken = next((i for i, m in enumerate(metrics, 1) if not isinstance(m, dict)
                   or not all(_fits(m.get(k), float, METRIC_BOUNDS.get(k, (None, None))) for k in keys)), None)
    if broken or not metrics:
        what = f"line {broken} lacks one of {', '.join(keys)} as a finite number in range" if broken else \
            "it holds no epochs"
        raise UserError(f"{run / rundir.METRICS} is damaged ({what}); restore it or train the run again")
    epochs = [m.get("epoch") for m in metrics]
    if epochs != list(range(1, ran + 1)):
        raise UserError(f"{run / rundir.METRICS} does not hold epochs 1 to {ran} in order, as {rundir.SUMMARY} says "
                        f"the run trained (it holds {len(epochs)} lines); restore it or train the run again")
    disagree = _foreign(run, summary) or _selection_disagreement(run, summary, metrics)
    if disagree:
        raise UserError(f"{run / rundir.SUMMARY} does not agree with {disagree}: one of them was edited; restore it "
                        "or train the run again")
    return summary, metrics


def _foreign(run: Path, summary: dict) -> str | None:
    """Where a summary is another run's: trained with another model or seed than config.yaml says, or written
    over other epoch lines than metrics.jsonl holds (a digest runs trained since record)."""
    from imgcls.config import load_config

    cfg = load_config(run / rundir.CONFIG)
    for key, own in (("model", cfg.model), ("seed", cfg.seed)):
        if summary.get(key, own) != own:
            return f"{rundir.CONFIG} ({key} {summary.get(key)!r} in the summary, {own!r} in the config)"
    recorded = summary.get("metrics_sha256")
    if recorded is not None and recorded != file_digest(run / rundir.METRICS):
        return f"{rundir.METRICS} (it is not the file of epochs this summary was written from)"
    return None


def _selection_disagreement(run: Path, summary: dict, metrics: list[dict]) -> str | None:
    """Where the summary's chosen epoch and its accuracies differ from the epoch lines and from best.pt (which
    records its epoch and val accuracy): each in range, an edit of one would still print another run's story."""
    best = summary["best_epoch"]
    if best > len(metrics):
        return f"{rundir.METRICS} (best epoch {best} of {len(metrics)} lines)"
    for key, line in (("best_val_acc", metrics[best - 1]), ("final_val_acc", metrics[-1])):
        if key in summary and summary[key] != line.get("val_acc"):
            return f"{rundir.METRICS} ({key} {summary[key]}, epoch {line['epoch']}'s val_acc {line.get('val_acc')})"
    if not (run / rundir.BEST).is_file():
        return None
    ckpt = safe_torch_load(run / rundir.BEST, "checkpoint", "train the run again", mmap=True)  # epoch, val_acc
    saved = (ckpt.get("epoch"), ckpt.get("val_acc")) if isinstance(ckpt, dict) else (None, None)
    if saved[0] is not None and saved != (best, summary["best_val_acc"]):
        return (f"{rundir.BEST} (epoch {best}, val accuracy {summary['best_val_acc']} in the summary; the checkpoint "
                f"holds epoch {saved[0]} at {saved[1]})")
    return None


def analysis_mark(analysis: dict) -> str:
    """The line a run's report.html carries to say which analysis.json it shows (its seal)."""
    return f"<!-- imgcls analysis {analysis.get(rundir.SEAL, '')} -->"


def report_is_current(run: Path, tta: str) -> bool:
    """Whether RUN/report holds the report of the run's best.pt as it is now, with `tta`: what a comparison's report
    may link without making it again (a report taken from another run, or of an older checkpoint, is not)."""
    path, page = run / rundir.REPORT_DIR / rundir.ANALYSIS_JSON, run / rundir.REPORT_DIR / rundir.REPORT_HTML
    if not (path.is_file() and page.is_file() and (run / rundir.BEST).is_file()):
        return False
    try:
        analysis = rundir.read_sealed_json(path, "")
    except UserError:
        return False
    # the page must show this analysis: a report killed between the two leaves them mixed
    shown = analysis_mark(analysis) in page.read_text(encoding="utf-8", errors="replace")
    return (shown and analysis.get("weights") == file_digest(run / rundir.BEST)
            and analysis.get("tta", {}).get("mode") == tta)
