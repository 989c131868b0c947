"""Where a training step's time goes: torch.profiler's operator table for one model.

    python bench/profile_step.py [--model vit_cifar] [--batch-size 128] [--steps 3] [--precision auto]

Runs imgcls's step (channels_last, autocast per --precision, fused AdamW) on random 32x32 inputs
after a warm-up, and prints the operators by total CPU time with their share of the step, so
attention, LayerNorm, GELU, copies and dtype conversions can be weighed against the matmuls.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from imgcls.config import TrainConfig
from imgcls.models import create_model
from imgcls.runtime import autocast, resolve_precision
from imgcls.training.train import build_optimizer
from imgcls.training.transfer import plan_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_cifar")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    torch.manual_seed(0)
    model = create_model(args.model, 10).to(memory_format=torch.channels_last).train()
    cfg = TrainConfig(model=args.model, batch_size=args.batch_size, epochs=1)
    optimizer, _ = build_optimizer(model, cfg, args.steps + 1, plan_groups(model, cfg))
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))

    def step():
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{args.model}, batch {args.batch_size}, {precision}: {total / 1e3 / args.steps:.0f} ms per step "
          f"({args.batch_size * args.steps / (total / 1e6):.0f} img/s under the profiler)")
    print(f"{'operator':<44} {'self ms/step':>12} {'share':>6} {'calls/step':>10}")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[: args.rows]:
        print(f"{e.key[:44]:<44} {e.self_cpu_time_total / 1e3 / args.steps:>12.1f} "
              f"{100 * e.self_cpu_time_total / total:>5.1f}% {e.count // args.steps:>10}")


if __name__ == "__main__":
    main()
