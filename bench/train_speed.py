"""Training throughput: the classic recipe against imgcls's own loop, per model, in one process.

    python bench/train_speed.py [--models resnet18_cifar vit_cifar convnext_cifar] [--batch-size 128]
                                [--steps 8] [--repeats 3] [--workers 2] [--data-dir DIR/cifar10]
                                [--prefetch auto] [--compile] [--device cpu|cuda]

Same model, data and batch size on both sides. Classic: PIL images through per-image transforms
in DataLoader workers, fp32 NCHW, default AdamW (bench/classic.py). imgcls: the TrainingContext
`imgcls train` builds (precision, memory format, fused AdamW, and the kernel choices of
`ctx.kernels` where present) driven by the real `train_one_epoch` and `Stepper`, on uint8 batches
in memory augmented as whole tensors. Each side runs a warm-up and then `--steps` timed steps; the
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
from classic import bench_data, classic_loader, gemm_peak

from imgcls.config import build_config
from imgcls.models import create_model
from imgcls.models.flops import forward_gflops
from imgcls.runtime import cpu_has_fast_bf16
from imgcls.training import train
from imgcls.training.checkpointer import EpochMeter, TrainState
from imgcls.training.context import build_context
from imgcls.training.distributed import World
from imgcls.training.loop import Stepper, prefetching, train_one_epoch
from imgcls.training.progress import Progress
from imgcls.training.train import prepare_inputs

WARMUP = 3


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Classic:
    def __init__(self, name: str, data, batch_size: int, workers: int, device: str = "cpu"):
        torch.manual_seed(0)
        self.device = device
        self.model = create_model(name, data.num_classes).to(device).train()
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
        self.ctx = build_context(cfg, World(), device, fresh=True)
        start = time.perf_counter()
        if hasattr(train, "choose_run_kernels"):  # what fit does next: attention, layout, compile (imgcls.kernels)
            train.choose_run_kernels(self.ctx)
        self.choice_seconds = time.perf_counter() - start
        self.inputs = prepare_inputs(self.ctx, TrainState())
        self.stepper = Stepper(self.ctx, self.inputs.trainee)
        self.gen, self.batch_size = torch.Generator().manual_seed(0), batch_size

    def run(self, steps: int) -> None:
        order = torch.randperm(len(self.inputs.train), generator=self.gen)[: steps * self.batch_size]
        train_one_epoch(self.stepper, self.inputs.train.batches(order, self.batch_size), self.inputs.transform,
                        self.gen, EpochMeter(), should_stop=lambda read=True: False,
                        progress=Progress(1, self.ctx.steps_per_epoch, self.batch_size, quiet=True))

    def speed(self, steps: int) -> float:
        self.run(WARMUP)
        _sync(self.ctx.device.type)
        start = time.perf_counter()
        self.run(steps)  # the loop as fit runs it: prefetch or fetch, augment, step, device sums
        _sync(self.ctx.device.type)  # train_one_epoch syncs at its end on CUDA already; harmless twice
        return steps * self.batch_size / (time.perf_counter() - start)

    def kernels(self) -> str:
        kernels = getattr(self.ctx, "kernels", None)
        if kernels is None:
            return "kernels: n/a"
        return f"{kernels.to_dict()}, chosen in {self.choice_seconds:.1f} s"


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
    native = "native" if args.device == "cuda" or cpu_has_fast_bf16() else "emulated: no AVX512-BF16/AMX"
    print(f"{torch.get_num_threads()} threads; GEMM peak fp32 {peaks['fp32']:.0f} GFLOP/s, bf16 {peaks['bf16']:.0f} "
          f"GFLOP/s ({native}); batch {args.batch_size}, {args.steps} steps x {args.repeats} repeats, medians",
          flush=True)
    for name in args.models:
        gflops = forward_gflops(create_model(name, data.num_classes), data.img_size)
        classic = None if args.no_classic else Classic(name, data, args.batch_size, args.workers, args.device)
        ours = {p: Imgcls(name, args.data_dir, args.batch_size, p, args.compile, args.device) for p in args.prefetch}
        times: dict[str, list[float]] = {"classic": [], **{p: [] for p in ours}}
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both sides
            if classic is not None:
                times["classic"].append(classic.speed(args.steps))
            for p, run in ours.items():
                times[p].append(run.speed(args.steps))
        med = {k: statistics.median(v) for k, v in times.items() if v}
        first = next(iter(ours.values()))
        precision = first.ctx.precision
        print(f"\n{name}: {gflops:.3f} GFLOP/img forward, precision {precision}, {first.kernels()}")
        if classic is not None:
            print(f"  {'classic':<22} {med['classic']:>8.1f} img/s   (runs: "
                  f"{', '.join(f'{v:.0f}' for v in times['classic'])})")
        for p, run in ours.items():
            achieved = 3 * gflops * med[p]
            where = "on" if prefetching(run.ctx.cfg, run.ctx.device) else "off"
            ratio = f"{med[p] / med['classic']:>5.2f}x classic  " if classic is not None else ""
            print(f"  {'imgcls prefetch ' + p + ' (' + where + ')':<22} {med[p]:>8.1f} img/s   {ratio}"
                  f"{achieved:>6.0f} GFLOP/s = {100 * achieved / peaks[precision]:.0f}% of the {precision} peak "
                  f"(runs: {', '.join(f'{v:.0f}' for v in times[p])})", flush=True)


if __name__ == "__main__":
    main()
