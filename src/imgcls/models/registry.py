"""The model registry and `create_model`, in timm's spirit: one factory over named builders.

Every model it builds, ours or timm's, meets the contract of models/contract.py (forward_features,
forward_head, get_classifier, reset_classifier, group_matcher, num_features), so transfer learning,
the kernel choice and Grad-CAM work on all of them.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

import torch
import torch.nn as nn

from imgcls.config import NORMALIZATIONS
from imgcls.data.datasets import normalization_named
from imgcls.data.preprocessing import Preprocessing
from imgcls.errors import UserError, first_line
from imgcls.models.surface import mlp_head, replace_classifier
from imgcls.models.weights import load_pretrained

TIMM_PREFIX = "timm/"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    builder: Callable[..., nn.Module]
    img_size: int  # native input size
    family: str  # "cnn" or "vit"
    description: str
    preprocessing: Preprocessing | None = None  # what pretrained weights expect; None: the dataset's own
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
        return ModelSpec(name, _timm_builder(arch), size, family, f"timm {arch}",
                         timm_preprocessing(arch), timm_hub_weights(arch))
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise UserError(f"unknown model '{name}'; choose one of {known}, or timm/<name> for any timm model")
    return _REGISTRY[name]


def pretrained_preprocessing(cfg, spec: ModelSpec) -> tuple[str, float]:
    """(normalisation, crop_pct) a run of `cfg` (a TrainConfig) trains with: pretrained weights bring their
    own; otherwise the dataset's and 1 (the whole image)."""
    prep = spec.preprocessing if cfg.pretrained else None
    if prep is None:
        return cfg.normalize, 1.0
    if cfg.normalize != "auto":
        return cfg.normalize, prep.crop_pct
    name = normalization_named(prep.mean, prep.std)
    if name is None:
        raise UserError(f"{cfg.model}'s weights expect mean {prep.mean} and std {prep.std}, which imgcls does not "
                        f"know by name; pass --normalize with the closest of {', '.join(NORMALIZATIONS)}")
    return name, prep.crop_pct


def _timm_builder(arch: str) -> Callable[..., nn.Module]:
    """timm's `arch`; one that takes a single input size (ViT, DeiT, Swin, ...) is built with
    dynamic_img_size=True where it accepts it, so it runs at any --img-size its patches divide. Its
    parameters keep their native shapes (positions are resampled on the fly), so pretrained weights
    and the run's own checkpoints load whatever the size. A fixed-size model without that option
    stays fixed, and `check_forward` refuses other sizes in one line."""

    def build(**kw) -> nn.Module:
        import timm

        cfg = timm.get_pretrained_cfg(arch)
        if cfg is not None and cfg.fixed_input_size:
            try:
                return timm.create_model(arch, dynamic_img_size=True, **kw)
            except TypeError:  # the model has no such option (e.g. MLP-Mixer)
                pass
        return timm.create_model(arch, **kw)

    return build


def timm_preprocessing(arch: str) -> Preprocessing | None:
    """Native size, mean, std and crop of timm's default pretrained weights for `arch`."""
    import timm

    cfg = timm.get_pretrained_cfg(arch)
    if cfg is None:
        return None
    return Preprocessing(cfg.input_size[-1], tuple(cfg.mean), tuple(cfg.std), cfg.crop_pct)


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
                 img_size: int | None = None, **kwargs) -> nn.Module:
    """Build a model by name with a fresh `num_classes` head (`head="mlp"`: the two-layer MLP head).

    `pretrained`: True loads the model's own weights (see `imgcls models`: a PyPI package or timm's
    hub), a path loads that file; the head is kept only when its class count matches.
    `img_size`: the input size it will see; given, one image of that size runs through the model
    (`check_forward`) and a size it cannot take is refused here. Every model written here is
    size-agnostic (global pooling; our ViT resamples its positions), so the build itself ignores it.
    """
    spec = model_spec(name)
    model = spec.builder(num_classes=num_classes, **kwargs)
    if head == "mlp":
        replace_classifier(model, mlp_head(model.get_classifier().in_features, num_classes))
    elif head != "linear":
        raise UserError(f"unknown head '{head}'; use linear or mlp")
    if pretrained:
        load_pretrained(model, spec, pretrained)
    if img_size is not None:
        check_forward(model, img_size, name, spec.img_size)
    return model


def check_forward(model: nn.Module, img_size: int, name: str = "the model", native: int | None = None) -> None:
    """Run one blank img_size x img_size image through `model` (eval mode, no gradients) so that a size
    the architecture cannot take fails now, in one line, before any data is read or run folder made."""
    hint = f"use its native --img-size {native} or another size it takes" if native else "choose another --img-size"
    if img_size < 1:
        raise UserError(f"--img-size must be a positive number of pixels (got {img_size}); {hint}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, img_size, img_size, device=device))
    except (RuntimeError, AssertionError, ValueError, TypeError, IndexError) as e:
        # architectures say "too small" or "wrong size" in many ways: conv kernels, asserts, reshapes
        raise UserError(f"{name} cannot take {img_size}x{img_size} images ({first_line(e, 160)}); {hint}") from None
    finally:
        model.train(was_training)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
