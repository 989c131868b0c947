"""The model registry and `create_model`, in timm's spirit: one factory over named builders.

Every model, ours or timm's, exposes the same surface:
  forward_features(x) -> unpooled features (B x C x H x W maps, or B x tokens x D)
  forward_head(x, pre_logits=False) -> logits (or pooled features)
  get_classifier() / reset_classifier(num_classes)
  group_matcher(coarse) -> stem and stage patterns, for per-layer-group learning rates
so transfer learning, test-time augmentation and Grad-CAM work on all of them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import torch.nn as nn

from imgcls.errors import UserError
from imgcls.models.surface import mlp_head, replace_classifier
from imgcls.models.weights import load_pretrained

TIMM_PREFIX = "timm/"


@dataclass(frozen=True)
class Preprocessing:
    """What inputs a model's pretrained weights expect, beyond the size."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0  # centre crop of the shorter side (0.875: resize to size/0.875, crop size)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    img_size: int  # native input size
    family: str  # "cnn" or "vit"
    description: str
    preprocessing: Preprocessing | None = None  # None: the dataset's own statistics, no crop margin
    pretrained: Callable[[nn.Module], dict] | None = None  # the state dict `pretrained=True` loads


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, img_size: int, family: str, description: str,
             preprocessing: Preprocessing | None = None, pretrained: Callable[[nn.Module], dict] | None = None):
    def wrap(builder: Callable[..., nn.Module]):
        _REGISTRY[name] = ModelSpec(name, builder, img_size, family, description, preprocessing, pretrained)
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
        return ModelSpec(name, lambda **kw: timm.create_model(arch, **kw), size, family, f"timm {arch}",
                         timm_preprocessing(arch), timm_hub_weights(arch))
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UserError(f"unknown model '{name}'; choose one of {known}, or timm/<name> for any timm model")
    return _REGISTRY[name]


def timm_preprocessing(arch: str) -> Preprocessing | None:
    """Mean, std and crop of timm's default pretrained weights for `arch`."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    return Preprocessing(tuple(cfg.mean), tuple(cfg.std), cfg.crop_pct) if cfg is not None else None


def timm_hub_weights(arch: str) -> Callable[[nn.Module], dict]:
    """The state dict of timm's pretrained `arch`, downloaded from its hub (online use)."""

    def load(model: nn.Module) -> dict:
        import timm

        cfg = timm.get_pretrained_cfg(arch)
        host = "huggingface.co" if cfg is None or cfg.hf_hub_id else urlparse(cfg.url).hostname
        offline = ("offline, fetch the weights on a connected machine and pass the file: "
                   "--pretrained path/to/weights.safetensors")
        try:  # fail in seconds, not after a minute of download retries
            if os.environ.get("IMGCLS_OFFLINE") == "1":
                raise OSError("IMGCLS_OFFLINE=1")
            socket.create_connection((host, 443), timeout=5).close()
        except OSError:
            raise UserError(f"cannot reach {host} for timm's pretrained {arch}; {offline}") from None
        try:
            return timm.create_model(arch, pretrained=True).state_dict()
        except Exception as e:  # hub clients raise many exception types for network and file problems
            raise UserError(f"could not download timm's pretrained {arch} ({type(e).__name__}); {offline}") from e

    return load


def create_model(name: str, num_classes: int, pretrained: bool | str = False, head: str = "linear",
                 **kwargs) -> nn.Module:
    """Build a model by name with a fresh `num_classes` head (`head="mlp"`: the two-layer MLP head).

    `pretrained`: True loads the model's own weights (see `imgcls models`: a PyPI package or timm's
    hub), a path loads that file; the head is kept only when its class count matches.
    """
    spec = model_spec(name)
    model = spec.builder(num_classes=num_classes, **kwargs)
    if head == "mlp":
        replace_classifier(model, mlp_head(model.get_classifier().in_features, num_classes))
    elif head != "linear":
        raise UserError(f"unknown head '{head}'; use linear or mlp")
    if pretrained:
        load_pretrained(model, spec, pretrained)
    return model


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
