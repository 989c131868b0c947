"""Saying "unknown": the rule that turns a prediction's calibrated top-1 probability into a label or
`unknown`, and the scores an out-of-distribution check reads.

A prediction is accepted when its top-1 probability is at least the threshold. `imgcls calibrate` stores
the validation risk-coverage curve (evaluation/rejection.py) in calibration.json; `--reject auto` picks
the threshold from that curve, never from test.
"""

from __future__ import annotations

import torch

from imgcls.errors import UserError

DEFAULT_TARGET_ACCURACY = 0.95


def choose_threshold(curve: dict, target_accuracy: float | None = None, coverage: float | None = None) -> dict:
    """The threshold that keeps the most images while their validation accuracy is at least
    `target_accuracy`, or the highest that still accepts at least `coverage` of them."""
    thresholds, coverages, accuracies = curve["threshold"], curve["coverage"], curve["accuracy"]
    if not thresholds:
        raise UserError("the stored risk-coverage curve is empty; run imgcls calibrate RUN again")
    if coverage is not None:
        if not 0 < coverage <= 1:
            raise UserError(f"--coverage {coverage} is not a share; pass a number in (0, 1], e.g. 0.8")
        i = next(i for i, c in enumerate(coverages) if c >= coverage - 1e-12)
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
