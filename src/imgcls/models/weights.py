"""Pretrained weights: a model's own (PyPI package or timm's hub) or any local file, loaded safely.

Files are read without executing code (safetensors, or torch.load with weights_only=True). The
classifier is dropped when its class count differs; every other tensor must fit, or the load is
refused with the first mismatch named, so a backbone never trains half-initialised by accident.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from imgcls.errors import UserError, first_line
from imgcls.models.checkpoint import nonfinite_tensors, safe_torch_load
from imgcls.models.surface import classifier_name

# BatchNorm's running statistics: without them a pretrained backbone computes different features.
NORM_STATISTICS = ("running_mean", "running_var")


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    new_head: list[str] = field(default_factory=list)  # classifier tensors left at their fresh init
    missing: list[str] = field(default_factory=list)  # buffers absent from the file (num_batches_tracked)
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
    fix = "pass a .safetensors file or a torch file saved from a state_dict"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as e:  # noqa: BLE001  safetensors reports a bad header in several exception types
            raise UserError(f"cannot read weights from {path} ({first_line(e)}); {fix}") from e
    else:
        state = safe_torch_load(path, "weights file", fix)
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors; save the weights with model.state_dict()")
    bad = nonfinite_tensors(state)
    if bad:
        raise UserError(f"weights file {path} holds non-finite weights (NaN or Inf in float32 in {len(bad)} tensors, "
                        f"e.g. {bad[0]}); the training that wrote it diverged: pass weights from a healthy run")
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
    buffers_missing = [k for k in own if k not in usable and k not in params and not k.startswith(head_prefix)]
    statistics = [k for k in buffers_missing if k.endswith(NORM_STATISTICS)]
    if statistics:  # normalising by mean 0 / variance 1 would feed every layer above wrong features
        raise UserError(
            f"weights in {source} lack {len(statistics)} BatchNorm statistics of {model_name} (e.g. "
            f"{_few(statistics)}); pass a file saved with model.state_dict(), which includes its buffers"
        )
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    report.new_head = [k for k in own if k.startswith(head_prefix) and k not in usable]
    if report.new_head:
        _zero_last_linear(model.get_classifier())
    report.missing = buffers_missing  # counters such as num_batches_tracked: kept at init, reported
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
