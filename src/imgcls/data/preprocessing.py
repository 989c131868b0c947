"""How an image becomes a model's input: the one definition training, evaluation, prediction and the
exported files share.

A file is decoded (data/decode.py), its shorter side resized to img_size / crop_pct (bicubic) and the
centre img_size x img_size cut out: uint8 RGB pixels. Those pixels are the contract of every inference
path (NHWC for the exported graph). `normalize` then scales them to [0, 1] and standardises each
channel; it is the only place that arithmetic is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgcls.data.folder import load_image

RESIZE_RULE = "shorter side to img_size / crop_pct (bicubic), centre crop img_size x img_size"
INPUT_LAYOUT = "uint8 RGB, N x H x W x 3 (NHWC), H = W = img_size"


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 N x 3 x H x W (any strides) -> float32 (x / 255 - mean) / std per channel. `mean` and `std`
    are three numbers or tensors broadcastable to N x 3 x 1 x 1 (the exported graph passes its buffers)."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


@dataclass(frozen=True)
class Preprocessing:
    """Size, crop and normalisation statistics of a model's input (of a run, an export, or pretrained
    weights, whose img_size is then the model's native size)."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0  # the centre crop of the shorter side: 0.875 resizes to size / 0.875, crops size

    def load(self, path: str | Path) -> np.ndarray:
        """A file as the model's uint8 input: H x W x 3 RGB."""
        return load_image(Path(path), self.img_size, self.crop_pct)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W -> the float32 input of the bare model."""
        return normalize(images, self.mean, self.std)

    def __call__(self, path: str | Path) -> torch.Tensor:
        """timm style: a file as the bare model's normalised float32 3 x H x W input."""
        pixels = torch.from_numpy(np.array(self.load(path))).permute(2, 0, 1)
        return self.normalize(pixels[None])[0]

    def as_dict(self) -> dict:
        return {"img_size": self.img_size, "mean": list(self.mean), "std": list(self.std),
                "crop_pct": self.crop_pct, "resize": RESIZE_RULE, "input": INPUT_LAYOUT}
