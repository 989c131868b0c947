"""Weight initialisations that apply to any model, chosen by `--init`."""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def dirac_init(model: nn.Module) -> int:
    """airbench's identity initialisation. In every dense stride-1 convolution with a kernel larger than
    1x1 and at least as many outputs as inputs (so not a ViT's patch embedding), the first in-channels
    filters become the identity (a single 1 at the centre tap of their own channel); the other filters
    keep the default initialisation. A block then starts close to passing its input through. Returns
    how many convolutions were changed."""
    changed = 0
    for module in model.modules():
        if not isinstance(module, nn.Conv2d) or module.groups != 1 or max(module.stride) != 1:
            continue
        if max(module.kernel_size) == 1 or module.out_channels < module.in_channels:
            continue
        nn.init.dirac_(module.weight[: module.in_channels])
        changed += 1
    return changed
