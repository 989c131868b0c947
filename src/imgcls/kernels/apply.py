"""A model configured with a kernel choice, once, before it runs: the attention modules' `fused_attn`
set, depthwise convolutions that are to run in float32 swapped for `DepthwiseConv2d`, the weights laid
out. Nothing here is entered or left around a forward pass, and no registry remembers a model, so
what a model computes is visible on the model and two threads calling it see the same thing.

Training and inference may want different kernels for the same weights: `inference_copy` gives a
second module tree over the very same parameter and buffer tensors, configured for inference, so
validation during training scores the current weights with the inference kernels and no copying.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from imgcls.kernels.choice import NONE, layout_of
from imgcls.models.contract import attention_modules


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise convolution that runs in float32 under autocast (input cast up, output left float32)
    when built with `float32=True`; otherwise exactly nn.Conv2d. Same parameters, same state_dict keys."""

    def __init__(self, *args, float32: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.float32 = float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def is_depthwise(module: nn.Module) -> bool:
    """A depthwise convolution with nn.Conv2d's own forward (not a subclass such as timm's Conv2dSame,
    which pads in its own forward and is left alone)."""
    return (type(module) in (nn.Conv2d, DepthwiseConv2d) and module.groups > 1
            and module.groups == module.in_channels == module.out_channels)


def has_depthwise(model: nn.Module) -> bool:
    return any(is_depthwise(m) for m in model.modules())


def uses_attention(model: nn.Module) -> bool:
    """Whether the model has attention whose kernel can be chosen (modules with `fused_attn`)."""
    return bool(attention_modules(model))


def set_attention(model: nn.Module, kernel: str) -> None:
    """sdpa: scaled_dot_product_attention; manual: written out. `none` leaves the model as built."""
    if kernel != NONE:
        for module in attention_modules(model):
            module.fused_attn = kernel == "sdpa"


def set_depthwise(model: nn.Module, precision: str) -> None:
    """float32: every plain depthwise nn.Conv2d becomes a DepthwiseConv2d holding the same parameter
    tensors (optimizers, DDP and EMA see the same ones) that runs in float32 under autocast; autocast:
    at the run's precision. `none` leaves the model as built."""
    if precision == NONE:
        return
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if not is_depthwise(conv):
                continue
            if type(conv) is nn.Conv2d:
                if precision != "float32":  # nn.Conv2d already runs at the autocast precision
                    continue
                swap = DepthwiseConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                       conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                                       conv.padding_mode, device="meta")
                swap.weight, swap.bias = conv.weight, conv.bias
                swap.train(conv.training)
                setattr(parent, name, swap)
                conv = swap
            conv.float32 = precision == "float32"


def configure(model: nn.Module, attention: str, depthwise: str, memory_format: str) -> nn.Module:
    """`model` set to compute with these kernels and laid out in `memory_format`; returns it."""
    set_attention(model, attention)
    set_depthwise(model, depthwise)
    return model.to(memory_format=layout_of(memory_format))


def inference_copy(model: nn.Module, attention: str, depthwise: str) -> nn.Module:
    """A second module tree over `model`'s very parameter and buffer tensors (changes to the weights show
    in both), in eval mode and configured with these kernels: training flips `model` between train and
    eval, this copy stays as it is."""
    view = copy.deepcopy(model, _shared_tensors(model))
    set_attention(view, attention)
    set_depthwise(view, depthwise)
    return view.eval()


def _shared_tensors(model: nn.Module) -> dict:
    """A deepcopy memo that maps every parameter and buffer to itself, so the copy shares them."""
    return {id(t): t for t in (*model.parameters(), *model.buffers())}
