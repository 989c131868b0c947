"""Multi-label metrics from per-class probabilities (sigmoid outputs) and multi-hot targets.

Average precision (AP) of a class is the mean, over its positive images, of the precision among the
images scored at least as high as that one (ties counted together, as scikit-learn's
`average_precision_score` does); mAP is the mean AP over the classes that have a positive image. The
thresholded metrics (micro and macro F1, subset accuracy, Hamming loss) use one threshold per class.
"""

from __future__ import annotations

import torch

DEFAULT_THRESHOLD = 0.5


def average_precision(scores: torch.Tensor, positives: torch.Tensor) -> float | None:
    """AP of one class: `scores` (N) against `positives` (N, bool); None when no image is positive."""
    positives = positives.bool()
    if not bool(positives.any()):
        return None
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, y = scores.double()[order], positives[order].double()
    # Precision is read at the last image of each run of tied scores, so ties share one value.
    last_of_tie = torch.ones(len(s), dtype=torch.bool)
    last_of_tie[:-1] = s[1:] != s[:-1]
    hits = torch.cumsum(y, 0)[last_of_tie]
    seen = torch.arange(1, len(s) + 1, dtype=torch.float64)[last_of_tie]
    new_hits = torch.diff(hits, prepend=torch.zeros(1, dtype=torch.float64))
    return float((new_hits * hits / seen).sum() / y.sum())


def per_class_ap(probs: torch.Tensor, targets: torch.Tensor) -> list[float | None]:
    return [average_precision(probs[:, k], targets[:, k] > 0.5) for k in range(probs.shape[1])]


def mean_ap(probs: torch.Tensor, targets: torch.Tensor) -> float:
    aps = [ap for ap in per_class_ap(probs, targets) if ap is not None]
    return sum(aps) / len(aps) if aps else 0.0


def _counts(predicted: torch.Tensor, truth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tp = (predicted & truth).sum(0).double()
    return tp, (predicted & ~truth).sum(0).double(), (~predicted & truth).sum(0).double()


def _f1(tp, fp, fn) -> torch.Tensor:
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))


def multilabel_metrics(probs: torch.Tensor, targets: torch.Tensor, classes: list[str],
                       thresholds: torch.Tensor | None = None) -> dict:
    """mAP, per-class AP, micro/macro F1, subset accuracy and Hamming loss at `thresholds` (one per class;
    default 0.5), and per-class precision, recall, F1 and support."""
    thresholds = torch.full((len(classes),), DEFAULT_THRESHOLD, dtype=torch.float64) if thresholds is None \
        else thresholds.double()
    truth = targets > 0.5
    predicted = probs.double() >= thresholds.view(1, -1)
    tp, fp, fn = _counts(predicted, truth)
    f1 = _f1(tp, fp, fn)
    aps = per_class_ap(probs, targets)
    present = truth.any(0)
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
    return {
        "n": len(targets),
        "map": mean_ap(probs, targets),
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
        "subset_accuracy": float((predicted == truth).all(1).double().mean()),
        "hamming_loss": float((predicted != truth).double().mean()),
        "per_class": [{"class": c, "ap": ap, "precision": float(p), "recall": float(r), "f1": float(f),
                       "support": int(s), "threshold": float(t)}
                      for c, ap, p, r, f, s, t in zip(classes, aps, precision, recall, f1, truth.sum(0), thresholds,
                                                     strict=True)],
    }


def best_f1_thresholds(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per class, a threshold that maximises its F1 on these images (0.5 for a class with no positive); a tie
    takes the highest (fewer false positives). It lies midway between the lowest score it accepts and the next
    lower one, never on a score: a copy of the model that rounds differently (an export) then decides alike."""
    out = torch.full((probs.shape[1],), DEFAULT_THRESHOLD, dtype=torch.float64)
    for k in range(probs.shape[1]):
        truth = targets[:, k] > 0.5
        if not bool(truth.any()):
            continue
        order = torch.argsort(probs[:, k].double(), descending=True, stable=True)
        s, y = probs[order, k].double(), truth[order].double()
        tp = torch.cumsum(y, 0)
        fp = torch.arange(1, len(s) + 1, dtype=torch.float64) - tp
        last_of_tie = torch.ones(len(s), dtype=torch.bool)
        last_of_tie[:-1] = s[1:] != s[:-1]
        f1 = torch.where(last_of_tie, 2 * tp / (2 * tp + fp + (y.sum() - tp)), torch.full_like(tp, -1.0))
        best = int(torch.nonzero(f1 == f1.max()).flatten()[0])  # the first max: the highest threshold
        out[k] = (s[best] + s[best + 1]) / 2 if best + 1 < len(s) else s[best] / 2
    return out


def precision_recall_curve(scores: torch.Tensor, positives: torch.Tensor, points: int = 101) -> dict | None:
    """One class's precision and recall at every threshold that changes them (the end of each run of tied
    scores), thinned to at most `points` evenly spaced along the ranking; None when no image is positive."""
    positives = positives.bool()
    if not bool(positives.any()):
        return None
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, y = scores.double()[order], positives[order].double()
    last_of_tie = torch.ones(len(s), dtype=torch.bool)
    last_of_tie[:-1] = s[1:] != s[:-1]
    hits = torch.cumsum(y, 0)[last_of_tie]
    seen = torch.arange(1, len(s) + 1, dtype=torch.float64)[last_of_tie]
    keep = torch.linspace(0, len(hits) - 1, min(points, len(hits))).round().long().unique()
    return {"precision": (hits / seen)[keep].tolist(), "recall": (hits / y.sum())[keep].tolist(),
            "threshold": s[last_of_tie][keep].tolist()}


def label_errors(predicted: torch.Tensor, truth: torch.Tensor, classes: list[str], top: int = 10) -> dict:
    """The label pairs a multi-label model gets wrong most often, from N x K boolean decisions and truth:
    `confused`, label a missed on an image where label b was predicted without being there (a taken for b);
    `missed_alongside`, a missed on an image where b was rightly found (b hides a); the `top` of each, most
    frequent first, and each label's misses and false alarms."""
    missed, spurious, found = truth & ~predicted, predicted & ~truth, truth & predicted
    confused = missed.double().T @ spurious.double()  # K x K: images with a missed and b spurious
    alongside = missed.double().T @ found.double()  # its diagonal is 0: a label is missed or found, not both

    def ranked(counts: torch.Tensor, a: str, b: str) -> list[dict]:
        flat = counts.flatten()
        order = torch.argsort(flat, descending=True, stable=True)[:top]
        k = counts.shape[1]
        return [{a: classes[int(i) // k], b: classes[int(i) % k], "count": int(flat[i])} for i in order
                if flat[i] > 0]

    return {"confused": ranked(confused, "true", "predicted"),
            "missed_alongside": ranked(alongside, "missed", "alongside"),
            "per_class": [{"class": c, "missed": int(m), "false_alarms": int(f)}
                          for c, m, f in zip(classes, missed.sum(0), spurious.sum(0), strict=True)]}
