"""Training throughput: the classic recipe against imgcls's own loop, per model, in one process.

    python bench/train_speed.py [--models resnet18_cifar vit_cifar convnext_cifar] [--batch-size 128]
                                [--steps 8] [--repeats 3] [--workers 2] [--data-dir DIR/cifar10]
                                [--prefetch auto] [--compile] [--device cpu|cuda]

Same data and batch size on every side. Classic: PIL images through per-image transforms in DataLoader
workers, fp32 NCHW, default AdamW, imgcls's model (bench/classic.py). Textbook (resnet18_cifar and
vit_cifar): the same pipeline with the model a practitioner would write (torchvision's ResNet-18 with a
CIFAR stem; a ViT from nn.TransformerEncoder). imgcls: the TrainingContext
`imgcls train` builds (the resolved plan: precision, memory format, fused AdamW, and the kernel
choices of `ctx.kernels`, the model configured with them) driven by the real `train_one_epoch`, on
uint8 batches in memory augmented as whole tensors. Each side runs a warm-up and then `--steps` timed steps; the
two alternate `--repeats` times and the medians are reported. Achieved GFLOP/s counts a training
step as 3x the forward FLOPs and is set against the matrix-product peak of the precision in use,
measured here. `--prefetch on off` times imgcls's loop once per setting (alternating).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F
from classic import TEXTBOOK, bench_data, classic_loader, gemm_peak

from imgcls.config import build_config
from imgcls.models import create_model
from imgcls.models.flops import forward_gflops
from imgcls.training.checkpointer import EpochMeter, TrainState
from imgcls.training.context import build_context
from imgcls.training.distributed import World
from imgcls.training.loop import train_one_epoch
from imgcls.training.progress import Progress
from imgcls.training.train import prepare_inputs

WARMUP = 3


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Classic:
    """The classic loop; with `textbook`, over the textbook model instead of imgcls's."""

    def __init__(self, name: str, data, batch_size: int, workers: int, device: str = "cpu", textbook: bool = False):
        torch.manual_seed(0)
        self.device = device
        model = TEXTBOOK[name](data.num_classes) if textbook else create_model(name, data.num_classes)
        self.model = model.to(device).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05)
        self.batches = itertools.cycle(classic_loader(data.train, data.mean, data.std, batch_size, workers))
        self.batch_size = batch_size

    def speed(self, steps: int) -> float:
        for i, (x, y) in enumerate(itertools.islice(self.batches, WARMUP + steps)):
            if i == WARMUP:
                _sync(self.device)
                start = time.perf_counter()
            x, y = x.to(self.device), y.to(self.device)
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        _sync(self.device)
        return steps * self.batch_size / (time.perf_counter() - start)


