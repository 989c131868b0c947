"""Where and how tensors run: device, precision, seeding. Shared by training and evaluation."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from imgcls.errors import UserError


def resolve_device(name: str) -> torch.device:
    """The device `--device` names. On CUDA, fp32 matrix products run in TF32 from here on (torch's "high"
    float32 precision, as fp32 is among the precisions measured there): a setting of the process, made once."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def check_precision(name: str, device: torch.device) -> str:
    """A precision the device can run (`auto` is decided by measurement, imgcls.kernels)."""
    if name == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 is not supported on the CPU; use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("this GPU has no bf16; use --precision fp16 or fp32")
    return name


def autocast(device: torch.device, precision: str):
    """The autocast context for a precision; fp32 runs plain."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
