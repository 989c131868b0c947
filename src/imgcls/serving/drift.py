"""Drift: the scores of the images served lately against the same scores on the validation split.

Two scores are watched, the calibrated top-1 probability (max-softmax) and the energy (logsumexp of the
logits, inference/reject.py), each as PSI over ten validation-quantile bins and as the Kolmogorov-Smirnov
distance; and the share of images under the reject threshold, served against validation. Only images
scored without TTA count: the reference is the plain view's.

Where the reference comes from (service.py): a run's validation split, scored by the serving engine when
the server starts (both scores); for an export, the validation risk-coverage curve `imgcls calibrate`
stored in it, which is the distribution of validation top-1 probabilities at up to 1000 thresholds
(confidence only: an export carries no energies).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

PSI_BINS = 10
PSI_FLOOR = 1e-4  # an empty bin's share, so that PSI stays finite (a common convention)
SCORES = ("confidence", "energy")


@dataclass(frozen=True)
class Reference:
    """One score's validation distribution: sorted values, each with its share (the shares sum to 1)."""

    values: np.ndarray
    weights: np.ndarray

    @classmethod
    def of_sample(cls, values) -> Reference:
        values = np.sort(np.asarray(values, dtype=np.float64))
        return cls(values, np.full(len(values), 1.0 / len(values)))

    @classmethod
    def of_curve(cls, curve: dict) -> Reference:
        """From a risk-coverage curve: thresholds falling, coverage (share with confidence >= threshold)
        rising to 1, so each threshold stands for the share of images between it and the one above."""
        thresholds, coverage = np.asarray(curve["threshold"], np.float64), np.asarray(curve["coverage"], np.float64)
        shares = np.diff(coverage, prepend=0.0)
        return cls(thresholds[::-1].copy(), shares[::-1] / shares.sum())

    def __len__(self) -> int:
        return len(self.values)

    def share_below(self, threshold: float) -> float:
        return float(self.weights[self.values < threshold].sum())

    def edges(self, bins: int = PSI_BINS) -> np.ndarray:
        """The inner bin edges at the reference's quantiles (fewer where values tie)."""
        cumulative = np.cumsum(self.weights)
        inner = [self.values[min(np.searchsorted(cumulative, q), len(self) - 1)] for q in np.arange(1, bins) / bins]
        return np.unique(inner)


def psi(reference: Reference, served: np.ndarray) -> float:
    """Population stability index of `served` against `reference`, over the reference's quantile bins:
    sum of (served share - reference share) * ln(served share / reference share)."""
    edges = reference.edges()
    ref = np.bincount(np.searchsorted(edges, reference.values, side="right"), reference.weights, len(edges) + 1)
    got = np.bincount(np.searchsorted(edges, served, side="right"), minlength=len(edges) + 1) / len(served)
    ref, got = np.maximum(ref, PSI_FLOOR), np.maximum(got, PSI_FLOOR)
    return float(np.sum((got - ref) * np.log(got / ref)))


def ks_distance(reference: Reference, served: np.ndarray) -> float:
    """The largest gap between the two cumulative distributions, over every value either holds."""
    points = np.union1d(reference.values, served)
    ref_cdf = np.concatenate([[0.0], np.cumsum(reference.weights)])[np.searchsorted(reference.values, points,
                                                                                    side="right")]
    served_cdf = np.searchsorted(np.sort(served), points, side="right") / len(served)
    return float(np.max(np.abs(ref_cdf - served_cdf)))


class DriftMonitor:
    """A rolling window of served scores and their distance from validation's. `observe` is called by the
    inference thread, `figures` by the request handlers: one lock guards the window."""

    def __init__(self, references: dict[str, Reference | None], threshold: float | None, window: int,
                 min_images: int, psi_alarm: float, origin: str, logger: logging.Logger):
        self.references, self.threshold, self.origin = references, threshold, origin
        self.min_images, self.psi_alarm, self.logger = min_images, psi_alarm, logger
        self._window = {name: deque(maxlen=window) for name in SCORES}
        self._lock = threading.Lock()
        self._served = 0
        self.alarm = False

    def observe(self, confidences, energies) -> dict:
        """Add scored images to the window; warn (once per crossing) when drift begins or ends."""
        with self._lock:
            self._window["confidence"].extend(map(float, confidences))
            self._window["energy"].extend(map(float, energies))
            self._served += len(confidences)
            figures = self._figures()
            was, self.alarm = self.alarm, figures["drifting"]
        if self.alarm and not was:
            self.logger.warning("drift: %s", self._describe(figures))
        elif was and not self.alarm:
            self.logger.info("drift over: %s", self._describe(figures))
        return figures

    def figures(self) -> dict:
        with self._lock:
            return self._figures()

    def _figures(self) -> dict:
        n = len(self._window["confidence"])
        scores = {}
        for name in SCORES:
            reference, served = self.references.get(name), np.asarray(self._window[name])
            known = reference is not None and n > 0
            scores[name] = {"psi": psi(reference, served) if known else None,
                            "ks": ks_distance(reference, served) if known else None,
                            "served_mean": float(served.mean()) if n else None,
                            "validation_mean": float(np.dot(reference.values, reference.weights))
                            if reference is not None else None}
        below = None
        if self.threshold is not None and self.references.get("confidence") is not None:
            served = np.asarray(self._window["confidence"])
            below = {"threshold": self.threshold, "served": float((served < self.threshold).mean()) if n else None,
                     "validation": self.references["confidence"].share_below(self.threshold)}
        psis = [s["psi"] for s in scores.values() if s["psi"] is not None]
        drifting = n >= self.min_images and bool(psis) and max(psis) > self.psi_alarm
        return {"window": n, "window_size": self._window["confidence"].maxlen, "served": self._served,
                "min_images": self.min_images, "psi_alarm": self.psi_alarm, "drifting": drifting,
                "reference": self.origin, "scores": scores, "below_threshold": below}

    @staticmethod
    def _describe(figures: dict) -> str:
        parts = [f"{name} PSI {s['psi']:.3f} (KS {s['ks']:.3f})" for name, s in figures["scores"].items()
                 if s["psi"] is not None]
        return (f"the last {figures['window']} served images against {figures['reference']}: {', '.join(parts)}; "
                f"alarm above PSI {figures['psi_alarm']}")
