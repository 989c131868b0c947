"""Frozen-backbone features kept across runs, in $IMGCLS_CACHE_DIR/features/<key>.safetensors.

--cache-features computes every image's pooled features once per run; a second run with the same backbone,
weights, data and preprocessing would compute the very same numbers again (minutes for a pretrained model
on a photo folder). The key is everything the features depend on: the backbone's weights (its classifier
excluded: a new head never changes them), the data fingerprint and the split, the preprocessing, the
inference precision and kernels, the device and torch's version. A file that does not load, or holds
another image count, other labels or non-finite numbers, is computed again and replaced; a cache that
cannot be written is skipped. The file lands whole (rundir.atomic_write_bytes).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from imgcls import rundir
from imgcls.data import Split
from imgcls.errors import UserError
from imgcls.models.surface import classifier_name
from imgcls.runtime import cache_dir

VERSION = 1  # of the file and of what the key covers


def backbone_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer outside the classifier: names, dtypes, shapes and bytes."""
    head = classifier_name(model) + "."
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith(head):
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def feature_path(parts: dict) -> Path:
    key = hashlib.sha256(json.dumps({"version": VERSION, **parts}, sort_keys=True, default=str).encode())
    return cache_dir() / "features" / f"{key.hexdigest()[:32]}.safetensors"


def _read(path: Path, split: Split) -> Split | None:
    """The cached features of `split`, or None when the file is missing or is not what it should be."""
    try:
        tensors = load_tensors(path.read_bytes())
    except Exception:  # noqa: BLE001 - a file that does not load, however it fails, is computed again
        return None
    features, labels = tensors.get("features"), tensors.get("labels")
    if features is None or labels is None or features.ndim != 2 or len(features) != len(split) or \
            not torch.equal(labels, split.labels) or not torch.isfinite(features).all():
        return None
    return Split(labels, images=features)


def cached_features(split: Split, parts: dict, compute: Callable[[], Split]) -> tuple[Split, Path | None]:
    """`split`'s features: (features, the cache file they were read from) or, computed now, (features,
    None), kept for the next run when the cache can be written."""
    path = feature_path(parts)
    found = _read(path, split) if path.is_file() else None
    if found is not None:
        return found, path
    features = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_bytes(path, save_tensors({"features": features.images.contiguous(),
                                                     "labels": features.labels.contiguous()}))
    except (OSError, UserError):
        pass  # a read-only or full cache costs the next run the time, nothing else
    return features, None
