"""Calibration metrics from logits: expected calibration error and friends."""

from __future__ import annotations

import torch


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE with equal-width confidence bins; a confidence of exactly 1.0 falls in the last bin."""
    probs = logits.float().softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    index = (confidence * bins).long().clamp(max=bins - 1)
    conf_sum = torch.bincount(index, weights=confidence, minlength=bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=bins)
    return ((conf_sum - acc_sum).abs().sum() / len(labels)).item()
