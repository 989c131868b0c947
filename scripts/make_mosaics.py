"""A small real multi-label set from the bundled cifar10-mini: 2 x 2 mosaics of 1-4 images of distinct
classes, labelled with the classes present, written as PNG files with a manifest.

    python scripts/make_mosaics.py OUT [--train 3000] [--test 600] [--seed 0]

OUT/manifest.csv has the columns path,labels,split (labels separated by ';'); train mosaics are cut from
cifar10-mini's train images and test mosaics from its test images, so no image is in both. A cell without
an image is mid-grey. Each mosaic is 64 x 64 (four 32 x 32 cells).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.data import load_dataset

GREY = 128


def mosaics(images: np.ndarray, labels: np.ndarray, classes: list[str], count: int, rng) -> list[tuple]:
    """`count` (64 x 64 x 3 uint8 mosaic, sorted class names) pairs."""
    by_class = [np.flatnonzero(labels == c) for c in range(len(classes))]
    out = []
    for _ in range(count):
        k = int(rng.integers(1, 5))
        chosen = rng.choice(len(classes), size=k, replace=False)
        cells = rng.permutation(4)[:k]
        canvas = np.full((64, 64, 3), GREY, dtype=np.uint8)
        for cls, cell in zip(chosen, cells, strict=True):
            image = images[rng.choice(by_class[cls])].transpose(1, 2, 0)
            row, col = divmod(int(cell), 2)
            canvas[32 * row : 32 * row + 32, 32 * col : 32 * col + 32] = image
        out.append((canvas, sorted(classes[c] for c in chosen)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--test", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty; pass a new folder")
    rng = np.random.default_rng(args.seed)
    mini = load_dataset("cifar10-mini", val_fraction=0.0)
    rows = []
    for split, part, count in (("train", mini.train, args.train), ("test", mini.test, args.test)):
        (args.out / split).mkdir(parents=True, exist_ok=True)
        made = mosaics(part.images.numpy(), part.labels.numpy(), mini.classes, count, rng)
        for i, (canvas, names) in enumerate(made):
            name = f"{split}/{i:05d}.png"
            Image.fromarray(canvas).save(args.out / name)
            rows.append((name, ";".join(names), split))
    with (args.out / "manifest.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "labels", "split"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} mosaics and {args.out / 'manifest.csv'}")


if __name__ == "__main__":
    main()
