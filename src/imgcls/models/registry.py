"""The model registry and `create_model`, in timm's spirit: one factory over named builders.

Every model, ours or timm's, exposes the same surface:
  forward_features(x) -> unpooled features (B x C x H x W maps, or B x tokens x D)
  forward_head(x, pre_logits=False) -> logits (or pooled features)
  get_classifier() / reset_classifier(num_classes)
so transfer learning, test-time augmentation and Grad-CAM work on all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from imgcls.errors import UserError

TIMM_PREFIX = "timm/"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    img_size: int  # native input size
    family: str  # "cnn" or "vit"
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, img_size: int, family: str, description: str):
    def wrap(builder: Callable[..., nn.Module]):
        _REGISTRY[name] = ModelSpec(name, builder, img_size, family, description)
        return builder

    return wrap


def list_models() -> list[ModelSpec]:
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def model_spec(name: str) -> ModelSpec:
    """The spec of a registered model, or of `timm/<name>` (native size from timm's config)."""
    if name.startswith(TIMM_PREFIX):
        import timm

        arch = name[len(TIMM_PREFIX) :]
        if not timm.is_model(arch):
            raise UserError(f"timm has no model '{arch}'; check the name against timm.list_models()")
        cfg = timm.get_pretrained_cfg(arch)
        size = cfg.input_size[-1] if cfg is not None else 224
        family = "vit" if any(k in arch for k in ("vit", "deit", "swin", "eva", "beit")) else "cnn"
        return ModelSpec(name, lambda **kw: timm.create_model(arch, **kw), size, family, f"timm {arch}")
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UserError(f"unknown model '{name}'; choose one of {known}, or timm/<name> for any timm model")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int, pretrained: bool | None = None, **kwargs) -> nn.Module:
    """Build a model by name with a fresh `num_classes` head.

    `pretrained=True` is passed to timm for `timm/<name>` models (its hub download); registered
    models have no pretrained weights of their own yet.
    """
    spec = model_spec(name)
    if name.startswith(TIMM_PREFIX):
        try:
            return spec.builder(pretrained=bool(pretrained), num_classes=num_classes, **kwargs)
        except (OSError, RuntimeError) as e:
            if pretrained:
                raise UserError(f"could not fetch pretrained weights for {name} ({type(e).__name__}); "
                                "connect to the internet or train without pretrained weights") from e
            raise
    if pretrained:
        raise UserError(f"{name} has no pretrained weights; drop the pretrained option")
    return spec.builder(num_classes=num_classes, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
