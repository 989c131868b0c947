"""Build the bundled cifar10-mini sample from the CIFAR-10 python batches.

    python scripts/make_cifar10_mini.py --cifar-dir DIR   # DIR holds cifar-10-batches-py/

Takes the first 500 images of each class in data_batch_1..5 order and the first 100 of each
class in test_batch order, and stores each split as one lossless WebP mosaic (100 images a row):
exact pixels at about half the size of the raw bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.data.cifar import BASE_FOLDER, TEST_FILES, TRAIN_FILES, read_batch

OUT = Path(__file__).resolve().parents[1] / "src/imgcls/data/cifar10_mini"
PER_ROW = 100


def first_per_class(batches: list[dict], per_class: int):
    data = np.concatenate([b["data"] for b in batches])
    labels = np.concatenate([np.asarray(b["labels"]) for b in batches])
    names = [n.decode() for b in batches for n in b["filenames"]]
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    return data[keep], labels[keep], [names[i] for i in keep]


def write_mosaic(data: np.ndarray, path: Path) -> None:
    rows = len(data) // PER_ROW
    imgs = data.reshape(rows, PER_ROW, 3, 32, 32).transpose(0, 3, 1, 4, 2)
    Image.fromarray(imgs.reshape(rows * 32, PER_ROW * 32, 3)).save(
        path, "WEBP", lossless=True, quality=100, method=6
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cifar-dir", required=True, type=Path)
    args = parser.parse_args()
    folder = args.cifar_dir / BASE_FOLDER
    splits = {
        "train": first_per_class([read_batch(folder / n) for n in TRAIN_FILES], 500),
        "test": first_per_class([read_batch(folder / n) for n in TEST_FILES], 100),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"classes": [c.decode() for c in read_batch(folder / "batches.meta")["label_names"]]}
    lines = ["split\tindex\tsource"]
    for split, (data, labels, names) in splits.items():
        write_mosaic(data, OUT / f"{split}.webp")
        meta[split] = labels.tolist()
        meta[f"{split}_sha256"] = hashlib.sha256(data.tobytes()).hexdigest()
        lines += [f"{split}\t{i}\t{n}" for i, n in enumerate(names)]
    (OUT / "labels.json").write_text(json.dumps(meta))
    (OUT / "sources.tsv").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
