"""`imgcls eval`, `imgcls calibrate` and `imgcls predict` as library calls."""

from __future__ import annotations

from pathlib import Path

import torch

from imgcls import rundir
from imgcls.data import Split, load_dataset
from imgcls.data.presets import parse_tta
from imgcls.errors import UserError
from imgcls.evaluation.calibration import calibration_metrics, check_calibration_data, check_scaling, fit_scaling
from imgcls.evaluation.metrics import classification_metrics
from imgcls.evaluation.predict import (
    TrainedRun,
    forward_batch,
    load_images,
    load_run,
    predict_logits,
    predict_probs,
    require_finite,
)
from imgcls.runtime import resolve_device, resolve_precision

# Most test-time views `--tta N` may ask for. The gain from random views levels off after a few dozen,
# and each batch holds N views of every image, so an unbounded N only finds the memory limit.
MAX_TTA_VIEWS = 64


def run_split(trained: TrainedRun, split: str, data: str | None = None, data_dir: str | None = None) -> Split:
    """A split of the run's own data (or of other data with the same classes), preprocessed as in training."""
    cfg = trained.config
    dataset = load_dataset(data or cfg.data, data_dir if data else (data_dir or cfg.data_dir),
                           trained.dataset["img_size"], cfg.val_fraction, cfg.split_seed, cfg.data_mode,
                           cfg.workers, crop_pct=trained.dataset.get("crop_pct", 1.0))
    if dataset.classes != trained.classes:
        raise UserError(f"{dataset.name} has classes {dataset.classes}, but the run was trained on "
                        f"{trained.classes}; evaluate on data with the same classes")
    if data is None:  # the run's own data must still be what it was trained on
        rundir.check_same_data(trained.path, trained.dataset["fingerprint"], dataset.fingerprint,
                               trained.allow_data_change)
    return dataset.split(split)


def has_val_split(trained: TrainedRun) -> bool:
    """Whether the run held out a validation split (none with --val-fraction 0 on data without val/)."""
    return "val" in trained.dataset["fingerprint"]["sizes"]


def require_val_split(trained: TrainedRun, what: str) -> None:
    """Refuse `what`, which needs the run's validation split, when the run has none."""
    if not has_val_split(trained):
        raise UserError(f"{what} needs a validation split, and {trained.path} has none (trained with "
                        "--val-fraction 0); train a run with --val-fraction 0.1 for it")


def run_probs(trained: TrainedRun, split: Split, tta: str | int = "none", scaled: bool = True):
    """(probabilities, labels) of a trained run on `split`, with its calibration unless `scaled=False`."""
    device = next(trained.model.parameters()).device
    cfg = trained.config
    probs, labels = predict_probs(trained.model, split, trained.dataset["mean"], trained.dataset["std"], device,
                                  resolve_precision(cfg.precision, device), cfg.eval_batch_size, tta, cfg.aug,
                                  trained.scaling if scaled else None)
    require_finite(probs, "the evaluated split")
    return probs, labels


def evaluate_run(run: str | Path, split: str = "test", data: str | None = None, data_dir: str | None = None,
                 checkpoint: str = "best", device: str = "auto", tta: str = "none",
                 allow_data_change: bool = False) -> tuple[dict, Path]:
    """Metrics of a trained run on one split, with test-time augmentation compared against none when
    `tta` is given; the run's temperature applies once `calibrate` has stored one. Written to
    eval-<split>.json in the run."""
    tta_mode = parse_tta_flag(tta)
    trained = load_run(run, checkpoint, resolve_device(device), allow_data_change)
    images = run_split(trained, split, data, data_dir)
    probs, labels = run_probs(trained, images)
    result = classification_metrics(probs, labels, trained.classes)
    result["calibration"] = calibration_metrics(probs, labels)
    if tta_mode != "none":
        tta_probs, _ = run_probs(trained, images, tta_mode)
        mode = f"{tta_mode} random views of '{trained.config.aug}'" if isinstance(tta_mode, int) else tta_mode
        result["tta"] = {"mode": mode, "without": result["calibration"],
                         "with": calibration_metrics(tta_probs, labels)}
    result.update(split=split, data=data or trained.config.data, checkpoint=str(trained.checkpoint),
                  scaling=trained.scaling.as_dict() if trained.scaling else None)
    out = trained.path / f"eval-{split}.json"
    rundir.write_json(out, result)
    return result, out


