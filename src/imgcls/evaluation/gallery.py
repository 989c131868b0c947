"""Which images of a split a report shows: a pass that says which images it read, and their pixels."""

from __future__ import annotations

import numpy as np
import torch

from imgcls.data import Split
from imgcls.data.folder import StreamingImages


def by_index(split: Split) -> Split:
    """`split` with each image labelled by its own index, so a pass over it returns which images it read."""
    index = torch.arange(len(split))
    if split.images is not None:
        return Split(index, images=split.images)
    if split.shards is not None:
        return Split(index, shards=split.shards, workers=split.workers)
    s = split.stream
    return Split(index, stream=StreamingImages(s.files, index.tolist(), s.size, crop_pct=s.crop_pct),
                 workers=split.workers)


def gallery_pixels(split: Split, seen: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, pixels) of the images at `positions` of the predictions (split indices seen[positions]),
    without any whose file is unreadable by now: each caption stays with its own pixels."""
    wanted = by_index(split).subset(seen[positions])
    batches = [b for b in wanted.batches(torch.arange(len(wanted)), max(1, len(wanted))) if len(b[0])]
    if not batches:
        return positions[:0], torch.zeros(0, 3, split.img_size, split.img_size, dtype=torch.uint8)
    pixels = torch.cat([images for images, _ in batches])
    got = torch.cat([index for _, index in batches])  # the split indices that decoded
    position_of = {index: pos for pos, index in zip(positions.tolist(), seen[positions].tolist(), strict=True)}
    return torch.tensor([position_of[i] for i in got.tolist()], dtype=torch.long), pixels


def hwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).contiguous().numpy()
