"""Pretrained weights: a model's own (PyPI package or timm's hub) or any local file, loaded safely.

Files are read without executing code (safetensors, or torch.load with weights_only=True). The
classifier is dropped when its class count differs; every other tensor must fit, or the load is
refused with the first mismatch named, so a backbone never trains half-initialised by accident.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from imgcls.errors import UserError
from imgcls.models.surface import classifier_name


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    new_head: list[str] = field(default_factory=list)  # classifier tensors left at their fresh init
    missing: list[str] = field(default_factory=list)  # buffers absent from the file (e.g. num_batches_tracked)
    unexpected: list[str] = field(default_factory=list)  # tensors in the file that the model lacks

    def __str__(self) -> str:
        text = f"loaded {self.loaded} tensors from {self.source}"
        if self.new_head:
            text += f"; new head, trained from scratch ({', '.join(self.new_head)})"
        if self.missing:
            text += f"; {len(self.missing)} buffer(s) not in the file, kept at init ({_few(self.missing)})"
        if self.unexpected:
            text += f"; {len(self.unexpected)} tensor(s) in the file unused ({_few(self.unexpected)})"
        return text


def _few(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file holding one (bare, or under
    "model"/"state_dict" as imgcls, timm and most training scripts save it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; pass --pretrained an existing .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        reason = str(e).splitlines()[0][:120]
        raise UserError(f"cannot read weights from {path} ({reason}); pass a .safetensors file or a "
                        "torch file saved from a state_dict") from e
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors; save the weights with model.state_dict()")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DistributedDataParallel's prefix


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str, model_name: str) -> LoadReport:
    """Copy `state` into `model`: the head only when its shapes fit, everything else must."""
    own = model.state_dict()
    head_prefix = classifier_name(model) + "."
    report = LoadReport(source)
    usable = {}
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            if not key.startswith(head_prefix):
                raise UserError(
                    f"weights in {source} do not fit {model_name}: {key} is {tuple(value.shape)} in the file but "
                    f"{tuple(own[key].shape)} in the model; pass weights saved from {model_name}"
                )
        else:
            usable[key] = value
    params = {name for name, _ in model.named_parameters()}
    backbone_missing = [k for k in own if k not in usable and k in params and not k.startswith(head_prefix)]
    if backbone_missing:
        found = len(usable) - sum(k.startswith(head_prefix) for k in usable)
        raise UserError(
            f"weights in {source} do not fit {model_name}: {len(backbone_missing)} of its backbone parameters are "
            f"missing (e.g. {_few(backbone_missing)}; {found} matched); pass weights saved from {model_name}"
        )
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    report.new_head = [k for k in own if k.startswith(head_prefix) and k not in usable]
    if report.new_head:
        _zero_last_linear(model.get_classifier())
    report.missing = [k for k in own if k not in usable and k not in params and not k.startswith(head_prefix)]
    return report


def _zero_last_linear(head: nn.Module) -> None:
    """A new head on pretrained features starts at zero: uniform predictions, no random logit scale.
    (timm's EfficientNet init draws it from +-1/sqrt(num_classes), which for 2 classes puts logits
    near +-30 on these features and costs the first epochs.)"""
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)


def load_pretrained(model: nn.Module, spec, source: bool | str) -> LoadReport:
    """Load the model's own weights (`source=True`) or a file (`source` is its path) into `model`."""
    if source is True:
        if spec.pretrained is None:
            raise UserError(f"{spec.name} has no pretrained weights of its own; pass a file: "
                            "--pretrained path/to/weights.safetensors")
        return apply_state_dict(model, spec.pretrained(model), f"{spec.name}'s pretrained weights", spec.name)
    return apply_state_dict(model, read_weights_file(source), str(source), spec.name)