def parse_tta_flag(mode: str) -> str | int:
    """--tta as presets.parse_tta reads it, with at most MAX_TTA_VIEWS random views."""
    try:
        parsed = parse_tta(mode)
    except ValueError as e:
        raise UserError(str(e)) from None
    if isinstance(parsed, int) and parsed > MAX_TTA_VIEWS:
        raise UserError(f"--tta {parsed} asks for more than {MAX_TTA_VIEWS} views per image (more add nothing but "
                        f"memory); pass --tta {MAX_TTA_VIEWS} or fewer, or flip / flip-crop")
    return parsed


def calibrate_run(run: str | Path, method: str = "temperature", checkpoint: str = "best",
                  device: str = "auto", allow_data_change: bool = False) -> dict:
    """Fit a temperature (or vector scaling) on the validation split, never on test; store it in
    the run for eval and predict; report the metrics on validation and test before and after."""
    trained = load_run(run, checkpoint, resolve_device(device), allow_data_change)
    require_val_split(trained, "calibrate (it fits on the validation split, never on test)")
    cfg = trained.config
    dev = next(trained.model.parameters()).device
    splits = ["val"] + (["test"] if "test" in trained.dataset["fingerprint"]["sizes"] else [])
    report = {"method": method, "fitted_on": "val", "checkpoint": str(trained.checkpoint), "splits": {}}
    scaling = None
    for name in splits:
        logits, labels = predict_logits(trained.model, run_split(trained, name), trained.dataset["mean"],
                                        trained.dataset["std"], dev, resolve_precision(cfg.precision, dev),
                                        cfg.eval_batch_size)
        logits = logits.double()
        require_finite(logits, f"the {name} split")
        if scaling is None:  # the first split is val: too little of it gives a temperature that is noise
            check_calibration_data(labels, len(trained.classes), trained.classes, logits)
            scaling = fit_scaling(logits, labels, method)
            check_scaling(scaling)
        report["splits"][name] = {"before": calibration_metrics(logits.softmax(1), labels),
                                  "after": calibration_metrics(scaling.apply(logits).softmax(1), labels)}
    report["scaling"] = scaling.as_dict()
    from imgcls.evaluation.rejection import val_risk_coverage  # the val curve for predict --reject auto

    report["risk_coverage"] = val_risk_coverage(trained, scaling)
    rundir.write_json(trained.path / rundir.CALIBRATION, report)
    return report


@torch.inference_mode()
def predict_files(trained: TrainedRun, paths: list[str], topk: int = 3) -> list[dict]:
    """Top-k classes and probabilities for image files, with the run's own preprocessing (and
    its calibration, once fitted)."""
    if not paths:
        raise UserError("no images given; pass one or more image files after the run folder")
    if topk < 1:
        raise UserError(f"--topk must be at least 1 (got {topk}); it is the number of classes shown per image")
    images = load_images(paths, trained.dataset["img_size"], trained.dataset.get("crop_pct", 1.0))
    device = next(trained.model.parameters()).device
    precision = resolve_precision(trained.config.precision, device)
    logits = forward_batch(trained.model, images, trained.dataset["mean"], trained.dataset["std"], device, precision)
    logits = logits.double().cpu()
    require_finite(logits, "these images")
    if trained.scaling is not None:
        logits = trained.scaling.apply(logits)
    probs = logits.softmax(dim=1)
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=1)
    return [
        {
            "image": str(path),
            "top": [{"class": trained.classes[i], "probability": p}
                    for p, i in zip(values.tolist(), indices.tolist(), strict=True)],
        }
        for path, values, indices in zip(paths, top.values, top.indices, strict=True)
    ]
