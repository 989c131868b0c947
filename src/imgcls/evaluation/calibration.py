"""Calibration: how far confidence is from accuracy, and post-hoc fixes fitted on validation.

Metrics take probabilities, not logits, so that test-time augmentation (which averages
probabilities over views) is measured the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from imgcls.errors import UserError
from imgcls.inference.scaling import Scaling, scaling_problem

BINS = 15
# Fewest validation images of every class a scaling may be fitted on. Fitting is a logistic regression
# on the logits, and the usual rule for those is about ten outcomes per fitted parameter (Peduzzi et
# al., 1996). Vector scaling fits two parameters per class (a scale and a bias), so it needs twenty
# images of each class. One temperature is a single parameter; ten of each class (at least twenty in all)
# keep every class represented. Below that a single image moves the fit, and a split whose images are
# all right (or all wrong) has no finite optimum: a temperature of 164,328 was fitted on a handful.
MIN_PER_CLASS = {"temperature": 10, "vector": 20}


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


def check_calibration_data(labels: torch.Tensor, num_classes: int, class_names: list[str] | None = None,
                           logits: torch.Tensor | None = None, method: str = "temperature") -> None:
    """Refuse (UserError) to fit a `method` scaling on validation labels with a class absent or under
    MIN_PER_CLASS[method] images: what is fitted there would be noise, applied to every later prediction.
    Given the `logits`, also refuse when every image is classified right: the NLL then falls all the
    way to a temperature of 0, and the fit stops wherever L-BFGS gives up."""
    names = class_names or [f"class {k}" for k in range(num_classes)]
    counts = torch.bincount(labels.long().flatten(), minlength=num_classes)[:num_classes].tolist()
    least = MIN_PER_CLASS[method]
    fix = (f"{method} scaling needs at least {least} validation images of every class: give the data a val/ "
           "folder with more images, or train again with a larger --val-fraction")
    absent = [names[k] for k, n in enumerate(counts) if n == 0]
    if absent:
        more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
        raise UserError(f"the validation split has no images of '{absent[0]}'{more}; {fix}")
    fewest = min(range(num_classes), key=lambda k: counts[k])
    if counts[fewest] < least:
        raise UserError(f"the validation split has only {counts[fewest]} images of '{names[fewest]}' "
                        f"({sum(counts)} in all); {fix}")
    if logits is not None and bool((logits.argmax(1) == labels).all()):
        raise UserError(f"every one of the {len(labels)} validation images is classified right, so no temperature "
                        "fits them (the loss falls towards 0 as it does); calibrate on a larger validation split "
                        "that holds some mistakes, or use the run uncalibrated")


def check_scaling(scaling: Scaling) -> None:
    """Refuse (UserError) a scaling just fitted on validation that `scaling_problem` finds implausible."""
    problem = scaling_problem(scaling)
    if problem:
        raise UserError(f"the {scaling.method} scaling fitted on the validation split {problem}: its images are too "
                        "few, or all classified alike (all right or all wrong), to fit it; nothing was stored: "
                        "calibrate with more validation data, or use the run uncalibrated")


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


# ---------------------------------------------------------------- multi-label: each label its own sigmoid
# The per-label fits, each on one label's validation positives and negatives: a per-label temperature
# fits one parameter per label and Platt scaling two (a scale and a bias), so by the same ten-outcomes
# rule each label needs ten (twenty) validation images with it and as many without it.
MIN_PER_LABEL = {"temperature": 10, "platt": 20}
MULTILABEL_METHODS = tuple(MIN_PER_LABEL)


def multilabel_calibration_metrics(probs: torch.Tensor, targets: torch.Tensor, bins: int = BINS) -> dict:
    """Each label's sigmoid probability against whether the image has that label: its ECE (equal-width bins),
    their mean and largest; the NLL (binary cross-entropy) and Brier score (squared error), both averaged over
    every image and label."""
    probs, truth = probs.double(), targets > 0.5
    per_class = []
    for k in range(probs.shape[1]):
        gap, weight = _calibration_gaps(probs[:, k], truth[:, k], bins)
        per_class.append((gap * weight).sum().item())
    p = probs.clamp(1e-12, 1 - 1e-12)
    nll = -torch.where(truth, p.log(), (1 - p).log()).mean().item()
    return {"ece": sum(per_class) / len(per_class), "max_class_ece": max(per_class), "nll": nll,
            "brier": ((probs - truth.double()) ** 2).mean().item(), "per_class_ece": per_class}


def check_multilabel_calibration_data(logits: torch.Tensor, targets: torch.Tensor, classes: list[str],
                                      method: str) -> None:
    """Refuse (UserError) a per-label fit on validation labels where some label has fewer than
    MIN_PER_LABEL[method] images with it or without it, or where the logits separate one label's images
    perfectly (its temperature would fall towards 0 without end)."""
    truth = targets > 0.5
    least = MIN_PER_LABEL[method]
    fix = (f"per-label {method} scaling needs at least {least} validation images with and {least} without every "
           "label: give the data more validation images (a larger --val-fraction, or more rows with split val)")
    for k, name in enumerate(classes):
        with_it, without = int(truth[:, k].sum()), int((~truth[:, k]).sum())
        if min(with_it, without) < least:
            raise UserError(f"the validation split has {with_it} images with '{name}' and {without} without it; {fix}")
        if logits[truth[:, k], k].min() > logits[~truth[:, k], k].max():
            raise UserError(f"the model separates every validation image with '{name}' from every one without it, so "
                            "no temperature fits that label (it falls towards 0); calibrate on a larger validation "
                            "split that holds some mistakes, or use the run uncalibrated")


def fit_multilabel_scaling(logits: torch.Tensor, targets: torch.Tensor, method: str = "temperature") -> Scaling:
    """Per label, minimise the binary cross-entropy of `logits` (validation, never test) over a scale (a per-label
    temperature, `temperature`) or a scale and a bias (Platt scaling, `platt`), by L-BFGS; the labels are
    independent, so one optimisation over all of them finds each one's own optimum."""
    logits, targets = logits.detach().double().clone(), targets.detach().double().clone()
    classes = logits.shape[1]
    log_scale = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=method == "platt")
    params = [log_scale, bias] if method == "platt" else [log_scale]
    optimizer = torch.optim.LBFGS(params, lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        # summed over labels, averaged over images: each label's gradient is its own mean loss's
        loss = F.binary_cross_entropy_with_logits(logits * log_scale.exp() + bias, targets, reduction="none")
        loss = loss.mean(0).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return Scaling(method, log_scale.detach().exp().tolist(), bias.detach().tolist())


def label_reliability_bins(probs: torch.Tensor, targets: torch.Tensor, bins: int = BINS) -> dict:
    """reliability_bins for a multi-label model, every (image, label) pair pooled: per bin of the predicted
    probability, the count, the mean probability and the share of pairs where the image has the label."""
    p, truth = probs.double().flatten(), (targets > 0.5).flatten()
    count, conf_sum, hit_sum = _bin_sums(p, truth, bins)
    return {"edges": torch.linspace(0, 1, bins + 1).tolist(), "count": count.long().tolist(),
            "confidence": (conf_sum / count).tolist(), "accuracy": (hit_sum / count).tolist()}
