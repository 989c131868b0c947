"""How well "unknown" works: the risk-coverage curve of the calibrated top-1 confidence (which `imgcls
calibrate` stores for `--reject auto`, inference/reject.py), and out-of-distribution scores (max-softmax
probability and energy) against a folder of images from other classes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from imgcls import rundir
from imgcls.errors import UserError
from imgcls.inference.files import collect_paths, score_all
from imgcls.inference.reject import default_rule, energy
from imgcls.inference.run import load_run, run_engine
from imgcls.runtime import resolve_device

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


def ood_paths(ood: str | Path, run: str | Path) -> list[Path]:
    """The image files of an --ood folder, refused when its folders carry the run's class names: those are
    the run's own classes (a common mistake: the test folder passed as --ood), and an AUROC of in-distribution
    against in-distribution images measures nothing."""
    paths = collect_paths([str(ood)], what="score as out-of-distribution")
    info = Path(run) / rundir.DATASET  # missing or damaged: load_run refuses it, in its words
    recorded = rundir.read_json(info).get("classes", []) if info.is_file() else []
    classes = {c.casefold(): c for c in recorded if isinstance(c, str)}
    root = Path(ood)
    named = sorted({classes[part.casefold()] for p in paths for part in p.relative_to(root).parts[:-1]
                    if part.casefold() in classes}) if root.is_dir() else []
    if named:
        raise UserError(f"--ood {ood} holds folders named like the run's classes ({', '.join(named[:5])}"
                        f"{', ...' if len(named) > 5 else ''}): those images are in-distribution; pass a folder "
                        "of images from classes the run never saw")
    return paths


def evaluate_ood(run: str | Path, ood: str | Path, split: str = "test", checkpoint: str = "best",
                 device: str = "auto", eval_json: Path | None = None) -> dict:
    """Score a folder of images from classes the run never saw against `split`: AUROC and FPR at 95%
    TPR for max-softmax probability and energy, and what `--reject auto` (target 0.95 on val) lets
    through of each. Added as "ood" to `eval_json` when given."""
    paths = ood_paths(ood, run)  # one line, before any inference
    trained = load_run(run, checkpoint, resolve_device(device))
    trained.require_multiclass("imgcls eval --ood")
    engine = run_engine(trained)
    inside, labels = engine.score_split(trained.split(split), where=f"the {split} split")
    outside, unreadable = score_all(engine, paths)
    if outside is None:
        raise UserError(f"{ood} holds no readable images; pass --ood a folder of images from other classes")
    result = {"folder": str(ood), "split": split, "n_in": len(labels), "n_ood": len(outside.probs),
              "weights": trained.digest, "unreadable": unreadable,
              **ood_table(inside.logits, inside.probs, outside.logits, outside.probs), "reject_auto": None}
    rule = default_rule(engine.risk_coverage)
    if rule is not None:
        accepted = inside.probs.max(1).values >= rule["threshold"]
        hits = (inside.probs.argmax(1) == labels)[accepted].double()
        result["reject_auto"] = {**rule, "in_coverage": accepted.double().mean().item(),
                                 "in_accuracy_accepted": hits.mean().item() if len(hits) else None,
                                 "ood_accepted": (outside.probs.max(1).values >= rule["threshold"]).double().mean()
                                 .item()}
    if eval_json is not None:
        record = rundir.read_sealed_json(eval_json, f"run imgcls eval {run} again")
        record["ood"] = result
        rundir.write_sealed_json(eval_json, record)
    return result


def number_in(value, low: float = 0.0, high: float = 1.0) -> bool:
    """`value` is a finite number (not a bool) in [low, high]: a share by default."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and \
        low <= value <= high


def ood_problem(ood) -> str | None:
    """What is wrong with a stored `eval --ood` result that a report would show (None: nothing)."""
    if not isinstance(ood, dict) or not isinstance(ood.get("folder"), str) or not isinstance(ood.get("split"), str):
        return "is not an OOD result (folder, split)"
    if not all(isinstance(ood.get(k), int) and not isinstance(ood[k], bool) and ood[k] >= 1
               for k in ("n_in", "n_ood")):
        return "has no image counts n_in and n_ood"
    if not all(isinstance(ood.get(k), dict) and number_in(ood[k].get("auroc")) and number_in(ood[k].get("fpr_at_95tpr"))
               for k in ("msp", "energy")):
        return "has an AUROC or FPR that is not a number in [0, 1]"
    rule = ood.get("reject_auto")
    if rule is not None and not (isinstance(rule, dict) and all(number_in(rule.get(k)) for k in
                                                                ("threshold", "in_coverage", "ood_accepted"))):
        return "has a --reject auto rule whose threshold or shares are not numbers in [0, 1]"
    return None


def stored_ood(run: Path, split: str, weights: str) -> dict | None:
    """The OOD result the run's eval-SPLIT.json holds for checkpoint `weights`, checked (None: there is none);
    {"stale": why} when it was computed with another checkpoint (a report shows why, not its numbers)."""
    path = Path(run) / f"eval-{split}.json"
    record = rundir.read_sealed_json(path, f"run imgcls eval {run} --ood FOLDER again, or delete it") \
        if path.is_file() else None
    ood = record.get("ood") if isinstance(record, dict) else None
    if ood is None:
        return None
    if isinstance(ood, dict) and ood.get("weights", record.get("weights")) != weights:
        return {"stale": f"{path.name} was computed with another checkpoint; run imgcls eval {run} --ood FOLDER "
                         "again to show it"}
    problem = ood_problem(ood)
    if problem:
        raise UserError(f"{path}: its ood section {problem}; run imgcls eval {run} --ood FOLDER again, or delete it")
    return ood