class Imgcls:
    """The context `imgcls train` builds for this model, and its loop."""

    def __init__(self, name: str, data_dir: str | None, batch_size: int, prefetch: str, compile: bool,
                 device: str = "cpu"):
        cfg = build_config(model=name, batch_size=batch_size, epochs=1, quiet=True, prefetch=prefetch,
                           compile="on" if compile else "off",
                           **({"data": "cifar10", "data_dir": data_dir} if data_dir else {"data": "cifar10-mini"}))
        start = time.perf_counter()
        self.ctx = build_context(cfg, World(), device, fresh=True)  # data, model and the kernel choice
        self.context_seconds = time.perf_counter() - start
        self.inputs = prepare_inputs(self.ctx, TrainState())
        self.gen, self.batch_size = torch.Generator().manual_seed(0), batch_size

    def run(self, steps: int) -> None:
        order = torch.randperm(len(self.inputs.train), generator=self.gen)[: steps * self.batch_size]
        train_one_epoch(self.ctx, self.inputs.trainee, self.inputs.train.batches(order, self.batch_size),
                        self.inputs.transform, self.gen, EpochMeter(), should_stop=lambda read=True: False,
                        progress=Progress(1, self.ctx.steps_per_epoch, self.batch_size, quiet=True))

    def speed(self, steps: int) -> float:
        self.run(WARMUP)
        _sync(self.ctx.device.type)
        start = time.perf_counter()
        self.run(steps)  # the loop as fit runs it: prefetch or fetch, augment, step, device sums
        _sync(self.ctx.device.type)  # train_one_epoch syncs at its end on CUDA already; harmless twice
        return steps * self.batch_size / (time.perf_counter() - start)

    def kernels(self) -> str:
        kernels = self.ctx.kernels
        if kernels is None:
            return "kernels: none"
        return f"{kernels.to_dict()}, context (data, model, kernel choice) built in {self.context_seconds:.1f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar", "vit_cifar", "convnext_cifar"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of classic and imgcls; medians")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the classic recipe")
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: bundled cifar10-mini)")
    parser.add_argument("--prefetch", nargs="+", default=["auto"], choices=("auto", "on", "off"),
                        help="imgcls's --prefetch; several are timed in turn")
    parser.add_argument("--no-classic", action="store_true", help="time imgcls only")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both sides train (cpu)")
    parser.add_argument("--compile", action="store_true", help="imgcls's loop under torch.compile (--compile on)")
    args = parser.parse_args()

    data = bench_data(args.data_dir)
    if (WARMUP + args.steps) * args.batch_size > len(data.train):
        parser.error(f"{WARMUP + args.steps} steps of {args.batch_size} need more than the {len(data.train)} "
                     "training images; lower --steps or --batch-size, or pass --data-dir")
    peaks = {p: gemm_peak(dtype, device=args.device)
             for p, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))
             if p != "fp16" or args.device == "cuda"}
    print(f"{torch.get_num_threads()} threads; GEMM peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} "
          f"GFLOP/s; batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats, medians", flush=True)
    for name in args.models:
        gflops = forward_gflops(create_model(name, data.num_classes), data.img_size)
        loops = {} if args.no_classic else {"classic": Classic(name, data, args.batch_size, args.workers, args.device)}
        if name in TEXTBOOK and not args.no_classic:
            loops["textbook"] = Classic(name, data, args.batch_size, args.workers, args.device, textbook=True)
        ours = {p: Imgcls(name, args.data_dir, args.batch_size, p, args.compile, args.device) for p in args.prefetch}
        times: dict[str, list[float]] = {**{k: [] for k in loops}, **{p: [] for p in ours}}
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits every side
            for kind, loop in loops.items():
                times[kind].append(loop.speed(args.steps))
            for p, run in ours.items():
                times[p].append(run.speed(args.steps))
        med = {k: statistics.median(v) for k, v in times.items() if v}
        first = next(iter(ours.values()))
        precision = first.ctx.precision
        print(f"\n{name}: {gflops:.3f} GFLOP/img forward, precision {precision}, {first.kernels()}")
        for kind in loops:
            print(f"  {kind:<22} {med[kind]:>8.1f} img/s   (runs: {', '.join(f'{v:.0f}' for v in times[kind])})")
        for p, run in ours.items():
            achieved = 3 * gflops * med[p]
            where = run.ctx.cfg.prefetch  # resolved: on or off
            ratio = "".join(f"{med[p] / med[k]:>5.2f}x {k} (runs paired: "
                            f"{', '.join(f'{a / b:.2f}' for a, b in zip(times[p], times[k], strict=True))})  "
                            for k in loops)
            print(f"  {'imgcls prefetch ' + p + ' (' + where + ')':<22} {med[p]:>8.1f} img/s   {ratio}"
                  f"{achieved:>6.0f} GFLOP/s = {100 * achieved / peaks[precision]:.0f}% of the {precision} peak "
                  f"(runs: {', '.join(f'{v:.0f}' for v in times[p])})", flush=True)


if __name__ == "__main__":
    main()
