"""Parity proof: the validation split through the run's fp32 engine and through the exported file's,
with the stored preprocessing; agreement, largest probability difference and latency."""

from __future__ import annotations

import time

import numpy as np
import torch

from imgcls.errors import UserError
from imgcls.inference.engine import Engine
from imgcls.progress import Phase

MIN_AGREEMENT, MAX_PROB_DIFF = 0.999, 1e-3


def probabilities(engine: Engine, batches: list[torch.Tensor], label: str) -> np.ndarray:
    probs = []
    with Phase(label, sum(len(b) for b in batches)) as phase:
        for b in batches:
            probs.append(engine.score(b).probs)
            phase.advance(len(b))
    return torch.cat(probs).numpy()


def latency_ms(engine: Engine, images: torch.Tensor, batch: int, repeats: int) -> float:
    """Milliseconds per image at `batch`, the median of `repeats` timed calls after one warm-up."""
    x = images[torch.arange(batch) % len(images)]  # repeats images up to `batch`
    engine.logits(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.logits(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000 / batch


def parity(reference: Engine, exported: Engine, batches: list[torch.Tensor], name: str,
           repeats: tuple[int, int] = (20, 3), graph_probs: np.ndarray | None = None) -> dict:
    """Compare `exported` with `reference` on `batches` (uint8 NHWC). `graph_probs`: the exported graph's own
    probabilities output, which users without imgcls read, checked against the reference too."""
    ref = probabilities(reference, batches, f"parity {name}: scoring with the run")
    got = probabilities(exported, batches, f"parity {name}: scoring with the export")
    agreement = float((ref.argmax(1) == got.argmax(1)).mean())
    if reference.multilabel:  # what a multi-label model decides: every label at its threshold, all alike
        t = reference.thresholds.numpy()  # (a probability within the tolerance of its threshold may go either way)
        alike = ((ref >= t) == (got >= t)) | (np.abs(ref - t) <= MAX_PROB_DIFF)
        agreement = min(agreement, float(alike.all(axis=1).mean()))
    max_diff = float(np.abs(ref - got).max())
    if graph_probs is not None:
        max_diff = max(max_diff, float(np.abs(ref - graph_probs).max()))
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
                        f"agreement {result['top1_agreement']:.4%} (needs {MIN_AGREEMENT:.1%}), max probability "
                        f"difference {result['max_abs_prob_diff']:.2e} (limit {MAX_PROB_DIFF:.0e}); nothing was "
                        "written: try another --opset or --format safetensors")
