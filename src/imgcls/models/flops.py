"""Forward FLOPs per image, counted by PyTorch's own FlopCounterMode (matmuls and convolutions)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


@torch.no_grad()
def forward_gflops(model: torch.nn.Module, img_size: int) -> float:
    """GFLOPs of one forward pass of one img_size x img_size image (a multiply-add counts as 2)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, img_size, img_size, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 1e9
