"""Everything a run's report shows, computed once: metrics, calibration before and after temperature
scaling, test-time augmentation, the top losses, and Grad-CAM on right and wrong predictions.

Writes report/analysis.json (numbers) and report/analysis.npz (gallery images and heat-maps) into
the run; reporting/ turns them into figures and one HTML page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imgcls import rundir
from imgcls.data import normalize
from imgcls.evaluation.calibration import calibration_metrics, fit_scaling, reliability_bins
from imgcls.evaluation.cam import grad_cam
from imgcls.evaluation.evaluate import parse_tta_flag, run_probs, run_split
from imgcls.evaluation.metrics import classification_metrics
from imgcls.evaluation.predict import load_run, predict_logits
from imgcls.runtime import resolve_device, resolve_precision


def analyze_run(run: str | Path, tta: str = "flip", gallery: int = 8, device: str = "auto") -> Path:
    """Compute the report's contents for a trained run; returns the report folder."""
    trained = load_run(run, "best", resolve_device(device))
    cfg, dev = trained.config, next(trained.model.parameters()).device
    precision = resolve_precision(cfg.precision, dev)
    split_name = "test" if "test" in trained.dataset["fingerprint"]["sizes"] else "val"
    split = run_split(trained, split_name)
    mean, std = trained.dataset["mean"], trained.dataset["std"]

    def logits_of(name):
        return predict_logits(trained.model, split if name == split_name else run_split(trained, name), mean, std,
                              dev, precision, cfg.eval_batch_size)

    logits, labels = logits_of(split_name)
    logits = logits.double()
    stored = trained.scaling
    if stored is None or stored.method != "temperature":  # the report always shows temperature scaling
        val_logits, val_labels = logits_of("val")
        scaling, fitted_here = fit_scaling(val_logits, val_labels, "temperature"), True
    else:
        scaling, fitted_here = stored, False
    before, after = logits.softmax(1), scaling.apply(logits).softmax(1)
    trained.scaling = scaling
    tta_probs, _ = run_probs(trained, split, parse_tta_flag(tta))

    after_metrics = calibration_metrics(after, labels)
    result = classification_metrics(after, labels, trained.classes)
    result.update(
        split=split_name, run=str(trained.path),
        calibration={"temperature": scaling.temperature, "fitted_for_report": fitted_here,
                     "before": calibration_metrics(before, labels), "after": after_metrics,
                     "bins_before": reliability_bins(before, labels), "bins_after": reliability_bins(after, labels)},
        tta={"mode": tta, "without": after_metrics, "with": calibration_metrics(tta_probs, labels)},
    )

    # Galleries: the highest-loss images, and Grad-CAM on the most confident right and wrong predictions.
    loss = -after[torch.arange(len(labels)), labels].clamp(min=1e-12).log()
    predicted, confidence = after.argmax(1), after.max(1).values
    top_losses = loss.argsort(descending=True)[:gallery]
    right = torch.nonzero(predicted == labels).flatten()
    wrong = torch.nonzero(predicted != labels).flatten()
    right = right[confidence[right].argsort(descending=True)][: gallery // 2]
    wrong = wrong[confidence[wrong].argsort(descending=True)][: gallery // 2]
    cam_idx = torch.cat([right, wrong])
    images_all = split.subset(torch.cat([top_losses, cam_idx]))
    pixels, _ = next(images_all.batches(torch.arange(len(images_all)), len(images_all)))
    loss_pixels, cam_pixels = pixels[: len(top_losses)], pixels[len(top_losses):]
    x = normalize(cam_pixels.to(dev), mean, std).contiguous(memory_format=torch.channels_last)
    cams, _, _ = grad_cam(trained.model, x.float()) if len(cam_idx) else (torch.zeros(0, 1, 1), None, None)

    def describe(indices):
        return [{"index": i, "true": trained.classes[labels[i]], "predicted": trained.classes[predicted[i]],
                 "probability": after[i, predicted[i]].item(), "loss": loss[i].item()} for i in indices.tolist()]

    result["top_losses"] = describe(top_losses)
    result["cam"] = {"right": describe(right), "wrong": describe(wrong), "method": "gradcam"}
    out = trained.path / rundir.REPORT_DIR
    out.mkdir(exist_ok=True)
    rundir.write_json(out / rundir.ANALYSIS_JSON, result)
    buffer = Path(out / f".{rundir.ANALYSIS_NPZ}.tmp.npz")
    np.savez_compressed(buffer, loss_images=_hwc(loss_pixels), cam_images=_hwc(cam_pixels),
                        cams=cams.float().cpu().numpy())
    buffer.replace(out / rundir.ANALYSIS_NPZ)
    return out


def _hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).contiguous().numpy()
