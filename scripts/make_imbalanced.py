"""Write a long-tailed image folder from CIFAR-10 (or the bundled cifar10-mini), for imbalance experiments.

    python scripts/make_imbalanced.py --out runs/data/cifar10-mini-lt
    python scripts/make_imbalanced.py --source cifar10 --data-dir DIR --out runs/data/cifar10-lt

Class k (in CIFAR-10's order) keeps round(n * ratio^(-k/9)) of its n training images (n = 5000 for
CIFAR-10, 500 for cifar10-mini): n for airplane down to n / 10 for truck at the default ratio of 10.
The test split keeps every image, so test accuracy, balanced accuracy and each class's recall are
measured on balanced data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from imgcls.data import load_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder to create (must not exist)")
    parser.add_argument("--ratio", type=float, default=10.0, help="largest / smallest class in train (10)")
    parser.add_argument("--source", default="cifar10-mini", choices=["cifar10-mini", "cifar10"])
    parser.add_argument("--data-dir", help="for --source cifar10: the folder holding cifar-10-batches-py/")
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new folder")
    data = load_dataset(args.source, args.data_dir, val_fraction=0.1)
    per_class = int((len(data.train) + len(data.val)) / len(data.classes))
    # the whole train split (train + the carved val), so every class starts from its 500 images
    splits = {"train": (data.train, data.val), "test": (data.test,)}
    for split, parts in splits.items():
        for k, name in enumerate(data.classes):
            keep = round(per_class * args.ratio ** (-k / (len(data.classes) - 1))) if split == "train" else None
            images = [img for part in parts for img, label in zip(part.images, part.labels.tolist(), strict=True)
                      if label == k]
            (out / split / name).mkdir(parents=True)
            for i, image in enumerate(images[:keep]):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(out / split / name / f"{i:04d}.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
