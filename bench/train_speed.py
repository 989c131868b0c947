"""Training throughput: the classic recipe against imgcls's own loop, per model, in one process.

    python bench/train_speed.py [--models resnet18_cifar vit_cifar convnext_cifar] [--batch-size 128]
                                [--steps 8] [--workers 2] [--data-dir DIR/cifar10] [--compile]

Same model, data and batch size on both sides. Classic: PIL images through per-image transforms
in DataLoader workers, fp32 NCHW, default AdamW (bench/classic.py). imgcls: `train_one_epoch`
itself, on uint8 batches in memory augmented as whole tensors, channels_last, --precision auto,
fused AdamW. Each side runs a warm-up and then `--steps` timed steps. Achieved GFLOP/s counts a
training step as 3x the forward FLOPs and is set against matrix-product peaks measured here.
--compile adds imgcls's loop with `torch.compile` (compilation happens in the warm-up).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F
from classic import bench_data, classic_loader, gemm_peak

from imgcls.config import TrainConfig
from imgcls.data import TrainTransform
from imgcls.models import create_model
from imgcls.models.flops import forward_gflops
from imgcls.runtime import cpu_has_fast_bf16, resolve_precision
from imgcls.training.progress import Progress
from imgcls.training.train import EpochMeter, build_optimizer, train_one_epoch
from imgcls.training.transfer import plan_groups

WARMUP = 3


def classic_speed(name: str, data, batch_size: int, steps: int, workers: int) -> float:
    torch.manual_seed(0)
    model = create_model(name, data.num_classes).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    batches = iter(classic_loader(data.train, data.mean, data.std, batch_size, workers))
    start = None
    for i, (x, y) in enumerate(itertools.islice(batches, WARMUP + steps)):
        if i == WARMUP:
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch_size / (time.perf_counter() - start)


def imgcls_speed(name: str, data, batch_size: int, steps: int, precision: str, compile: bool = False) -> float:
    torch.manual_seed(0)
    cfg = TrainConfig(model=name, batch_size=batch_size, epochs=1)
    model = create_model(name, data.num_classes).to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(model, cfg, WARMUP + steps, plan_groups(model, cfg))
    transform = TrainTransform("basic", data.img_size, data.mean, data.std, data.num_classes)
    order = torch.randperm(len(data.train))[: (WARMUP + steps) * batch_size]
    gen, device = torch.Generator().manual_seed(0), torch.device("cpu")
    meter, progress = EpochMeter(), Progress(1, WARMUP + steps, batch_size, quiet=True)

    net = torch.compile(model) if compile else model

    def run(idx):
        train_one_epoch(net, data.train.batches(idx, batch_size), optimizer, scheduler, transform, gen, meter,
                        device=device, precision=precision, should_stop=lambda: False, progress=progress)

    run(order[: WARMUP * batch_size])
    start = time.perf_counter()
    run(order[WARMUP * batch_size :])  # the loop as fit runs it: transfer, augment, step, bookkeeping
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar", "vit_cifar", "convnext_cifar"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the classic recipe")
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: bundled cifar10-mini)")
    parser.add_argument("--compile", action="store_true", help="also time imgcls's loop under torch.compile")
    args = parser.parse_args()

    data = bench_data(args.data_dir)
    if (WARMUP + args.steps) * args.batch_size > len(data.train):
        parser.error(f"{WARMUP + args.steps} steps of {args.batch_size} need more than the {len(data.train)} "
                     "training images; lower --steps or --batch-size, or pass --data-dir")
    precision = resolve_precision("auto", torch.device("cpu"))
    peak32, peak16 = gemm_peak(torch.float32), gemm_peak(torch.bfloat16)
    native = "native" if cpu_has_fast_bf16() else "emulated: no AVX512-BF16/AMX"
    peak = peak16 if precision == "bf16" else peak32
    print(f"{torch.get_num_threads()} threads; GEMM peak fp32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s "
          f"({native}); imgcls precision auto = {precision}")
    print(f"{'model':<20} {'GFLOP/img':>9} {'classic img/s':>13} {'imgcls img/s':>12} {'speed-up':>8} "
          f"{'GFLOP/s':>8} {'% fp32 peak':>11} {'% bf16 peak':>11} {'% peak used':>11}")
    for name in args.models:
        gflops = forward_gflops(create_model(name, data.num_classes), data.img_size)
        classic = classic_speed(name, data, args.batch_size, args.steps, args.workers)
        ours = imgcls_speed(name, data, args.batch_size, args.steps, precision)
        achieved = 3 * gflops * ours
        print(f"{name:<20} {gflops:>9.3f} {classic:>13.1f} {ours:>12.1f} {ours / classic:>7.2f}x {achieved:>8.0f} "
              f"{100 * achieved / peak32:>10.0f}% {100 * achieved / peak16:>10.0f}% {100 * achieved / peak:>10.0f}%",
              flush=True)
        if args.compile:
            compiled = imgcls_speed(name, data, args.batch_size, args.steps, precision, compile=True)
            print(f"{'':<20} with torch.compile: {compiled:.1f} img/s, {compiled / ours:.2f}x eager", flush=True)


if __name__ == "__main__":
    main()
