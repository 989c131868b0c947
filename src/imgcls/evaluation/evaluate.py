"""`imgcls eval` and `imgcls predict` as library calls."""

from __future__ import annotations

from pathlib import Path

import torch

from imgcls import rundir
from imgcls.data import load_dataset
from imgcls.errors import UserError
from imgcls.evaluation.metrics import classification_metrics
from imgcls.evaluation.predict import TrainedRun, forward_batch, load_images, load_run, predict_logits
from imgcls.runtime import resolve_device, resolve_precision


def evaluate_run(run: str | Path, split: str = "test", data: str | None = None, data_dir: str | None = None,
                 checkpoint: str = "best", device: str = "auto") -> tuple[dict, Path]:
    """Metrics of a trained run on one split; written to eval-<split>.json in the run."""
    dev = resolve_device(device)
    trained = load_run(run, checkpoint, dev)
    cfg = trained.config
    dataset = load_dataset(data or cfg.data, data_dir if data else (data_dir or cfg.data_dir),
                           trained.dataset["img_size"], cfg.val_fraction, cfg.split_seed, cfg.data_mode,
                           cfg.workers, crop_pct=trained.dataset.get("crop_pct", 1.0))
    if dataset.classes != trained.classes:
        raise UserError(f"{dataset.name} has classes {dataset.classes}, but the run was trained on "
                        f"{trained.classes}; evaluate on data with the same classes")
    precision = resolve_precision(cfg.precision, dev)
    logits, labels = predict_logits(trained.model, dataset.split(split), trained.dataset["mean"],
                                    trained.dataset["std"], dev, precision, cfg.eval_batch_size)
    result = classification_metrics(logits, labels, trained.classes)
    result.update(split=split, data=dataset.name, checkpoint=str(trained.checkpoint))
    out = trained.path / f"eval-{split}.json"
    rundir.write_json(out, result)
    return result, out


@torch.inference_mode()
def predict_files(trained: TrainedRun, paths: list[str], topk: int = 3) -> list[dict]:
    """Top-k classes and probabilities for image files, with the run's own preprocessing."""
    if not paths:
        raise UserError("no images given; pass one or more image files after the run folder")
    images = load_images(paths, trained.dataset["img_size"], trained.dataset.get("crop_pct", 1.0))
    device = next(trained.model.parameters()).device
    precision = resolve_precision(trained.config.precision, device)
    logits = forward_batch(trained.model, images, trained.dataset["mean"], trained.dataset["std"], device, precision)
    probs = logits.float().softmax(dim=1).cpu()
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
