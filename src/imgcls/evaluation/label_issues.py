"""Which labels are probably wrong: confident learning (cleanlab) over out-of-fold probabilities.

cleanlab's `find_label_issues` estimates, per class pair, how many images labelled i are truly j (the
confident joint: an image counts as j when its probability of j reaches the average probability the
images labelled j give j), and flags that many images per pair, the least likely of their label first
(`prune_by_noise_rate`). Each flagged image is then ranked by its label quality score, the probability
the out-of-fold model gives its label (`self_confidence`): the lowest first.
"""

from __future__ import annotations

import numpy as np

from imgcls.errors import UserError

METHOD = "cleanlab find_label_issues (prune_by_noise_rate), ranked by self_confidence"
CSV_COLUMNS = ("path", "split", "given", "suggested", "label_quality", "p_given", "p_suggested")


def check_installed() -> None:
    try:
        import cleanlab  # noqa: F401
    except ImportError:
        raise UserError("checking labels needs cleanlab and scikit-learn: pip install 'imgcls[labels]'") from None


def label_issues(labels: np.ndarray, probs: np.ndarray, classes: list[str], names: list[str]) -> list[dict]:
    """The images whose label is probably wrong, most certainly wrong first: name, split, given and suggested
    class, label quality (the probability of the given label), and both probabilities."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if probs.shape != (len(labels), len(classes)) or not np.isfinite(probs).all():
        raise ValueError("probabilities must be finite, one row per image and one column per class")
    probs = probs / probs.sum(axis=1, keepdims=True)
    flagged = find_label_issues(labels, probs, filter_by="prune_by_noise_rate",
                                return_indices_ranked_by="self_confidence")
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    out = []
    for i in flagged.tolist():
        suggested = int(probs[i].argmax())
        out.append({"path": names[i], "split": names[i].split("/", 1)[0], "given": classes[labels[i]],
                    "suggested": classes[suggested], "label_quality": round(float(quality[i]), 6),
                    "p_given": round(float(probs[i, labels[i]]), 6),
                    "p_suggested": round(float(probs[i, suggested]), 6), "index": i})
    return out


def precision_recall(flagged: set[int], planted: set[int]) -> tuple[float, float]:
    """Of the flagged images, the share whose label was planted wrong; of the planted, the share flagged."""
    hits = len(flagged & planted)
    return (hits / len(flagged) if flagged else 0.0), (hits / len(planted) if planted else 0.0)
