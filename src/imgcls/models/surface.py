"""The part of the common model surface that is the same for every architecture written here."""

from __future__ import annotations

import torch
import torch.nn as nn


class ClassifierSurface:
    """forward = forward_head(forward_features(x)), with the classifier in `self.head`.

    Models define forward_features, forward_head and num_features; this adds the rest of the
    timm-style surface so tools can treat ours and timm's models alike.
    """

    head: nn.Module
    num_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        self.head = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()
