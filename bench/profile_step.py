"""Where a training step's time goes: torch.profiler's operator table for one model.

    python bench/profile_step.py [--model vit_cifar] [--batch-size 128] [--steps 3] [--precision auto]
                                 [--prefetch off] [--data-dir DIR/cifar10]

Builds the TrainingContext `imgcls train` builds (the resolved plan: precision, memory format, fused
AdamW, the kernel choices of `ctx.kernels`, the model configured with them) and profiles the real
`train_one_epoch` over `--steps` steps after a warm-up: augmentation, the step and the loop's
bookkeeping, all as fit runs them. It prints the operators by self CPU time with their share, so
attention, LayerNorm, GELU, copies, dtype conversions, augmentation and optimizer can be weighed
against the matmuls, and the epoch's data and compute time as the loop measured them.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from imgcls.config import build_config
from imgcls.training.checkpointer import EpochMeter, TrainState
from imgcls.training.context import build_context
from imgcls.training.distributed import World
from imgcls.training.loop import train_one_epoch
from imgcls.training.progress import Progress
from imgcls.training.train import prepare_inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_cifar")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--prefetch", default="off", choices=("auto", "on", "off"))
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: bundled cifar10-mini)")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    data = {"data": "cifar10", "data_dir": args.data_dir} if args.data_dir else {"data": "cifar10-mini"}
    cfg = build_config(model=args.model, batch_size=args.batch_size, epochs=1, quiet=True, precision=args.precision,
                       prefetch=args.prefetch, **data)
    ctx = build_context(cfg, World(), "cpu", fresh=True)  # chooses the kernels and configures the model
    inputs = prepare_inputs(ctx, TrainState())
    gen = torch.Generator().manual_seed(0)

    def run(steps: int) -> EpochMeter:
        meter = EpochMeter()
        order = torch.randperm(len(inputs.train), generator=gen)[: steps * args.batch_size]
        train_one_epoch(ctx, inputs.trainee, inputs.train.batches(order, args.batch_size), inputs.transform, gen, meter,
                        should_stop=lambda read=True: False,
                        progress=Progress(1, ctx.steps_per_epoch, args.batch_size, quiet=True))
        return meter

    run(2)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("train_one_epoch"):
            meter = run(args.steps)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    kernels = ctx.kernels
    print(f"{args.model}, batch {args.batch_size}, {ctx.precision}, prefetch {ctx.cfg.prefetch}, "
          f"{kernels.to_dict() if kernels is not None else 'kernels: none'}")
    ips = args.batch_size * args.steps / (total / 1e6)
    print(f"{total / 1e3 / args.steps:.0f} ms self CPU time per step ({ips:.0f} img/s under the profiler); "
          f"the loop measured data {meter.data_seconds / args.steps * 1e3:.1f} ms and "
          f"compute {meter.compute_seconds / args.steps * 1e3:.1f} ms per step")
    print(f"{'operator':<44} {'self ms/step':>12} {'share':>6} {'calls/step':>10}")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]:
        print(f"{e.key[:44]:<44} {e.self_cpu_time_total / 1e3 / args.steps:>12.1f} "
              f"{100 * e.self_cpu_time_total / total:>5.1f}% {e.count // args.steps:>10}")


if __name__ == "__main__":
    main()
