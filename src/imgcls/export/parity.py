"""Parity proof: the validation split through the run (PyTorch, fp32) and through the exported file,
with the stored preprocessing; agreement, largest probability difference and latency."""

from __future__ import annotations

import time

import numpy as np

from imgcls.errors import UserError
from imgcls.evaluation.batch_predict import Predictor

MIN_AGREEMENT, MAX_PROB_DIFF = 0.999, 1e-3


def probabilities(predictor: Predictor, batches: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([predictor.run(b)[1] for b in batches]).astype(np.float64)


def latency_ms(predictor: Predictor, images: np.ndarray, batch: int, repeats: int) -> float:
    """Milliseconds per image at `batch`, the median of `repeats` timed calls after one warm-up."""
    x = np.ascontiguousarray(np.resize(images, (batch, *images.shape[1:])))  # repeats images up to `batch`
    predictor.run(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.run(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000 / batch


def parity(reference: Predictor, exported: Predictor, batches: list[np.ndarray], name: str,
           repeats: tuple[int, int] = (20, 3)) -> dict:
    """Compare `exported` with `reference` on `batches`; raise if they disagree beyond fp32 rounding."""
    ref, got = probabilities(reference, batches), probabilities(exported, batches)
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    max_diff = float(np.abs(ref - got).max())
    sample = batches[0]
    result = {"format": name, "images": len(ref), "top1_agreement": agreement, "max_abs_prob_diff": max_diff,
              "latency_ms_per_image": {
                  "pytorch": {"batch1": latency_ms(reference, sample, 1, repeats[0]),
                              "batch64": latency_ms(reference, sample, 64, repeats[1])},
                  name: {"batch1": latency_ms(exported, sample, 1, repeats[0]),
                         "batch64": latency_ms(exported, sample, 64, repeats[1])}}}
    result["passed"] = agreement >= MIN_AGREEMENT and max_diff <= MAX_PROB_DIFF
    return result


def require_parity(result: dict) -> None:
    if not result["passed"]:
        raise UserError(f"{result['format']} export disagrees with the run on {result.get('split', 'val')}: top-1 "
                        "agreement "
                        f"{result['top1_agreement']:.4%} (needs {MIN_AGREEMENT:.1%}), max probability difference "
                        f"{result['max_abs_prob_diff']:.2e} (limit {MAX_PROB_DIFF:.0e}); try another --opset or "
                        "--format safetensors")


def format_parity(result: dict) -> str:
    lat = result["latency_ms_per_image"]
    other = result["format"]
    return (f"parity {other}: {result['images']} {result.get('split', 'val')} images, "
            f"top-1 agreement {result['top1_agreement']:.2%}, "
            f"max |dp| {result['max_abs_prob_diff']:.1e}; ms/image batch 1: pytorch {lat['pytorch']['batch1']:.2f} "
            f"{other} {lat[other]['batch1']:.2f}, batch 64: pytorch {lat['pytorch']['batch64']:.2f} "
            f"{other} {lat[other]['batch64']:.2f}")
