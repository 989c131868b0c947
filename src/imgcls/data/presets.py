"""Batch transforms: augmentation on whole uint8 batches, then normalisation.

Random parameters are drawn per sample from an explicit torch.Generator, so a run is
reproducible and resumable mid-epoch; the pixel work is vectorised over the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("none", "basic")


def random_crop(images: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by `pad` and crop back to size at a per-sample offset, uniform in [0, 2*pad]."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    dev = images.device
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chans = torch.arange(c, device=dev)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_hflip(images: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = (torch.rand(len(images), generator=gen) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class TrainAugment:
    """The training recipe as a callable on uint8 batches: `aug(images, gen) -> images`."""

    def __init__(self, name: str, img_size: int):
        if name not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {name}")
        self.name = name
        self.pad = max(1, img_size // 8)  # 4 pixels at 32x32, the classic CIFAR recipe

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.name == "basic":
            images = random_hflip(random_crop(images, self.pad, gen), gen)
        return images


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float32, scaled to [0, 1] then standardised per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean_t) / std_t
