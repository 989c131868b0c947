"""Calibration: how far confidence is from accuracy, and post-hoc fixes fitted on validation.

Metrics take probabilities, not logits, so that test-time augmentation (which averages
probabilities over views) is measured the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BINS = 15


def _bin_index(confidence: torch.Tensor, bins: int) -> torch.Tensor:
    """Equal-width bins over [0, 1]; a confidence of exactly 1.0 falls in the last bin."""
    return (confidence * bins).long().clamp(0, bins - 1)


def _bin_sums(confidence: torch.Tensor, hit: torch.Tensor, bins: int):
    """Per bin: (count, sum of confidences, sum of hits), in float64."""
    index = _bin_index(confidence, bins)
    count = torch.bincount(index, minlength=bins).double()
    conf_sum = torch.bincount(index, weights=confidence.double(), minlength=bins)
    hit_sum = torch.bincount(index, weights=hit.double(), minlength=bins)
    return count, conf_sum, hit_sum


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> dict:
    """Per bin of top-1 confidence: count, mean confidence and accuracy (NaN for empty bins)."""
    confidence, predicted = probs.max(dim=1)
    count, conf_sum, acc_sum = _bin_sums(confidence, predicted == labels, bins)
    return {"edges": torch.linspace(0, 1, bins + 1).tolist(), "count": count.long().tolist(),
            "confidence": (conf_sum / count).tolist(), "accuracy": (acc_sum / count).tolist()}


def _calibration_gaps(confidence: torch.Tensor, hit: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(|accuracy - confidence| per bin, fraction of samples per bin)."""
    count, conf_sum, hit_sum = _bin_sums(confidence, hit, bins)
    gap = torch.where(count > 0, (conf_sum - hit_sum).abs() / count.clamp(min=1), torch.zeros_like(count))
    return gap, count / len(confidence)


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    confidence, predicted = probs.max(dim=1)
    gap, weight = _calibration_gaps(confidence, predicted == labels, bins)
    return (gap * weight).sum().item()


def maximum_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """The largest gap over non-empty bins."""
    confidence, predicted = probs.max(dim=1)
    gap, weight = _calibration_gaps(confidence, predicted == labels, bins)
    return gap[weight > 0].max().item()


def classwise_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> float:
    """Classwise ECE (Kull et al., 2019): every class's probability binned against whether the label
    is that class, averaged over classes."""
    errors = []
    for k in range(probs.shape[1]):
        gap, weight = _calibration_gaps(probs[:, k], labels == k, bins)
        errors.append((gap * weight).sum())
    return torch.stack(errors).mean().item()


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return -probs.gather(1, labels[:, None]).clamp(min=1e-12).log().mean().item()


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over samples of the squared distance between the probabilities and the one-hot label."""
    return ((probs - F.one_hot(labels, probs.shape[1]).to(probs.dtype)) ** 2).sum(dim=1).mean().item()


def calibration_metrics(probs: torch.Tensor, labels: torch.Tensor, bins: int = BINS) -> dict:
    probs = probs.double()
    return {
        "accuracy": (probs.argmax(1) == labels).double().mean().item(),
        "nll": negative_log_likelihood(probs, labels),
        "ece": expected_calibration_error(probs, labels, bins),
        "mce": maximum_calibration_error(probs, labels, bins),
        "classwise_ece": classwise_calibration_error(probs, labels, bins),
        "brier": brier_score(probs, labels),
    }


@dataclass
class Scaling:
    """logits -> logits * scale + bias, with one scale (temperature scaling: scale = 1/T, no bias)
    or one scale and bias per class (vector scaling)."""

    method: str  # "temperature" or "vector"
    scale: list[float]
    bias: list[float]

    @property
    def temperature(self) -> float | None:
        return 1.0 / self.scale[0] if self.method == "temperature" else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.scale, dtype=logits.dtype, device=logits.device)
        bias = torch.tensor(self.bias, dtype=logits.dtype, device=logits.device)
        return logits * scale + bias

    def as_dict(self) -> dict:
        return {"method": self.method, "temperature": self.temperature, "scale": self.scale, "bias": self.bias}

    @classmethod
    def from_dict(cls, d: dict) -> Scaling:
        return cls(d["method"], d["scale"], d["bias"])


def fit_scaling(logits: torch.Tensor, labels: torch.Tensor, method: str = "temperature") -> Scaling:
    """Minimise the NLL of `logits` (validation, never test) by L-BFGS over the scaling's parameters."""
    # Clones are normal tensors even when the inputs were made under inference_mode.
    logits, labels = logits.detach().double().clone(), labels.clone()
    classes = logits.shape[1]
    n_scale = 1 if method == "temperature" else classes
    log_scale = torch.zeros(n_scale, dtype=torch.float64, requires_grad=True)  # scale = exp(.) stays positive
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=method == "vector")
    params = [log_scale, bias] if method == "vector" else [log_scale]
    optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(logits * log_scale.exp() + bias, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    scale = log_scale.detach().exp()
    return Scaling(method, scale.tolist(), bias.detach().tolist() if method == "vector" else [0.0] * classes)
