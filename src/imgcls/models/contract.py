"""The contract every model meets, ours and timm's: one surface, declared once, so that every tool
(transfer learning, kernels, Grad-CAM, export) works on every model without asking for attribute names.

`ImageClassifier` is the surface every model has (timm's convention, which the models written here
follow through models/surface.py). The capabilities some models have are answered here and only here:
  attention_modules  the modules whose `fused_attn` switches scaled_dot_product_attention against the
                     attention written out (imgcls's ViT and timm's attention modules)
  token_grid         for transformers: prefix tokens and patch size (how tokens map onto the image),
                     and the module Grad-CAM reads (the last block's first norm)
  whitening          a stem that can be initialised to whiten the data (fastnet_*, airbench94)
  no_weight_decay    parameter name patterns the optimizer leaves undecayed
`problems(model)` lists what a model lacks; tests/test_contract.py runs it over every registered model
and two timm models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class ImageClassifier(Protocol):
    """forward(x) == forward_head(forward_features(x)); the classifier is a submodule."""

    num_features: int  # width of forward_head(..., pre_logits=True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features: B x C x h x w maps (CNNs) or B x tokens x D (transformers)."""

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits from forward_features' output, or the pooled features with pre_logits."""

    def get_classifier(self) -> nn.Module: ...

    def reset_classifier(self, num_classes: int) -> None: ...

    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer-group patterns: {"stem": pattern, "blocks": pattern or [(pattern, order)]}."""


@dataclass(frozen=True)
class TokenGrid:
    """How a transformer's tokens lie on the image."""

    prefix_tokens: int  # CLS (and register) tokens before the patch tokens
    patch_size: int
    cam_module: nn.Module  # its output (B x tokens x D) is what Grad-CAM weighs: the last block's norm1


@dataclass(frozen=True)
class Whitening:
    """A stem that `init(images)` sets to whiten normalised training images; `conv` names its convolution."""

    init: object  # callable(images: normalised N x 3 x H x W) -> None
    conv: str


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The modules with a boolean `fused_attn`: True runs scaled_dot_product_attention, False the
    attention written out (matmul, softmax, matmul)."""
    return [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]


def token_grid(model: nn.Module) -> TokenGrid | None:
    """The token layout of a vision transformer (ours or timm's); None for convolutional networks."""
    blocks, prefix = getattr(model, "blocks", None), getattr(model, "num_prefix_tokens", None)
    if blocks is None or prefix is None:
        return None
    size = getattr(model, "patch_size", None) or model.patch_embed.patch_size
    return TokenGrid(int(prefix), int(size[0] if isinstance(size, tuple | list) else size), blocks[-1].norm1)


def whitening(model: nn.Module) -> Whitening | None:
    init, conv = getattr(model, "init_whitening", None), getattr(model, "whitening_conv", None)
    return Whitening(init, conv) if callable(init) and isinstance(conv, str) else None


def no_weight_decay(model: nn.Module) -> set[str]:
    return set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()


def problems(model: nn.Module) -> list[str]:
    """What `model` lacks of the contract (empty when it conforms)."""
    found = [f"no {name}" for name in ("forward_features", "forward_head", "get_classifier", "reset_classifier",
                                       "group_matcher") if not callable(getattr(model, name, None))]
    if not isinstance(getattr(model, "num_features", None), int):
        found.append("no integer num_features")
    if callable(getattr(model, "get_classifier", None)):
        head = model.get_classifier()
        if not any(m is head for m in model.modules()):
            found.append("get_classifier() is not a submodule")
    return found
