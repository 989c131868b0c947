"""Time to accuracy on CIFAR-10: a recipe trained and evaluated end to end, over seeds and budgets.

    python bench/time_to_accuracy.py --data-dir DIR/cifar10 [--recipe recipes/cifar10_fast.yaml]
                                     [--seeds 0 1 2] [--epochs 3 6] [--tta flip] [--out runs/tta-bench]

Each run is `imgcls train --recipe R --seed S [--epochs E]` followed by `imgcls eval RUN --tta T`,
timed on the wall clock from the start of training (data loading included) to the test accuracy
with TTA. Prints one line per run, then per budget the mean and spread over seeds and which of
93% and 94% the mean reached, with the mean wall time it took.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default $IMGCLS_DATA/cifar10)")
    parser.add_argument("--data", default="cifar10", help="cifar10, or cifar10-mini for a quick check")
    parser.add_argument("--recipe", default="recipes/cifar10_fast.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, nargs="+", help="budgets to try (default: the recipe's)")
    parser.add_argument("--tta", default="flip", choices=["flip", "flip-crop"],
                        help="test-time augmentation for the final accuracy (flip)")
    parser.add_argument("--out", default="runs/time-to-accuracy", help="parent folder of the runs (must be new)")
    args = parser.parse_args()

    from imgcls.training.train import fit  # after argparse, so --help is instant

    rundir.refuse_existing(args.out)
    results: dict[int, list[tuple[float, float, float]]] = {}
    for epochs in args.epochs or [None]:
        for seed in args.seeds:
            cfg = build_config(args.recipe, data=args.data, data_dir=args.data_dir, seed=seed, epochs=epochs,
                               quiet=True, out=str(Path(args.out) / f"e{epochs or 'recipe'}-s{seed}"))
            start = time.perf_counter()
            run = fit(cfg)
            result, _ = evaluate_run(run, "test", tta=args.tta)
            wall = time.perf_counter() - start
            plain, tta = result["calibration"]["accuracy"], result["tta"]["with"]["accuracy"]
            results.setdefault(cfg.epochs, []).append((wall, plain, tta))
            print(f"epochs {cfg.epochs:>3} seed {seed}: {wall:7.1f} s wall, test {100 * plain:.2f}%, "
                  f"with {args.tta} TTA {100 * tta:.2f}%  ({run})", flush=True)
    for epochs, rows in results.items():
        walls, accs = [r[0] for r in rows], [r[2] for r in rows]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        mean_acc, mean_wall = statistics.mean(accs), statistics.mean(walls)
        reached = [f"{100 * t:.0f}%" for t in TARGETS if mean_acc >= t]
        print(f"epochs {epochs}: {len(rows)} seeds, TTA accuracy {100 * mean_acc:.2f}% +- {100 * spread:.2f} "
              f"(min {100 * min(accs):.2f}, max {100 * max(accs):.2f}), mean wall {mean_wall:.0f} s; "
              f"mean reaches {', '.join(reached) or 'neither 93% nor 94%'}")


if __name__ == "__main__":
    main()
