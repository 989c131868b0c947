"""The calibration the engine applies: logits * scale + bias before the softmax, fitted by `imgcls
calibrate` (evaluation/calibration.py) and stored in the run's calibration.json and in its exports."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from imgcls.errors import UserError

# Temperatures a real network can have. Over-confident CNNs and ViTs are fitted at about 1-3 (Guo et
# al., 2017); at 20 a logit gap of 20 means nothing, at 0.05 every prediction is certain. A fit
# outside says the validation split could not pin the temperature down, not that the model needs it.
TEMPERATURE_RANGE = (0.05, 20.0)


@dataclass
class Scaling:
    """logits -> logits * scale + bias, with one scale (temperature scaling: scale = 1/T, no bias)
    or one scale and bias per class (vector scaling). A multi-label model's sigmoids are scaled per label:
    one temperature per label (`temperature` with a scale per class, no bias) or Platt scaling (`platt`)."""

    method: str  # "temperature", "vector" or (multi-label) "platt"
    scale: list[float]
    bias: list[float]

    @property
    def temperature(self) -> float | None:
        """The one temperature of a temperature scaling; None for the other kinds (per-label ones included)."""
        return 1.0 / self.scale[0] if self.method == "temperature" and len(self.scale) == 1 else None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor(self.scale, dtype=logits.dtype, device=logits.device)
        bias = torch.tensor(self.bias, dtype=logits.dtype, device=logits.device)
        return logits * scale + bias

    def carry(self, thresholds: torch.Tensor) -> torch.Tensor:
        """Per-label thresholds on a multi-label model's uncalibrated probabilities, carried into this scaling's:
        each label's scale is positive, so an image is above its carried threshold exactly when it was above the
        original one."""
        return self.apply(torch.logit(thresholds.double(), eps=1e-12).view(1, -1)).sigmoid().view(-1)

    def as_dict(self) -> dict:
        return {"method": self.method, "temperature": self.temperature, "scale": self.scale, "bias": self.bias}

    @classmethod
    def identity(cls, num_classes: int) -> Scaling:
        return cls("temperature", [1.0], [0.0] * num_classes)


def scaling_problem(scaling: Scaling) -> str | None:
    """What makes a scaling implausible (a non-finite parameter, a temperature outside
    TEMPERATURE_RANGE), or None."""
    values = [*scaling.scale, *scaling.bias]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        return "has non-finite parameters (the model's outputs were not finite)"
    low, high = TEMPERATURE_RANGE
    temperatures = [1.0 / s if s > 0 else math.inf for s in scaling.scale]
    outside = [t for t in temperatures if not low <= t <= high]
    if outside:
        what = "temperature" if scaling.method == "temperature" else "per-class temperature"
        return f"has a {what} of {outside[0]:.4g}, outside the plausible {low:g}-{high:g}"
    return None


def parse_scaling(d, num_classes: int, where: str, fix: str, multilabel: bool = False) -> Scaling:
    """A stored scaling ({method, scale, bias}) for `num_classes` classes of a multiclass (softmax) or a
    `multilabel` (sigmoid) model, checked as when it was fitted; one line naming `where` and `fix` otherwise."""
    try:
        scaling = Scaling(d["method"], list(d["scale"]), list(d["bias"]))
    except (KeyError, TypeError):  # not a dict, a key missing, or numbers where lists belong
        raise UserError(f"{where} holds no valid scaling (method, scale, bias); {fix}") from None
    expected = ({"temperature": (num_classes, num_classes), "platt": (num_classes, num_classes)} if multilabel else
                {"temperature": (1, num_classes), "vector": (num_classes, num_classes)}).get(scaling.method)
    if (len(scaling.scale), len(scaling.bias)) != expected:
        raise UserError(f"{where} holds a scaling for another method or number of classes than the model's "
                        f"{num_classes}; {fix}")
    problem = scaling_problem(scaling) or _method_problem(scaling, d.get("temperature"))
    if problem:
        raise UserError(f"the scaling in {where} {problem}; {fix}")
    return scaling


def _method_problem(scaling: Scaling, temperature) -> str | None:
    """A temperature scaling (one, or one per label) has no bias (a bias would change predictions, which a
    temperature never does), and its stored temperature, when there is one, is 1/scale; the per-class kinds
    (vector, Platt, per-label temperatures) store none."""
    if scaling.method == "temperature" and any(b != 0 for b in scaling.bias):
        return "is a temperature scaling with a non-zero bias: a temperature has none"
    if scaling.temperature is None:
        return None if temperature is None else f"is a per-class {scaling.method} scaling with one temperature: " \
                                                "it has none"
    if temperature is None:  # not written by every imgcls: then the scale alone says it
        return None
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or \
            not math.isclose(temperature, scaling.temperature, rel_tol=1e-9):
        return f"gives a temperature {str(temperature)[:20]} that is not 1/scale ({scaling.temperature:.6g})"
    return None
