"""Classification metrics from class probabilities and labels (plain tensors in, plain data out)."""

from __future__ import annotations

import torch

from imgcls.evaluation.calibration import negative_log_likelihood


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Rows are true classes, columns predicted classes."""
    flat = labels * num_classes + preds
    return torch.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def per_class_report(cm: torch.Tensor, classes: list[str]) -> list[dict]:
    tp = cm.diag().double()
    predicted, support = cm.sum(0).double(), cm.sum(1).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-12), torch.zeros_like(tp))
    columns = zip(classes, precision.tolist(), recall.tolist(), f1.tolist(), support.tolist(), strict=True)
    return [{"class": c, "precision": p, "recall": r, "f1": f, "support": int(s)} for c, p, r, f, s in columns]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).double().mean().item()


def most_confused(cm: torch.Tensor, classes: list[str], n: int = 5) -> list[dict]:
    """The off-diagonal cells with the most images: which true class is taken for which."""
    off = cm.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().sort(descending=True, stable=True)  # ties in class order
    k = len(classes)
    return [{"true": classes[i // k], "predicted": classes[i % k], "count": c}
            for c, i in zip(counts.tolist()[:n], flat.tolist()[:n], strict=True) if c > 0]


def balanced_accuracy(cm: torch.Tensor) -> float:
    """Mean recall over the classes present (support > 0): what accuracy would be if every class had
    as many images; a class absent from the split has no recall and is left out rather than counted as 0."""
    support = cm.sum(1)
    present = support > 0
    recall = cm.diag()[present].double() / support[present].double()
    return recall.mean().item()


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, top-5 (5 or more classes), NLL, per-class P/R/F1, the
    confusion matrix and its most-confused pairs, from class probabilities."""
    preds = probs.argmax(dim=1)
    cm = confusion_matrix(preds, labels, len(classes))
    report = per_class_report(cm, classes)
    out = {
        "n": len(labels),
        "accuracy": (preds == labels).double().mean().item(),
        "balanced_accuracy": balanced_accuracy(cm),
        "loss": negative_log_likelihood(probs, labels),
        "macro_f1": sum(r["f1"] for r in report) / len(report),
    }
    if len(classes) >= 5:
        out["top5_accuracy"] = topk_accuracy(probs, labels, 5)
    out["per_class"] = report
    out["classes"] = classes
    out["confusion_matrix"] = cm.tolist()
    out["most_confused"] = most_confused(cm, classes)
    return out
