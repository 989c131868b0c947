"""What a run computes with: the kernels chosen for training and for inference, and how each was chosen."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

# The candidates, declared with the options (config.py). Attention: sdpa (torch's own backend dispatch) or
# manual (timm's `fused_attn = False`); a pinned SDPA backend is not a candidate: torch selects backends with
# process-wide switches (torch.nn.attention.sdpa_kernel), which two threads would race on. Depthwise: float32
# under bf16/fp16 autocast is faster for oneDNN's depthwise kernels on some CPUs (docs/results.md).
from imgcls.config import ATTENTION_KERNELS, DEPTHWISE_PRECISIONS, MEMORY_FORMATS  # noqa: E402, F401
from imgcls.config import RUN_PRECISIONS as PRECISIONS  # noqa: E402, F401

NONE = "none"  # the plan's value where there is nothing to choose (no attention, no depthwise, no autocast)


def layout_of(memory_format: str) -> torch.memory_format:
    return torch.contiguous_format if memory_format == "contiguous" else torch.channels_last


@dataclass
class KernelChoice:
    """`source[field]`: "measured", "cache", "given" or "none" (nothing to choose); `timings[field][candidate]`:
    the milliseconds measured (per image for eval_batch_size)."""

    precision_train: str = "fp32"  # fp32 | bf16 | fp16 | none (nothing trains: inference alone)
    precision_eval: str = "fp32"
    attention_train: str = NONE  # sdpa | manual | none
    attention_eval: str = NONE
    depthwise_train: str = NONE  # autocast | float32 | none
    depthwise_eval: str = NONE
    memory_format: str = "channels_last"
    compile: str = "off"  # on | off
    eval_batch_size: int = 256
    source: dict[str, str] = field(default_factory=dict)
    timings: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @property
    def layout(self) -> torch.memory_format:
        return layout_of(self.memory_format)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for a command's header."""
        parts = [f"precision {self.precision_train} (train) / {self.precision_eval} (inference)"
                 if self.precision_train != NONE else f"precision {self.precision_eval}"]
        if NONE not in (self.attention_train, self.attention_eval):
            parts.append(f"attention {self.attention_train} (train) / {self.attention_eval} (inference)")
        if NONE not in (self.depthwise_train, self.depthwise_eval):
            parts.append(f"depthwise {self.depthwise_train} (train) / {self.depthwise_eval} (inference)")
        parts += [self.memory_format, f"compile {self.compile}", f"eval batch {self.eval_batch_size}"]
        how = sorted({s for s in self.source.values() if s != NONE})
        return "kernels: " + ", ".join(parts) + (f" ({'/'.join(how)})" if how else "")
