"""Saying "unknown": the rule that turns a prediction's calibrated top-1 probability into a label or
`unknown`, and the scores an out-of-distribution check reads.

A prediction is accepted when its top-1 probability is at least the threshold. `imgcls calibrate` stores
the validation risk-coverage curve (evaluation/rejection.py) in calibration.json; `--reject auto` picks
the threshold from that curve, never from test.
"""

from __future__ import annotations

import torch

from imgcls.errors import UserError
from imgcls.options import DEFAULT_TARGET_ACCURACY


def curve_problem(curve) -> str | None:
    """What is wrong with a stored risk-coverage curve, or None: equally long threshold, coverage and accuracy
    lists of numbers in [0, 1], thresholds falling and coverage rising to 1 (every image accepted last)."""
    if not isinstance(curve, dict):
        return "is not a mapping"
    lists = [curve.get(k) for k in ("threshold", "coverage", "accuracy")]
    if not all(isinstance(v, list) and v for v in lists) or len({len(v) for v in lists}) != 1:
        return "needs equally long, non-empty threshold, coverage and accuracy lists"
    for name, values in zip(("threshold", "coverage", "accuracy"), lists, strict=True):
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1 for v in values):
            return f"has a {name} that is not a number in [0, 1]"
    n = curve.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10**9):
        return "has an image count n that is not a whole number from 1 to 1e9"
    thresholds, coverage = lists[0], lists[1]
    if any(a < b for a, b in zip(thresholds, thresholds[1:], strict=False)) or \
            any(a > b for a, b in zip(coverage, coverage[1:], strict=False)) or abs(coverage[-1] - 1) > 1e-9:
        return "is not ordered (thresholds falling, coverage rising to 1)"
    return None


def default_rule(curve: dict | None) -> dict | None:
    """--reject auto at the default target on `curve`; None without a curve or when the target is out of reach."""
    try:
        return choose_threshold(curve) if curve else None
    except UserError:
        return None


def choose_threshold(curve: dict, target_accuracy: float | None = None, coverage: float | None = None) -> dict:
    """The threshold that keeps the most images while their validation accuracy is at least
    `target_accuracy`, or the highest that still accepts at least `coverage` of them."""
    thresholds, coverages, accuracies = curve["threshold"], curve["coverage"], curve["accuracy"]
    if not thresholds:
        raise UserError("the stored risk-coverage curve is empty; run imgcls calibrate RUN again")
    if coverage is not None:
        if not 0 < coverage <= 1:
            raise UserError(f"--coverage {coverage} is not a share; pass a number in (0, 1], e.g. 0.8")
        i = next((i for i, c in enumerate(coverages) if c >= coverage - 1e-12), len(coverages) - 1)
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
    if reject is None or reject == "off":
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
        raise UserError(f"--reject {reject} is neither auto, off nor a probability; pass auto, off or a number "
                        "in [0, 1]")
    return value


def energy(logits: torch.Tensor) -> torch.Tensor:
    """Negative free energy, logsumexp of the logits (Liu et al., 2020): higher means more in-distribution."""
    return torch.logsumexp(logits.double(), dim=1)
