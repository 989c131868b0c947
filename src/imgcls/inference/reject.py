"""Saying "unknown": the rule that turns a prediction's calibrated top-1 probability into a label or
`unknown`, and the scores an out-of-distribution check reads.

A prediction is accepted when its top-1 probability is at least the threshold. `imgcls calibrate` stores
the validation risk-coverage curve (evaluation/rejection.py) in calibration.json; `--reject auto` picks
the threshold from that curve, never from test, so that the accepted images' accuracy is at least the
target with a stated confidence (a binomial bound, not the accuracy seen on val, which overstates it).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.stats import beta

from imgcls.errors import UserError
from imgcls.options import DEFAULT_CONFIDENCE, DEFAULT_TARGET_ACCURACY, decimal


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
    return None if n is None else _count_problem(n, coverage, lists[2])


def _count_problem(n: int, coverage: list, accuracy: list) -> str | None:
    """Counts behind the shares: each point accepts a whole number of the n images and gets a whole number of
    them right, and from one point to the next no more become right than were added (a curve edited to
    read 100% everywhere fails here)."""
    accepted = [c * n for c in coverage]
    right = [a * m for a, m in zip(accuracy, accepted, strict=True)]
    if any(abs(v - round(v)) > 1e-6 * n for v in accepted + right):
        return f"has shares that are not counts of its n = {n} images"
    steps = zip(accepted, accepted[1:], right, right[1:], strict=False)
    if any(not -0.5 <= r1 - r0 <= m1 - m0 + 0.5 for m0, m1, r0, r1 in steps):
        return "has counts of right images that fall, or grow by more than the images it adds, between two points"
    return None


def default_rule(curve: dict | None) -> dict | None:
    """--reject auto at the default target on `curve`; None without a curve or when the target is out of reach."""
    try:
        return choose_threshold(curve) if curve else None
    except UserError:
        return None


def _check_share(flag: str, value: float, example: str) -> None:
    """A share in (0, 1], in float64 and in float32 too (1e-50 is a share there but 0 here), as every float
    option is checked."""
    if not 0 < value <= 1 or float(np.float32(value)) == 0:
        raise UserError(f"{flag} {value} is not a share (0 in float32 or outside (0, 1]); pass a number in (0, 1], "
                        f"e.g. {example}")


def risk_bound(errors: int, accepted: int, confidence: float) -> float:
    """Clopper-Pearson upper bound on the error rate of `accepted` images of which `errors` were wrong: the
    true rate is below it with probability `confidence`."""
    if errors >= accepted:
        return 1.0
    return float(beta.ppf(confidence, errors + 1, accepted - errors))


def _bounded_index(curve: dict, target: float, confidence: float) -> tuple[int, float] | None:
    """Selection with guaranteed risk (Geifman and El-Yaniv, 2017): a binary search over the curve's points
    (coverage rising) for the widest whose upper bound on the error stays under 1 - target, each of its
    ceil(log2(points + 1)) tests at (1 - confidence) / tests, so that the whole choice holds with `confidence`
    (a union bound over the tests). (index, bound), or None when no point tested can show the target."""
    points, n = len(curve["threshold"]), curve["n"]
    tests = math.ceil(math.log2(points + 1))
    level = 1 - (1 - confidence) / tests

    def bound(i: int) -> float:
        accepted = max(1, round(curve["coverage"][i] * n))
        return risk_bound(round((1 - curve["accuracy"][i]) * accepted), accepted, level)

    low, high, best = 0, points - 1, None
    while low <= high:  # at most `tests` steps
        middle = (low + high + 1) // 2
        b = bound(middle)
        if b <= 1 - target:
            best, low = (middle, b), middle + 1
        else:
            high = middle - 1
    return best


def choose_threshold(curve: dict, target_accuracy: float | None = None, coverage: float | None = None,
                     confidence: float = DEFAULT_CONFIDENCE) -> dict:
    """The threshold that keeps the most validation images while their accuracy is at least `target_accuracy`
    with probability `confidence` (a binomial bound: `_bounded_index`), or the highest that still accepts at
    least `coverage` of them."""
    thresholds, coverages, accuracies = curve["threshold"], curve["coverage"], curve["accuracy"]
    if not thresholds:
        raise UserError("the stored risk-coverage curve is empty; run imgcls calibrate RUN again")
    bound = None
    if coverage is not None:
        _check_share("--coverage", coverage, "0.8")
        i = next((i for i, c in enumerate(coverages) if c >= coverage - 1e-12), len(coverages) - 1)
    else:
        target = DEFAULT_TARGET_ACCURACY if target_accuracy is None else target_accuracy
        _check_share("--target-accuracy", target, "0.95")
        if not isinstance(curve.get("n"), int):
            raise UserError("the stored risk-coverage curve does not say how many images it counts (made by an "
                            "older imgcls); run imgcls calibrate RUN again")
        found = _bounded_index(curve, target, confidence)
        if found is None:
            raise UserError(f"no threshold shows accuracy {target} on the {curve['n']} validation images with "
                            f"{confidence:.0%} confidence (seen at best: {max(accuracies):.3f}, on too few images to "
                            "show it); add validation images, lower --target-accuracy or use --coverage")
        i, bound = found
    return {"threshold": thresholds[i], "coverage": coverages[i], "accuracy": accuracies[i],
            "target_accuracy": None if coverage is not None else (target_accuracy or DEFAULT_TARGET_ACCURACY),
            "target_coverage": coverage, "confidence": None if bound is None else confidence,
            "accuracy_bound": None if bound is None else 1 - bound}


def resolve_threshold(reject: str | None, curve: dict | None, target_accuracy: float | None = None,
                      coverage: float | None = None) -> float | None:
    """`--reject`: None (accept everything), 'auto' (chosen on validation) or a probability."""
    if reject is None or reject == "off":
        if target_accuracy is not None or coverage is not None:
            raise UserError("--target-accuracy and --coverage choose the --reject auto threshold; add --reject auto")
        return None
    if target_accuracy is not None and coverage is not None:
        raise UserError("--target-accuracy and --coverage are two ways to choose the --reject auto threshold; give "
                        "one of them")
    if reject != "auto" and (target_accuracy is not None or coverage is not None):
        given = "--target-accuracy" if target_accuracy is not None else "--coverage"
        raise UserError(f"{given} chooses the --reject auto threshold; --reject {reject} is a threshold already: drop "
                        f"{given}, or pass --reject auto")
    if reject == "auto":
        if curve is None:
            raise UserError("--reject auto needs the validation risk-coverage curve; run imgcls calibrate RUN "
                            "first (and export again), or pass a threshold such as --reject 0.8 (a run trained "
                            "with --val-fraction 0 has no validation split, so only a threshold works)")
        return choose_threshold(curve, target_accuracy, coverage)["threshold"]
    try:
        value = decimal(reject)  # float() would also read '0.5_0' and full-width digits
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise UserError(f"--reject {reject} is neither auto, off nor a probability; pass auto, off or a number "
                        "in [0, 1]")
    return value


def energy(logits: torch.Tensor) -> torch.Tensor:
    """Negative free energy, logsumexp of the logits (Liu et al., 2020): higher means more in-distribution."""
    return torch.logsumexp(logits.double(), dim=1)
