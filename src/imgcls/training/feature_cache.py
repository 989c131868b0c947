"""Frozen-backbone features kept across runs, in $IMGCLS_CACHE_DIR/features/<key>.safetensors.

--cache-features computes every image's pooled features once per run; a second run with the same backbone,
weights, data and preprocessing would compute the very same numbers again (minutes for a pretrained model
on a photo folder). The key is everything the features depend on: the backbone's weights (its classifier
excluded: a new head never changes them), the data fingerprint and the split, the preprocessing, the
inference precision and kernels, the device and torch's version. A file that does not load, holds another
image count, other labels or non-finite numbers, or whose content no longer matches its sha256 seal (edited
in place, or copied under another key), is computed again and replaced; a cache that cannot be written is
skipped. The file lands whole (rundir.atomic_write_bytes).
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

VERSION = 2  # of the file and of what the key covers (2: sealed)


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
    return rundir.cache_dir() / "features" / f"{key.hexdigest()[:32]}.safetensors"


def _seal(features: torch.Tensor, labels: torch.Tensor, path: Path) -> torch.Tensor:
    """sha256 of the features, the labels and the file's own key, as 32 bytes: features edited in place (finite,
    the right shape and labels) or a file copied under another key would otherwise train the head unseen."""
    digest = hashlib.sha256(path.stem.encode())
    for t in (features, labels):
        t = t.contiguous()
        digest.update(f"{t.dtype} {tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


def _read(path: Path, split: Split) -> Split | None:
    """The cached features of `split`, or None when the file is missing or is not what it should be."""
    try:
        tensors = load_tensors(path.read_bytes())
    except Exception:  # noqa: BLE001 - a file that does not load, however it fails, is computed again
        return None
    features, labels, seal = tensors.get("features"), tensors.get("labels"), tensors.get("sha256")
    if features is None or labels is None or seal is None or features.ndim != 2 or len(features) != len(split) or \
            not torch.equal(labels, split.labels) or not torch.equal(seal, _seal(features, labels, path)) or \
            not torch.isfinite(features).all():
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
        images, labels = features.images.contiguous(), features.labels.contiguous()
        rundir.atomic_write_bytes(path, save_tensors({"features": images, "labels": labels,
                                                     "sha256": _seal(images, labels, path)}))
    except (OSError, UserError):
        pass  # a read-only or full cache costs the next run the time, nothing else
    return features, None
