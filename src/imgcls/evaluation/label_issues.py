"""Which labels are probably wrong: confident learning (cleanlab) over out-of-fold probabilities.

cleanlab's `find_label_issues` estimates, per class pair, how many images labelled i are truly j (the
confident joint: an image counts as j when its probability of j reaches the average probability the
images labelled j give j), and flags that many images per pair, the least likely of their label first
(`prune_by_noise_rate`). Each flagged image is then ranked by its label quality score, the probability
the out-of-fold model gives its label (`self_confidence`): the lowest first.

Multi-label: cleanlab treats each label as a yes/no question with its own confident joint (one binary
problem per label) and flags an image when any of its labels looks wrong; which labels do (`doubtful`:
given but improbable, or absent but probable) comes from the same per-label estimate. The image's label
quality is cleanlab's aggregate of its per-label self-confidences (an exponential moving average that
weighs the worst label most).
"""

from __future__ import annotations

import numpy as np

from imgcls.errors import UserError

METHOD = "cleanlab find_label_issues (prune_by_noise_rate), ranked by self_confidence"
MULTILABEL_METHOD = ("cleanlab multilabel find_label_issues (prune_by_noise_rate per label), ranked by the "
                     "aggregated per-label self_confidence")
CSV_COLUMNS = ("path", "split", "given", "suggested", "label_quality", "p_given", "p_suggested")
MULTILABEL_CSV_COLUMNS = ("path", "split", "given", "suggested", "doubtful", "label_quality")


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


def multilabel_label_issues(targets: np.ndarray, probs: np.ndarray, classes: list[str],
                            names: list[str]) -> list[dict]:
    """The images of multi-hot `targets` (N x K 0/1) whose labels are probably wrong, given the out-of-fold
    probability of each label (N x K, each its own sigmoid or binary head), most certainly wrong first: name,
    split, given and suggested labels (those at 0.5 or above), the labels that look wrong, the label quality."""
    from cleanlab.multilabel_classification import get_label_quality_scores
    from cleanlab.multilabel_classification.filter import find_label_issues, find_multilabel_issues_per_class

    if probs.shape != targets.shape or probs.shape[1] != len(classes) or not np.isfinite(probs).all() or \
            probs.min() < 0 or probs.max() > 1:
        raise ValueError("probabilities must be in [0, 1], one row per image and one column per class")
    given = [np.flatnonzero(row).tolist() for row in targets]
    flagged = find_label_issues(given, probs, filter_by="prune_by_noise_rate",
                                return_indices_ranked_by="self_confidence")
    doubtful = find_multilabel_issues_per_class(given, probs, filter_by="prune_by_noise_rate")
    quality = get_label_quality_scores(given, probs)

    def joined(columns) -> str:
        return ";".join(classes[k] for k in columns)

    out = []
    for i in flagged.tolist():
        out.append({"path": names[i], "split": names[i].split("/", 1)[0], "given": joined(given[i]),
                    "suggested": joined(np.flatnonzero(probs[i] >= 0.5)),
                    "doubtful": joined(np.flatnonzero(doubtful[i])),
                    "label_quality": round(float(quality[i]), 6), "index": i})
    return out


def precision_recall(flagged: set[int], planted: set[int]) -> tuple[float, float]:
    """Of the flagged images, the share whose label was planted wrong; of the planted, the share flagged."""
    hits = len(flagged & planted)
    return (hits / len(flagged) if flagged else 0.0), (hits / len(planted) if planted else 0.0)
