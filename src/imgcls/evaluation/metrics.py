"""Classification metrics computed from logits and labels (plain tensors in, plain data out)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return (top == labels[:, None]).any(dim=1).float().mean().item()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Accuracy, top-5 (5 or more classes), loss, per-class P/R/F1 and the confusion matrix."""
    preds = logits.argmax(dim=1)
    cm = confusion_matrix(preds, labels, len(classes))
    report = per_class_report(cm, classes)
    out = {
        "n": len(labels),
        "accuracy": (preds == labels).float().mean().item(),
        "loss": F.cross_entropy(logits.float(), labels).item(),
        "macro_f1": sum(r["f1"] for r in report) / len(report),
    }
    if len(classes) >= 5:
        out["top5_accuracy"] = topk_accuracy(logits, labels, 5)
    out["per_class"] = report
    out["classes"] = classes
    out["confusion_matrix"] = cm.tolist()
    return out
