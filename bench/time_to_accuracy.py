"""Time and compute to accuracy on CIFAR-10: a recipe trained and evaluated end to end, over seeds.

    python bench/time_to_accuracy.py --data-dir DIR/cifar10 [--recipe recipes/cifar10_airbench94.yaml]
                                     [--seeds 0 1 2] [--epochs 10] [--tta flip-crop] [--set KEY=VALUE ...]
                                     [--out runs/tta-bench]

Each run is `imgcls train --recipe R --seed S [--epochs E] [--KEY VALUE ...]` followed by
`imgcls eval RUN --tta T`, timed on the wall clock from the start of training (data loading
included) to the test accuracy with TTA. `--set` changes recipe options (e.g. `--set lookahead=false`
for an ablation). Compute is counted, not timed: every training image costs 3x the model's forward
FLOPs (forward and backward), every validation and test view 1x. Prints one line per run, then the
mean and spread over seeds and whether the mean reached 93% and 94%.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from imgcls import rundir
from imgcls.config import build_config
from imgcls.evaluation.evaluate import evaluate_run

TARGETS = (0.93, 0.94)
VIEWS = {"none": 1, "flip": 2, "flip-crop": 6}


def training_pflop(run: Path, gflops: float, tta: str) -> float:
    """PFLOP the run spent: every epoch's training images x 3 forward passes, its validation images (when
    validated) and the TTA views of the test images."""
    metrics = rundir.read_metrics(run)
    sizes = rundir.read_json(run / "dataset.json")["fingerprint"]["sizes"]
    trained = len(metrics) * sizes["train"]
    validated = sum(sizes.get("val", 0) for m in metrics if m.get("val_acc") is not None)
    tested = sizes["test"] * VIEWS[tta]
    return gflops * (3 * trained + validated + tested) / 1e6


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, e.g. lookahead=false (got {item!r})")
        out[key.replace("-", "_")] = value
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default $IMGCLS_DATA/cifar10)")
    parser.add_argument("--data", default="cifar10", help="cifar10, or cifar10-mini for a quick check")
    parser.add_argument("--recipe", default="recipes/cifar10_airbench94.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, help="budget (default: the recipe's)")
    parser.add_argument("--tta", default="flip-crop", choices=list(VIEWS),
                        help="test-time augmentation for the final accuracy (flip-crop)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe options to change")
    parser.add_argument("--out", default="runs/time-to-accuracy", help="parent folder of the runs (must be new)")
    args = parser.parse_args()

    import torch  # after argparse, so --help is instant

    from imgcls.kernels.cache import machine
    from imgcls.models import create_model
    from imgcls.models.flops import forward_gflops
    from imgcls.training.train import fit

    rundir.refuse_existing(args.out)
    print(f"machine: {machine(torch.device('cpu'))}; recipe {args.recipe} {' '.join(args.set)}", flush=True)
    rows = []
    for seed in args.seeds:
        cfg = build_config(args.recipe, data=args.data, data_dir=args.data_dir, seed=seed, epochs=args.epochs,
                           quiet=True, out=str(Path(args.out) / f"s{seed}"), **parse_set(args.set))
        start = time.perf_counter()
        run = fit(cfg)
        result, _ = evaluate_run(run, "test", tta=args.tta, checkpoint="last")
        wall = time.perf_counter() - start
        plain = result["calibration"]["accuracy"]
        tta = result["tta"]["with"]["accuracy"] if args.tta != "none" else plain
        gflops = forward_gflops(create_model(cfg.model, 10), 32)
        pflop = training_pflop(Path(run), gflops, args.tta)
        rows.append((wall, plain, tta, pflop))
        print(f"seed {seed}: test {100 * plain:.2f}%, with {args.tta} TTA {100 * tta:.2f}%, {pflop:.3f} PFLOP, "
              f"{wall:7.1f} s wall ({run})", flush=True)
    accs = [r[2] for r in rows]
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    mean_acc = statistics.mean(accs)
    reached = [f"{100 * t:.0f}%" for t in TARGETS if mean_acc >= t]
    plain, pflop, wall = (statistics.mean(r[k] for r in rows) for k in (1, 3, 0))
    print(f"{len(rows)} seeds: TTA accuracy {100 * mean_acc:.2f}% +- {100 * spread:.2f} (min {100 * min(accs):.2f}, "
          f"max {100 * max(accs):.2f}), without TTA {100 * plain:.2f}%, {pflop:.3f} PFLOP, mean wall {wall:.0f} s; "
          f"mean reaches {', '.join(reached) or 'neither 93% nor 94%'}")


if __name__ == "__main__":
    main()
