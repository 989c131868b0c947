"""Batch mixing (Mixup, CutMix) with soft targets, and label smoothing applied once.

Every sample draws its own partner and its own lambda from an explicit generator, so mixing is
reproducible and resumable; all of it is tensor ops over the batch. (timm's Mixup draws one
lambda per batch from numpy's global RNG, which a resumed run could not replay.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def beta(alpha: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """n draws from Beta(alpha, alpha), driven by `gen` (torch's Beta sampler takes no generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    return torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, n)).float()


def soft_targets(labels_a, labels_b, lam: torch.Tensor, num_classes: int, smoothing: float = 0.0):
    """lam * onehot(a) + (1 - lam) * onehot(b), then smoothed once: (1 - eps) * t + eps / K. Multi-hot rows
    (N x K, a multi-label run's labels) mix alike, each class a binary target: smoothed towards 1/2,
    (1 - eps) * t + eps / 2."""
    multilabel = labels_a.dim() == 2
    a = labels_a.float() if multilabel else F.one_hot(labels_a, num_classes).float()
    b = labels_b.float() if multilabel else F.one_hot(labels_b, num_classes).float()
    lam = lam.to(a.device).view(-1, 1)
    mixed = lam * a + (1 - lam) * b
    return mixed * (1 - smoothing) + smoothing / (2 if multilabel else num_classes)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against a target distribution, averaged over the batch."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def mixup(images: torch.Tensor, partner: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """lam * x_i + (1 - lam) * x_partner(i), per sample, on float images."""
    lam = lam.to(images.device).view(-1, 1, 1, 1)
    return lam * images + (1 - lam) * images[partner]


def cutmix_boxes(lam: torch.Tensor, height: int, width: int, gen: torch.Generator):
    """Boxes of side ratio sqrt(1 - lam) around uniform random centres, clipped to the image.

    Returns (y0, y1, x0, x1) integer tensors and the corrected lambda = 1 - box area / image area.
    """
    n = len(lam)
    cut = torch.sqrt(1.0 - lam)
    cut_h, cut_w = (height * cut).long(), (width * cut).long()
    cy = torch.randint(0, height, (n,), generator=gen)
    cx = torch.randint(0, width, (n,), generator=gen)
    y0, y1 = (cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height)
    x0, x1 = (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)
    kept = 1.0 - ((y1 - y0) * (x1 - x0)).float() / (height * width)
    return (y0, y1, x0, x1), kept


def cutmix(images: torch.Tensor, partner: torch.Tensor, boxes) -> torch.Tensor:
    """Paste each partner's box into each image."""
    y0, y1, x0, x1 = (t.to(images.device).view(-1, 1, 1) for t in boxes)
    _, _, h, w = images.shape
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    inside = ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).unsqueeze(1)
    return torch.where(inside, images[partner], images)


@dataclass
class Mixer:
    """Mixes a training batch: `mixer(images, labels, gen) -> (images, soft targets)`.

    With both alphas set, each mixed batch uses CutMix with probability `switch_prob`, else
    Mixup (as timm does); `prob` is the chance that a batch is mixed at all.
    """

    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    smoothing: float = 0.0

    @property
    def active(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        n = len(labels)
        ones = torch.ones(n)
        if not self.active:
            return images, soft_targets(labels, labels, ones, self.num_classes, self.smoothing)
        draws = torch.rand(2, generator=gen)  # always drawn, so the random stream never forks
        partner = torch.randperm(n, generator=gen).to(images.device)
        use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or draws[1] < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = beta(alpha, n, gen) if alpha > 0 else ones
        if draws[0] >= self.prob:
            return images, soft_targets(labels, labels, ones, self.num_classes, self.smoothing)
        if use_cutmix:
            boxes, lam = cutmix_boxes(lam, images.shape[2], images.shape[3], gen)
            images = cutmix(images, partner, boxes)
        else:
            images = mixup(images, partner, lam)
        return images, soft_targets(labels, labels[partner], lam, self.num_classes, self.smoothing)
