"""Is a difference between two variants real? Per-image test predictions, a paired bootstrap and McNemar's test.

Each run keeps its test predictions (RUN/test_predictions.npz: int64 `labels`, float32 `probs` N x K, from the
checkpoint selected on validation; a multi-label run's labels are N x K 0/1 and its probs each label's sigmoid).
Two variants are compared image by image, run against run of the same seed:

- the paired bootstrap resamples test images (the same images for both variants) and seeds, and gives a 95%
  percentile interval for the difference in accuracy (variant - first);
- McNemar's exact test counts the discordant images, b (first right, variant wrong) and c (first wrong,
  variant right), pooled over seeds, and gives the two-sided binomial probability of a split at least as
  uneven as b : c if either variant were as likely to be the one that is right.

Multi-label runs are compared on mAP, which is a ranking over all test images rather than a sum of per-image
hits: the same paired bootstrap recomputes both variants' mAP on each resample of images and seeds. McNemar's
test counts right and wrong images, which mAP has not, so it is not given.
"""

from __future__ import annotations

import hashlib
import io
import math
import sys
import zipfile
from pathlib import Path

import numpy as np

from imgcls import rundir
from imgcls.errors import UserError
from imgcls.inference.run import load_run, run_engine
from imgcls.rundir import file_digest

TEST_PREDICTIONS = rundir.TEST_PREDICTIONS  # written by training at the end of fit
BOOTSTRAP_RESAMPLES = 2000
ALPHA = 0.05


def _shapes_agree(labels: np.ndarray, probs: np.ndarray) -> bool:
    """N labels (one class each) or N x K 0/1 labels (multi-label) for N x K probabilities."""
    return probs.ndim == 2 and labels.shape in ((len(probs),), probs.shape)


def write_test_predictions(run: str | Path, labels, probs) -> Path:
    """RUN/test_predictions.npz, written atomically: int64 labels (N, or N x K multi-hot), float32 probabilities
    (N x K), and the sha256 of the best.pt they were computed with (empty when there is none), which readers check."""
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float32)
    if not _shapes_agree(labels, probs):
        raise ValueError(f"labels {labels.shape} and probs {probs.shape} do not describe the same N images")
    best = Path(run) / rundir.BEST
    weights = file_digest(best) if best.is_file() else ""
    buffer = io.BytesIO()
    np.savez(buffer, labels=labels, probs=probs, weights=np.array(weights), sha256=np.array(_seal(labels, probs,
                                                                                                weights)))
    out = Path(run) / TEST_PREDICTIONS
    rundir.atomic_write_bytes(out, buffer.getvalue())
    return out


