"""The kernel choices of issue 13 in isolation: attention, depthwise convolution, and the layout's batch.

    python bench/layer_kernels.py [--batch-size 128] [--repeats 10] [--layout-model resnet18_cifar]

Attention: one layer of vit_cifar (65 tokens, 8 heads of 32) forward and backward, through
scaled_dot_product_attention as torch dispatches it ("sdpa", imgcls's candidate), pinned to each CPU
backend (math, flash), and written out (matmul, softmax, matmul: "manual"), in bf16 and fp32.
Depthwise: convnext_cifar's 7x7 depthwise convolutions (channels-last, one per stage: 64 channels at
16x16 down to 512 at 2x2) forward and backward, in bf16 and fp32. Milliseconds, medians of
`--repeats` calls after two warm-up calls; the variants of one row are timed in turn.
Layout: a bf16 training step of `--layout-model` (forward, backward, fused AdamW), channels-last against
contiguous, at 32 images and at `--batch-size`, in ms per image (why imgcls.kernels times the training
layout on the run's batch).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from imgcls.models import create_model

BACKENDS = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}
STAGES = ((64, 16), (128, 8), (256, 4), (512, 2))  # convnext_cifar: channels, map size


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def attention_step(kind: str, dtype: torch.dtype, batch: int, heads=8, tokens=65, dim=32):
    qkv = torch.randn(batch, tokens, 3, heads, dim, dtype=dtype, requires_grad=True)

    def step():
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        if kind == "manual":  # as imgcls's ViT and timm's attention with fused_attn off
            out = ((q * dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v
        elif kind == "sdpa":  # torch picks the backend: what imgcls's "sdpa" candidate runs
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(BACKENDS[kind]):
                out = F.scaled_dot_product_attention(q, k, v)
        out.backward(torch.ones_like(out))
        qkv.grad = None

    return step


def depthwise_step(channels: int, size: int, dtype: torch.dtype, batch: int):
    x = torch.randn(batch, channels, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    weight = torch.randn(channels, 1, 7, 7, dtype=dtype, requires_grad=True)

    def step():
        out = F.conv2d(x, weight, padding=3, groups=channels)
        out.backward(torch.ones_like(out))
        x.grad = weight.grad = None

    return step


def layout_step(model: torch.nn.Module, optimizer, layout: torch.memory_format, batch: int):
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (batch,))

    def step():
        model.to(memory_format=layout)  # a no-op when it is laid out so already
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--layout-model", default="resnet18_cifar")
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads, batch {args.batch_size}, ms per forward + backward (medians)")
    for dtype in (torch.bfloat16, torch.float32):
        row = {kind: median_ms(attention_step(kind, dtype, args.batch_size), args.repeats)
               for kind in ("sdpa", "math", "flash", "manual")}
        print(f"attention, one vit_cifar layer, {str(dtype)[6:]}: "
              + ", ".join(f"{kind} {ms:.1f}" for kind, ms in row.items()))
    for channels, size in STAGES:
        row = {str(dtype)[6:]: median_ms(depthwise_step(channels, size, dtype, args.batch_size), args.repeats)
               for dtype in (torch.bfloat16, torch.float32)}
        print(f"depthwise 7x7, {channels} channels at {size}x{size}: "
              + ", ".join(f"{name} {ms:.1f}" for name, ms in row.items())
              + f" (bf16 / fp32 = {row['bfloat16'] / row['float32']:.2f})")
    torch.manual_seed(0)
    model = create_model(args.layout_model, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    for batch in sorted({32, args.batch_size}):
        row = {}
        for _ in range(3):  # rounds alternating the layouts (each re-lays the weights out once a round)
            for name, layout in (("channels_last", torch.channels_last), ("contiguous", torch.contiguous_format)):
                row.setdefault(name, []).append(median_ms(layout_step(model, optimizer, layout, batch), 3) / batch)
        cl, contiguous = statistics.median(row["channels_last"]), statistics.median(row["contiguous"])
        print(f"layout, {args.layout_model} bf16 training step at {batch} images: channels_last {cl:.2f}, "
              f"contiguous {contiguous:.2f} ms/image (channels_last {100 * (contiguous / cl - 1):+.0f}% faster)")


if __name__ == "__main__":
    main()
