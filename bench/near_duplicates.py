"""Near-duplicates that survive a resize: `imgcls audit` against the imagehash package's dHash on a folder of
real photos with planted copies; recall per kind of copy and pairs found that were not planted.

    pip install imagehash   # the reference, for this script only
    python bench/near_duplicates.py --photos $IMGCLS_DATA/cats-vs-dogs/train --originals 600 --copies 40

Copies of distinct photos are planted beside them: re-encoded as JPEG at quality 70, brightened by 15%, and
resized to 0.8x (bicubic), `--copies` of each. Both tools see the same files and count a pair within
`--distances` bits of their 64-bit hashes; a found pair that was not planted is a false pair (the photos are
distinct: the data set's own near-duplicates were removed, shared/datasets/README.md).
"""

from __future__ import annotations

import argparse
import random
import tempfile
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from imgcls.data.audit import audit

KINDS = ("reencoded", "brightened", "resized")


def plant(photos: list[Path], root: Path, copies: int, seed: int = 0) -> dict[str, tuple[str, str]]:
    """Originals under root/a/ and root/b/ (two classes: the audit needs two), and their copies beside them;
    returns {copy file: (original file, kind)}."""
    rng = random.Random(seed)
    chosen = rng.sample(range(len(photos)), 3 * copies)
    planted = {}
    for i, photo in enumerate(photos):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        Image.open(photo).convert("RGB").save(folder / f"{i:05d}.png")  # lossless: the copies are the only change
    for n, i in enumerate(chosen):
        kind, original = KINDS[n // copies], root / ("a" if i % 2 else "b") / f"{i:05d}.png"
        img = Image.open(original)
        target = original.with_name(f"{i:05d}-{kind}.jpg" if kind == "reencoded" else f"{i:05d}-{kind}.png")
        if kind == "reencoded":
            img.save(target, quality=70)
        elif kind == "brightened":
            ImageEnhance.Brightness(img).enhance(1.15).save(target)
        else:
            img.resize((round(img.width * 0.8), round(img.height * 0.8)), Image.Resampling.BICUBIC).save(target)
        planted[str(target)] = (str(original), kind)
    return planted


def imagehash_pairs(files: list[str], distance: int) -> set[frozenset]:
    import imagehash

    hashes = [imagehash.dhash(Image.open(f)) for f in files]
    return {frozenset((files[i], files[j])) for i, j in combinations(range(len(files)), 2)
            if hashes[i] - hashes[j] <= distance}


def imgcls_pairs(root: Path, distance: int) -> set[frozenset]:
    report = audit(str(root), max_distance=distance, progress=False).report
    return {frozenset((p["a"]["file"], p["b"]["file"])) for p in report["near_duplicates"]["pairs"]}


def score(found: set[frozenset], planted: dict[str, tuple[str, str]]) -> tuple[dict[str, int], int]:
    truth = {frozenset((copy, original)): kind for copy, (original, kind) in planted.items()}
    recall = {kind: sum(1 for pair, k in truth.items() if k == kind and pair in found) for kind in KINDS}
    return recall, len(found - set(truth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True, help="a folder of real photos (searched recursively)")
    parser.add_argument("--originals", type=int, default=600)
    parser.add_argument("--copies", type=int, default=40, help="copies of each kind")
    parser.add_argument("--distances", type=int, nargs="+", default=[4, 10])
    args = parser.parse_args()
    photos = sorted(p for p in args.photos.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    photos = [photos[i] for i in np.linspace(0, len(photos) - 1, args.originals).round().astype(int)]
    with tempfile.TemporaryDirectory() as tmp:
        planted = plant(photos, Path(tmp), args.copies)
        files = sorted(str(p) for p in Path(tmp).rglob("*") if p.is_file())
        print(f"{len(photos)} photos, {len(planted)} planted copies ({args.copies} of each: {', '.join(KINDS)})")
        for distance in args.distances:
            for name, pairs in (("imgcls audit", imgcls_pairs(Path(tmp), distance)),
                                ("imagehash dhash", imagehash_pairs(files, distance))):
                recall, false = score(pairs, planted)
                print(f"  {distance:>2} bits  {name:<16} found {sum(recall.values()):>3}/{len(planted)} planted ("
                      + ", ".join(f"{k} {v}/{args.copies}" for k, v in recall.items()) + f"), {false} false pairs")


if __name__ == "__main__":
    main()
