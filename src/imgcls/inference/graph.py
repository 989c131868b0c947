"""The model as one graph over what a user has: uint8 RGB images, N x H x W x 3, in; logits and
calibrated probabilities out (softmax; each class's sigmoid for a multi-label model). `imgcls export`
writes this module to ONNX, and the engine's PyTorch backend runs its `logits`, so a run and its
exported file compute the same thing."""

from __future__ import annotations

import torch
from torch import nn

from imgcls.data.preprocessing import Preprocessing, normalize
from imgcls.inference.scaling import Scaling


class InferenceModel(nn.Module):
    def __init__(self, model: nn.Module, preprocessing: Preprocessing, scaling: Scaling | None = None,
                 memory_format: torch.memory_format = torch.channels_last, multilabel: bool = False):
        super().__init__()
        self.model, self.memory_format, self.multilabel = model, memory_format, multilabel
        self.register_buffer("mean", torch.tensor(preprocessing.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(preprocessing.std, dtype=torch.float32))
        scale, bias = (scaling.scale, scaling.bias) if scaling is not None else ([1.0], [0.0])
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """float32 logits, uncalibrated, the model's input laid out as its weights are (a no-op when the
        NCHW view of contiguous NHWC images is channels-last already)."""
        x = normalize(images.permute(0, 3, 1, 2), self.mean, self.std).contiguous(memory_format=self.memory_format)
        return self.model(x).float()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(images)
        scaled = logits * self.scale + self.bias
        return logits, scaled.sigmoid() if self.multilabel else scaled.softmax(dim=1)  # multi-label: per class
