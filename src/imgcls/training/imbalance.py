"""Imbalanced classes: per-class loss weights, focal loss, and epoch orders that rebalance classes.

The loss takes soft targets (Mixup, CutMix and label smoothing make them), so class weights act per
target class: loss_i = -sum_k w_k t_ik log p_ik, averaged over the batch (torch's cross_entropy with
probability targets and a `weight`). The samplers turn one seeded generator into the epoch's order,
so exact resume and each torchrun rank's share work as with the plain permutation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from imgcls.config import TrainConfig, parse_class_weights
from imgcls.errors import UserError, first_line
from imgcls.rundir import strict_json

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(labels, minlength=num_classes).double()


def _normalised(weights: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Scaled so that the average training image weighs 1: sum_k w_k n_k = N."""
    return (weights * counts.sum() / (weights * counts).sum()).float()


def class_weights(spec: str, labels: torch.Tensor, classes: list[str]) -> torch.Tensor | None:
    """The weight of each class for `--class-weights spec`, from the training labels; None for 'none'."""
    parsed, counts = parse_class_weights(spec), class_counts(labels, len(classes))
    if parsed == "none":
        return None
    if parsed == "auto":  # inverse frequency; a class absent from train gets no weight (it has no images)
        return _normalised(torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts)), counts)
    if isinstance(parsed, float):  # Cui et al. 2019: (1 - beta) / (1 - beta^n)
        effective = (1.0 - parsed) / (1.0 - parsed ** counts.clamp(min=1))
        return _normalised(torch.where(counts > 0, effective, torch.zeros_like(counts)), counts)
    weights = _read_weights_file(parsed, classes) if isinstance(parsed, Path) else parsed
    if len(weights) != len(classes):
        raise UserError(f"--class-weights gives {len(weights)} weights for {len(classes)} classes "
                        f"({', '.join(classes)}); give one per class")
    # Given weights are scaled as the computed ones: probability targets make the loss grow with the weights
    # (1e38 each overflowed it, and 10 each was ten times the learning rate), so only their ratios may matter.
    given = torch.tensor(weights, dtype=torch.float64)
    return usable_weights(_normalised(given / given.max(), counts), spec)


def usable_weights(weights: torch.Tensor, spec: str) -> torch.Tensor:
    """The weights as the loss uses them (float32): refused when a weight became infinite or every one 0 in
    the conversion (1e39 overflows, 1e-50 underflows): the loss would be infinite, or 0 with nothing learned."""
    if not bool(torch.isfinite(weights).all()):
        raise UserError(f"--class-weights {spec}: a weight is beyond float32's range (about 3.4e38), the precision "
                        "the loss computes in; scale the weights down (only their ratios matter)")
    if not bool((weights > 0).all()):
        raise UserError(f"--class-weights {spec}: a weight is 0 in float32, the precision the loss computes in "
                        "(below about 1e-45 is 0), so its class would never be learned; scale the weights up (only "
                        "their ratios matter)")
    if not bool((weights >= torch.finfo(torch.float32).tiny).all()):
        raise UserError(f"--class-weights {spec}: once scaled, a weight is below float32's normal range (about "
                        "1.2e-38: a ratio of 1e38 or more to the others), so its class would in effect never be "
                        "learned; give weights closer together")
    return weights


def _read_weights_file(path: Path, classes: list[str]) -> list[float]:
    try:
        mapping = strict_json(path.read_text())
    except (OSError, ValueError) as e:
        why = first_line(e)
        raise UserError(f"cannot read class weights from {path} ({why}); pass a JSON object of class: weight") \
            from None
    if not isinstance(mapping, dict) or set(mapping) != set(classes):
        have = sorted(mapping) if isinstance(mapping, dict) else type(mapping).__name__
        raise UserError(f"{path} must map every class ({', '.join(classes)}) to a weight, and nothing else "
                        f"(found {have})")
    values = []
    for c in classes:
        v = mapping[c]
        try:  # as a float first: a JSON integer of 400 digits is no float
            number = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan
        except OverflowError:
            number = math.inf
        if not 0 < number < math.inf:
            raise UserError(f"{path}: the weight of {c!r} is {str(v)[:20]!r}; class weights must be finite, positive "
                            "numbers (a weight of 0 means a class is never learned; to drop a class, remove its "
                            "images)")
        values.append(number)
    return values


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax focal loss (Lin et al., 2017) for soft targets: -sum_k w_k t_k (1 - p_k)^gamma log p_k, averaged.

    Written here because torchvision's sigmoid_focal_loss is the one-vs-rest (sigmoid) form, and timm
    and torch have no softmax one."""
    log_p = F.log_softmax(logits.float(), dim=1)
    per_class = -targets * (1.0 - log_p.exp()).pow(gamma) * log_p
    if weight is not None:
        per_class = per_class * weight.to(per_class.device)
    return per_class.sum(dim=1).mean()


MAX_POS_WEIGHT = 100.0  # a label on 1 image in 10,000 would otherwise weigh its positives 10,000 times


def positive_weights(targets: torch.Tensor) -> torch.Tensor:
    """--pos-weight auto: per class, its negative images over its positive ones in train (capped; 1 for a class
    with no positive image, which has nothing to weigh)."""
    positives = targets.double().sum(dim=0)
    negatives = len(targets) - positives
    ratio = torch.where(positives > 0, negatives / positives.clamp(min=1), torch.ones_like(positives))
    return ratio.clamp(min=1.0 / MAX_POS_WEIGHT, max=MAX_POS_WEIGHT).float()


def make_loss(cfg: TrainConfig, weights: torch.Tensor | None) -> Loss:
    """The training loss of a run: cross-entropy or focal with its class weights; for a multi-label run binary
    cross-entropy per class (averaged over classes and images), `weights` then weighing each class's positives."""
    if cfg.task == "multilabel":
        def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            w = None if weights is None else weights.to(logits.device)
            return F.binary_cross_entropy_with_logits(logits.float(), targets, pos_weight=w)

        return binary_cross_entropy
    if cfg.loss == "focal":
        return lambda logits, targets: focal_loss(logits, targets, cfg.focal_gamma, weights)

    def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        w = None if weights is None else weights.to(logits.device)
        return F.cross_entropy(logits.float(), targets, weight=w)

    return cross_entropy


def epoch_order(sampler: str, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The epoch's order of training indices, len(labels) long, drawn from `gen` alone.

    uniform: a permutation. balanced: each draw picks a class uniformly, then an image of it (with
    replacement). sqrt: classes in proportion to the square root of their size."""
    if sampler == "uniform":
        return torch.randperm(len(labels), generator=gen)
    counts = class_counts(labels, int(labels.max()) + 1)[labels]
    per_image = 1.0 / counts if sampler == "balanced" else 1.0 / counts.sqrt()
    return torch.multinomial(per_image, len(labels), replacement=True, generator=gen)
