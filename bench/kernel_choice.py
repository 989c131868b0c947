"""What the kernel choice costs cold, and whether the quick measurement chooses what a thorough one does.

For each model: `choose_kernels` with nothing cached (the quick measurement every run does: precisions
first, candidates clearly behind dropped, timings shared between questions) against the thorough one (every
candidate of every question timed THOROUGH_REPEATS rounds, nothing shared or dropped), alternated
`--repeats` times; wall seconds (median) and the choices of each run.

    python bench/kernel_choice.py --models resnet18_cifar vit_cifar convnext_cifar fastnet_cifar --repeats 2
    python bench/kernel_choice.py --models vit_cifar convnext_cifar --precision fp32 --repeats 2
    python bench/kernel_choice.py --models efficientnet_lite0 convnext_atto --img-size 224 --batch-size 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from imgcls.kernels.measure import choose_kernels
from imgcls.models import create_model

FIELDS = ("precision_train", "precision_eval", "attention_train", "attention_eval", "depthwise_train",
          "depthwise_eval", "memory_format", "eval_batch_size")


def choose(name: str, img_size: int, batch: int, thorough: bool, precision: str):
    torch.manual_seed(0)
    model = create_model(name, 10)
    start = time.perf_counter()
    choice = choose_kernels(model, (batch, 3, img_size, img_size), torch.device("cpu"), precision, data_size=10_000,
                            name=name, use_cache=False, thorough=thorough)
    return time.perf_counter() - start, {f: getattr(choice, f) for f in FIELDS}, choice.timings


def cost_of_quick(quick: dict, thorough_timings: dict) -> dict[str, float]:
    """Per field the thorough measurement timed, how much slower the quick choice is by its timings than the
    thorough winner (1.00: the same, or as fast)."""
    out = {}
    for f, value in quick.items():
        timed = {k: v for k, v in thorough_timings.get(f, {}).items() if v is not None}
        if len(timed) > 1 and str(value) in timed:
            out[f] = timed[str(value)] / min(timed.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar", "vit_cifar", "convnext_cifar",
                                                         "fastnet_cifar"])
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-thorough", action="store_true", help="time the quick measurement only")
    parser.add_argument("--precision", default="auto", help="auto (measured), or given to leave the precision out "
                                                            "(thorough timing of emulated bf16 takes minutes a step)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, {args.img_size} px")
    for name in args.models:
        runs = {"quick": [], "thorough": []}
        for _ in range(args.repeats):
            for kind in ("quick",) if args.no_thorough else ("quick", "thorough"):
                runs[kind].append(choose(name, args.img_size, args.batch_size, kind == "thorough", args.precision))
        for kind, results in runs.items():
            if results:
                seconds = statistics.median(r[0] for r in results)
                print(f"{name:<18} {kind:<9} {seconds:6.1f} s (median of {len(results)}; "
                      f"{', '.join(f'{r[0]:.1f}' for r in results)})")
                for _, choice, _ in results:
                    print(f"{'':<28} {' '.join(f'{k}={v}' for k, v in choice.items())}")
        for _, quick, _ in runs["quick"]:
            for _, _, timings in runs["thorough"]:
                costs = cost_of_quick(quick, timings)
                print(f"{name:<18} quick choice under thorough timings: "
                      + ", ".join(f"{f} {c:.2f}x" for f, c in costs.items()))


if __name__ == "__main__":
    main()
