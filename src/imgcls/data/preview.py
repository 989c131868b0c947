"""Augmented samples for a preview: originals and several draws of the training transform."""

from __future__ import annotations

import numpy as np
import torch

from imgcls.data.datasets import Dataset
from imgcls.data.presets import TrainTransform
from imgcls.errors import UserError

MAX_PER_ROW = 64  # a wider grid is tens of thousands of pixels across, and takes minutes to draw
MAX_SEED = 2**63 - 1  # torch.Generator's seed range


def preview_rows(dataset: Dataset, transform: TrainTransform, n: int = 8, draws: int = 3, seed: int = 0):
    """(rows of H x W x 3 uint8 images, captions, row titles): originals, then `draws` augmentations."""
    if isinstance(n, bool) or not 1 <= n <= MAX_PER_ROW:
        raise UserError(f"--n must be from 1 to {MAX_PER_ROW} images per row (got {n}); e.g. --n 8")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be from 0 to {MAX_SEED} (got {seed}); e.g. --seed 0")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset.train), generator=gen)[:n]
    images, labels = next(dataset.train.batches(idx, n))
    mean = torch.tensor(dataset.mean).view(1, 3, 1, 1)
    std = torch.tensor(dataset.std).view(1, 3, 1, 1)

    def to_hwc(x: torch.Tensor) -> list[np.ndarray]:
        return list(x.permute(0, 2, 3, 1).numpy())

    rows = [to_hwc(images)]
    captions = [[dataset.classes[y] for y in labels.tolist()]]
    for _ in range(draws):
        x, targets = transform(images, labels, gen)
        shown = (x * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8)
        rows.append(to_hwc(shown))
        floor = transform.mixer.smoothing / dataset.num_classes  # what smoothing leaves on other classes
        captions.append([_describe(t, dataset.classes, floor) for t in targets])
    return rows, captions, ["original", *[f"draw {i + 1}" for i in range(draws)]]


def _describe(target: torch.Tensor, classes: list[str], floor: float) -> str:
    """The label weights of one soft target: 'cat' or 'cat 0.62 / dog 0.38' when mixed."""
    top = target.topk(2)
    w1, w2 = top.values.tolist()
    c1, c2 = (classes[i] for i in top.indices.tolist())
    if w2 < floor + 0.005:  # not (visibly) mixed: the other classes hold only the smoothing mass
        return c1
    return f"{c1} {w1:.2f} / {c2} {w2:.2f}"