def _seal(labels: np.ndarray, probs: np.ndarray, weights: str) -> str:
    """sha256 of what the file holds: probabilities swapped between columns, or labels edited, keep every range
    check true and would still change a comparison's intervals."""
    digest = hashlib.sha256(weights.encode())
    for a in (labels, probs):
        digest.update(f"{a.dtype} {a.shape}".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def read_test_predictions(run: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, probs) from RUN/test_predictions.npz, or None when the run has none."""
    found = _read(Path(run) / TEST_PREDICTIONS)
    return None if found is None else found[:2]


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, str] | None:
    if not path.is_file():
        return None
    try:
        problem = rundir.npz_problem(path)
        if problem:
            raise UserError(f"{path} is damaged ({problem}); delete it and rerun to compute it again")
        with np.load(path, allow_pickle=False) as f:
            labels, probs, weights = f["labels"], f["probs"], str(f["weights"])
            sealed = str(f["sha256"]) if "sha256" in f.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # empty, truncated, not an npz
        raise UserError(f"cannot read {path} ({type(e).__name__}); delete it and rerun to compute it again") from None
    if sealed != _seal(labels, probs, weights):
        raise UserError(f"{path} was edited after imgcls wrote it, or an older imgcls did (its sha256 does not "
                        "match what it holds); delete it and rerun to compute it again")
    if not _shapes_agree(labels, probs):
        raise UserError(f"{path} holds {labels.shape} labels for {probs.shape} probabilities; delete it and rerun")
    return labels.astype(np.int64), probs.astype(np.float32), weights


def stale_reason(run: Path, labels: np.ndarray, probs: np.ndarray, weights: str) -> str | None:
    """Why stored test predictions cannot stand for the run's best.pt, or None: another checkpoint's, another
    class count's, or not probabilities of its classes (a forged or damaged file)."""
    classes = rundir.read_json(run / rundir.DATASET).get("classes", [])
    if (run / rundir.BEST).is_file() and weights != file_digest(run / rundir.BEST):
        return "they were computed with another best.pt"
    if probs.shape[1] != len(classes) or len(labels) == 0:
        return f"they hold {probs.shape[1]} classes for the run's {len(classes)}, or no image"
    if not np.isfinite(probs).all() or probs.min() < 0:
        return "they are not labels and probabilities of the run's classes"
    if labels.ndim == 2:  # multi-label: 0/1 per class, a sigmoid probability per class
        return "they are not 0/1 labels and probabilities of the run's classes" \
            if labels.min() < 0 or labels.max() > 1 or probs.max() > 1 else None
    if labels.min() < 0 or labels.max() >= len(classes) or np.abs(probs.sum(axis=1) - 1).max() > 1e-3:
        return "they are not labels and probabilities of the run's classes"
    return None


def run_test_predictions(run: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """A run's test predictions (val-selected checkpoint): read back when they are best.pt's, else computed
    (again) and stored. None when the data has no test split."""
    run = Path(run)
    path = run / TEST_PREDICTIONS
    try:
        found = _read(path)
        why = None if found is None else stale_reason(run, *found)
    except UserError as e:
        found, why = None, str(e).split(";")[0]
    if found is not None and why is None:
        return found[:2]
    if why is not None:
        print(f"warning: {path} is not usable ({why}); computing the test predictions again", file=sys.stderr)
    trained = load_run(run, "best", calibrated=False)  # as training scored them: uncalibrated
    if not trained.has_split("test"):
        return None
    scores, labels = run_engine(trained).score_split(trained.split("test"), where="the test split")
    write_test_predictions(run, labels.numpy(), scores.probs.numpy())
    return read_test_predictions(run)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: P(a Binomial(b + c, 1/2) split at least as uneven as b : c)."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    # log of C(n, i) / 2^n, summed in log space: n reaches hundreds of thousands of pooled images
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(terms)
    tail = math.exp(top) * sum(math.exp(t - top) for t in terms)
    return min(1.0, 2 * tail)


def paired_bootstrap(first: np.ndarray, other: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = 0) -> tuple[float, float, float]:
    """(difference, low, high): mean accuracy of `other` minus `first` and its 95% percentile interval.

    `first` and `other` are S x N correctness (seed s of one variant against seed s of the other, on the
    same N test images). Each resample draws N images and S seeds with replacement, the same for both."""
    diff = other.astype(np.float32) - first.astype(np.float32)  # S x N of -1, 0, 1
    s, n = diff.shape
    rng = np.random.default_rng(seed)
    stats, chunk = [], max(1, 2**22 // (s * n))  # bounded memory: chunk x S x N floats at a time
    for start in range(0, resamples, chunk):
        m = min(chunk, resamples - start)
        images = rng.integers(0, n, size=(m, n))
        per_seed = np.stack([diff[:, idx].mean(axis=1) for idx in images])  # m x S
        seeds = rng.integers(0, s, size=(m, s))
        stats.append(np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1))
    stats = np.concatenate(stats)
    low, high = np.quantile(stats, [ALPHA / 2, 1 - ALPHA / 2])
    return float(diff.mean()), float(low), float(high)


def _correct(preds: dict[int, tuple[np.ndarray, np.ndarray]], seeds: list[int]) -> np.ndarray:
    return np.stack([preds[s][1].argmax(axis=1) == preds[s][0] for s in seeds])


def mean_average_precision(probs: np.ndarray, truth: np.ndarray) -> float:
    """mAP of N x K scores against N x K 0/1 labels, as evaluation/multilabel.py defines it (ties share the
    precision at the end of their run, as scikit-learn's average_precision_score does; classes without a
    positive are left out), for all classes at once: the bootstrap computes it thousands of times."""
    order = np.argsort(-probs, axis=0, kind="stable")
    s = np.take_along_axis(probs, order, axis=0)
    y = np.take_along_axis(truth, order, axis=0).astype(np.float64)
    n = len(s)
    precision = np.cumsum(y, axis=0) / np.arange(1, n + 1)[:, None]
    last_of_tie = np.ones(s.shape, dtype=bool)
    last_of_tie[:-1] = s[1:] != s[:-1]
    # each position's run of ties ends at the first last-of-tie at or below it: a reversed running minimum
    end = np.where(last_of_tie, np.arange(n)[:, None], n - 1)
    end = np.minimum.accumulate(end[::-1], axis=0)[::-1]
    positives = y.sum(axis=0)
    present = positives > 0
    if not present.any():
        return 0.0
    ap = (y * np.take_along_axis(precision, end, axis=0)).sum(axis=0)[present] / positives[present]
    return float(ap.mean())


def paired_bootstrap_map(first: list[tuple[np.ndarray, np.ndarray]], other: list[tuple[np.ndarray, np.ndarray]],
                         resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float, float]:
    """(difference, low, high): mAP of `other` minus `first`, averaged over seeds, and its 95% percentile
    interval. `first[s]` and `other[s]` are seed s's (labels, probs) on the same N images; each resample draws
    N images and S seeds with replacement, the same for both, and recomputes every mAP on them."""
    s, n = len(first), len(first[0][0])
    rng = np.random.default_rng(seed)
    stats = np.empty(resamples)
    for m in range(resamples):
        images = rng.integers(0, n, size=n)
        per_seed = [mean_average_precision(o[1][images], o[0][images]) -
                    mean_average_precision(f[1][images], f[0][images]) for f, o in zip(first, other, strict=True)]
        stats[m] = np.mean(np.asarray(per_seed)[rng.integers(0, s, size=s)])
    diff = float(np.mean([mean_average_precision(o[1], o[0]) - mean_average_precision(f[1], f[0])
                          for f, o in zip(first, other, strict=True)]))
    low, high = np.quantile(stats, [ALPHA / 2, 1 - ALPHA / 2])
    return diff, float(low), float(high)


def compare_to_first(predictions: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]) -> dict[str, dict | None]:
    """For each variant after the first: the paired difference in accuracy (multi-label: in mAP) against the first
    variant with its bootstrap interval, and McNemar's p-value (not for mAP), over the seeds both have.
    `predictions`: variant -> seed -> (labels, probs), in variant order. The first variant (and any without shared
    seeds) gets None."""
    names = list(predictions)
    base = predictions[names[0]]
    out: dict[str, dict | None] = {names[0]: None}
    for name in names[1:]:
        seeds = sorted(set(base) & set(predictions[name]))
        if not seeds:
            out[name] = None
            continue
        for s in seeds:
            if not np.array_equal(base[s][0], predictions[name][s][0]):
                raise UserError(f"variant {name} seed {s} was tested on other images than variant {names[0]}; "
                                "use a fresh --out so that every run sees the same test split")
        if base[seeds[0]][0].ndim == 2:  # multi-label
            diff, low, high = paired_bootstrap_map([base[s] for s in seeds], [predictions[name][s] for s in seeds])
            out[name] = {"vs": names[0], "seeds": seeds, "images": len(base[seeds[0]][0]), "metric": "map",
                         "map_diff": diff, "ci_low": low, "ci_high": high, "mcnemar_p": None,
                         "significant": bool(low > 0 or high < 0)}
            continue
        a, b = _correct(base, seeds), _correct(predictions[name], seeds)
        diff, low, high = paired_bootstrap(a, b)
        first_only, other_only = int((a & ~b).sum()), int((~a & b).sum())
        p = mcnemar_exact(first_only, other_only)
        out[name] = {"vs": names[0], "seeds": seeds, "images": int(a.shape[1]), "acc_diff": diff,
                     "ci_low": low, "ci_high": high, "first_only_right": first_only, "variant_only_right": other_only,
                     "mcnemar_p": p, "significant": bool(p < ALPHA and (low > 0 or high < 0))}
    return out


def test_scores(labels: np.ndarray, probs: np.ndarray, thresholds: list[float] | None = None) -> dict:
    """Accuracy, balanced accuracy and macro-F1 of one run's test predictions; a multi-label run's mAP, and its
    macro-F1 and subset accuracy at its `thresholds` (0.5 each when not given)."""
    import torch

    from imgcls.evaluation.metrics import classification_metrics
    from imgcls.evaluation.multilabel import multilabel_metrics

    names = [str(i) for i in range(probs.shape[1])]
    if labels.ndim == 2:
        t = None if thresholds is None else torch.tensor(thresholds, dtype=torch.float64)
        m = multilabel_metrics(torch.from_numpy(probs).double(), torch.from_numpy(labels).double(), names, t)
        return {"n": m["n"], "map": m["map"], "macro_f1": m["macro_f1"], "subset_accuracy": m["subset_accuracy"]}
    m = classification_metrics(torch.from_numpy(probs).double(), torch.from_numpy(labels), names)
    return {key: m[key] for key in ("n", "accuracy", "balanced_accuracy", "macro_f1")}
