"""Saying "unknown": the risk-coverage curve of the calibrated top-1 confidence, thresholds chosen on
validation, and out-of-distribution scores (max-softmax probability and energy).

A prediction is accepted when its top-1 probability is at least the threshold. `imgcls calibrate`
stores the validation curve in calibration.json ("risk_coverage"); `predict --reject auto` picks the
threshold from it, never from test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imgcls import rundir
from imgcls.errors import UserError

DEFAULT_TARGET_ACCURACY = 0.95
MAX_POINTS = 1000  # points kept of the curve: exact at each, only coarser in coverage


def risk_coverage(probs: torch.Tensor, labels: torch.Tensor, max_points: int = MAX_POINTS) -> dict:
    """For thresholds at the distinct top-1 confidences, high to low: the share of images accepted
    (confidence >= threshold) and the accuracy of those accepted. `aurc`: the area under the risk
    (1 - accuracy) against coverage, over every image."""
    confidence, predicted = probs.double().max(dim=1)
    order = confidence.argsort(descending=True, stable=True)
    confidence, hit = confidence[order], (predicted == labels)[order].double()
    n = len(confidence)
    accepted = torch.arange(1, n + 1, dtype=torch.float64)
    accuracy = hit.cumsum(0) / accepted
    last_of_tie = torch.ones(n, dtype=torch.bool)  # a threshold accepts a whole group of equal confidences
    last_of_tie[:-1] = confidence[:-1] != confidence[1:]
    idx = torch.nonzero(last_of_tie).flatten()
    if len(idx) > max_points:  # thin evenly over rank; the last point (everything accepted) stays
        idx = idx[torch.linspace(0, len(idx) - 1, max_points).round().long().unique()]
    return {"n": n, "threshold": confidence[idx].tolist(), "coverage": (accepted[idx] / n).tolist(),
            "accuracy": accuracy[idx].tolist(), "aurc": (1 - accuracy).mean().item()}


def val_risk_coverage(trained, scaling) -> dict:
    """The risk-coverage curve of `trained` on its validation split, probabilities scaled by `scaling`."""
    from imgcls.evaluation.evaluate import require_val_split, run_split  # evaluate imports this module: late
    from imgcls.evaluation.predict import predict_logits
    from imgcls.runtime import resolve_precision

    require_val_split(trained, "the --reject auto threshold (chosen on validation, never on test)")
    device = next(trained.model.parameters()).device
    logits, labels = predict_logits(trained.model, run_split(trained, "val"), trained.dataset["mean"],
                                    trained.dataset["std"], device,
                                    resolve_precision(trained.config.precision, device),
                                    trained.config.eval_batch_size)
    logits = logits.double()
    probs = (scaling.apply(logits) if scaling is not None else logits).softmax(dim=1)
    return risk_coverage(probs, labels)


def read_risk_coverage(run: str | Path) -> dict | None:
    """The validation curve `imgcls calibrate` stored in the run, if it has run."""
    path = Path(run) / rundir.CALIBRATION
    return rundir.read_json(path).get("risk_coverage") if path.is_file() else None


def choose_threshold(curve: dict, target_accuracy: float | None = None, coverage: float | None = None) -> dict:
    """The threshold that keeps the most images while their validation accuracy is at least
    `target_accuracy`, or the highest that still accepts at least `coverage` of them."""
    thresholds, coverages, accuracies = curve["threshold"], curve["coverage"], curve["accuracy"]
    if coverage is not None:
        if not 0 < coverage <= 1:
            raise UserError(f"--coverage {coverage} is not a share; pass a number in (0, 1], e.g. 0.8")
        i = next(i for i, c in enumerate(coverages) if c >= coverage - 1e-12)
    else:
        target = DEFAULT_TARGET_ACCURACY if target_accuracy is None else target_accuracy
        if not 0 < target <= 1:
            raise UserError(f"--target-accuracy {target} is not a share; pass a number in (0, 1], e.g. 0.95")
        meets = [i for i, a in enumerate(accuracies) if a >= target]
        if not meets:
            raise UserError(f"no threshold reaches accuracy {target} on validation (best {max(accuracies):.3f}); "
                            "lower --target-accuracy or use --coverage")
        i = meets[-1]
    return {"threshold": thresholds[i], "coverage": coverages[i], "accuracy": accuracies[i],
            "target_accuracy": None if coverage is not None else (target_accuracy or DEFAULT_TARGET_ACCURACY),
            "target_coverage": coverage}


def resolve_threshold(reject: str | None, curve: dict | None, target_accuracy: float | None = None,
                      coverage: float | None = None) -> float | None:
    """`--reject`: None (accept everything), 'auto' (chosen on validation) or a probability."""
    if reject is None:
        if target_accuracy is not None or coverage is not None:
            raise UserError("--target-accuracy and --coverage choose the --reject auto threshold; add --reject auto")
        return None
    if reject == "auto":
        if curve is None:
            raise UserError("--reject auto needs the validation risk-coverage curve; run imgcls calibrate RUN "
                            "first (and export again), or pass a threshold such as --reject 0.8 (a run trained "
                            "with --val-fraction 0 has no validation split, so only a threshold works)")
        return choose_threshold(curve, target_accuracy, coverage)["threshold"]
    try:
        value = float(reject)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise UserError(f"--reject {reject} is neither auto nor a probability; pass auto or a number in [0, 1]")
    return value


def energy(logits: torch.Tensor) -> torch.Tensor:
    """Negative free energy, logsumexp of the logits (Liu et al., 2020): higher means more in-distribution."""
    return torch.logsumexp(logits.double(), dim=1)


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """Probability that an in-distribution image scores above an OOD one (ties count half)."""
    scores = torch.cat([in_scores, out_scores]).double()
    ranks = torch.from_numpy(_average_ranks(scores.numpy()))
    n_in, n_out = len(in_scores), len(out_scores)
    return ((ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out)).item()


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, first, counts = np.unique(sorted_x, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        if count > 1:  # tied values share their mean rank
            ranks[order[start : start + count]] = start + (count + 1) / 2
    return ranks


def fpr_at_tpr(in_scores: torch.Tensor, out_scores: torch.Tensor, tpr: float = 0.95) -> float:
    """Share of OOD images accepted at the threshold that accepts `tpr` of the in-distribution ones."""
    threshold = torch.quantile(in_scores.double(), 1 - tpr)
    return (out_scores.double() >= threshold).double().mean().item()


def ood_table(in_logits, in_probs, out_logits, out_probs) -> dict:
    """AUROC and FPR at 95% TPR for max-softmax probability and energy (in-distribution as positive)."""
    table = {}
    for name, score_in, score_out in (("msp", in_probs.max(1).values, out_probs.max(1).values),
                                      ("energy", energy(in_logits), energy(out_logits))):
        table[name] = {"auroc": auroc(score_in, score_out), "fpr_at_95tpr": fpr_at_tpr(score_in, score_out)}
    return table


def evaluate_ood(run: str | Path, ood: str | Path, split: str = "test", checkpoint: str = "best",
                 device: str = "auto", eval_json: Path | None = None) -> dict:
    """Score a folder of images from classes the run never saw against `split`: AUROC and FPR at 95%
    TPR for max-softmax probability and energy, and what `--reject auto` (target 0.95 on val) lets
    through of each. Added as "ood" to `eval_json` when given."""
    from imgcls.evaluation.batch_predict import collect_paths, predict_arrays, run_predictor, split_nhwc
    from imgcls.evaluation.evaluate import run_split
    from imgcls.evaluation.predict import load_run
    from imgcls.runtime import resolve_device

    trained = load_run(run, checkpoint, resolve_device(device))
    predictor = run_predictor(trained)
    outs, labels = [], []
    for images, batch_labels in split_nhwc(run_split(trained, split)):
        outs.append(predictor.run(images))
        labels.append(batch_labels)
    in_logits = torch.from_numpy(np.concatenate([o[0] for o in outs])).double()
    in_probs = torch.from_numpy(np.concatenate([o[1] for o in outs])).double()
    labels = torch.cat(labels)
    out_logits, out_probs, unreadable = predict_arrays(predictor, collect_paths([str(ood)]))
    if len(out_probs) == 0:
        raise UserError(f"{ood} holds no readable images; pass --ood a folder of images from other classes")
    result = {"folder": str(ood), "split": split, "n_in": len(labels), "n_ood": len(out_probs),
              "unreadable": unreadable, **ood_table(in_logits, in_probs, out_logits, out_probs), "reject_auto": None}
    curve = predictor.risk_coverage
    try:
        rule = choose_threshold(curve) if curve else None
    except UserError:  # the target is out of reach on val
        rule = None
    if rule is not None:
        accepted = in_probs.max(1).values >= rule["threshold"]
        hits = (in_probs.argmax(1) == labels)[accepted].double()
        result["reject_auto"] = {**rule, "in_coverage": accepted.double().mean().item(),
                                 "in_accuracy_accepted": hits.mean().item() if len(hits) else None,
                                 "ood_accepted": (out_probs.max(1).values >= rule["threshold"]).double().mean().item()}
    if eval_json is not None:
        record = rundir.read_json(eval_json)
        record["ood"] = result
        rundir.write_json(eval_json, record)
    return result


def format_ood(result: dict) -> str:
    lines = [f"OOD {result['folder']}: {result['n_ood']} images against {result['n_in']} {result['split']} images",
             f"{'score':<8} {'AUROC':>7} {'FPR@95TPR':>10}"]
    for name in ("msp", "energy"):
        lines.append(f"{name:<8} {result[name]['auroc']:>7.4f} {result[name]['fpr_at_95tpr']:>10.4f}")
    rule = result["reject_auto"]
    if rule is None:
        lines.append("--reject auto: no threshold (run imgcls calibrate first, or the 0.95 target is out of reach)")
    else:
        lines.append(f"--reject auto (threshold {rule['threshold']:.4f}): accepts {rule['ood_accepted']:.1%} of OOD, "
                     f"{rule['in_coverage']:.1%} of {result['split']}")
    return "\n".join(lines)
