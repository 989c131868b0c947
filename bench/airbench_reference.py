"""airbench94 itself (the PyPI package `airbench`) on the CIFAR-10 copy imgcls reads: accuracy and time.

The reference that `imgcls train --recipe recipes/cifar10_airbench94.yaml` is compared with.

    python bench/airbench_reference.py [--data-dir DIR/cifar10] [--seeds 0 1 2]

Each seed runs `airbench.train94()` with the package's own hyperparameters, network and loader, then
`airbench.evaluate` on the test set, plain and with its TTA (tta_level 2: mirrored and
1-pixel-shifted views). airbench's loaders read `cifar10/{train,test}.pt` under the working directory, so
the batches imgcls loads are written there in its format first, in a temporary folder. Wall time
per seed is training plus evaluation, after one warm-up run (`airbench.warmup94`, not counted).
Prints one line per seed, then the mean and spread. airbench runs only on a CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

PUBLISHED = "airbench94's published 94.01% in 0.36 PFLOP"


def write_airbench_data(data_dir: Path, out: Path) -> None:
    """airbench's CifarLoader reads {'images': uint8 N x 32 x 32 x 3, 'labels', 'classes'} per split."""
    import torch

    from imgcls.data.cifar import load_cifar10

    train_x, train_y, test_x, test_y, classes = load_cifar10(data_dir, download=False)
    out.mkdir(parents=True)
    for split, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
        torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels, "classes": classes},
                   out / f"{split}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default $IMGCLS_DATA/cifar10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    import torch  # after argparse, so --help is instant

    if not torch.cuda.is_available():
        print(f"airbench needs a CUDA GPU; none is visible here: the reference figure is {PUBLISHED}")
        return
    try:
        import airbench
    except ImportError:
        sys.exit(f"the airbench package is missing; install it with: {sys.executable} -m pip install airbench")
    from importlib.metadata import version

    from imgcls.data.cifar import default_root
    from imgcls.errors import UserError

    data_dir = Path(args.data_dir).resolve() if args.data_dir else default_root()
    print(f"airbench {version('airbench')} train94 on {torch.cuda.get_device_name()}, data {data_dir}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as work, contextlib.chdir(work):  # its loaders open cifar10/ here
        try:
            write_airbench_data(data_dir, Path(work) / "cifar10")
        except UserError as e:
            sys.exit(str(e))
        test_loader = airbench.CifarLoader("cifar10", train=False, batch_size=2000)
        with contextlib.redirect_stdout(io.StringIO()):  # its warm-up prints a row of its table
            airbench.warmup94()
        for seed in args.seeds:
            torch.manual_seed(seed)
            start = time.perf_counter()
            model = airbench.train94(verbose=False)
            plain = airbench.evaluate(model, test_loader, tta_level=0)
            tta = airbench.evaluate(model, test_loader, tta_level=2)
            wall = time.perf_counter() - start
            rows.append((wall, plain, tta))
            print(f"seed {seed}: test {100 * plain:.2f}%, with TTA {100 * tta:.2f}%, {wall:6.2f} s wall", flush=True)
    accs = [r[2] for r in rows]
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    plain, wall = (statistics.mean(r[k] for r in rows) for k in (1, 0))
    print(f"{len(rows)} seeds: TTA accuracy {100 * statistics.mean(accs):.2f}% +- {100 * spread:.2f} "
          f"(min {100 * min(accs):.2f}, max {100 * max(accs):.2f}), without TTA {100 * plain:.2f}%, "
          f"mean wall {wall:.2f} s; reference: {PUBLISHED}")


if __name__ == "__main__":
    main()
