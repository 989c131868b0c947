"""Does `imgcls audit --labels` find wrong labels in a multi-label manifest?

    python bench/multilabel_label_errors.py --data-root $IMGCLS_DATA --out /tmp/ml-label-errors \
        [--canvases 400] [--mosaics DIR]

Two multi-label sets, each with 5% of its rows given a wrong label set at random (seeded): half of the
changed rows lose one of their labels (when they have two or more; always when they show every class), the
others gain a label they do not show.
  canvases  224 x 224 grey canvases with one or two Cats-vs-Dogs train photos pasted in random quarters,
            labelled with the animals shown (cat, dog or both); audited with audit's default recipe
            (pretrained efficientnet_lite0 features, a logistic head per label and fold);
  mosaics   (with --mosaics DIR, a folder written by scripts/make_mosaics.py) its train rows; audited with
            the same default recipe.
Then: precision and recall of the flagged rows against the changed ones. Every audit is an `imgcls` command,
printed before it runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import subprocess
import sys
from pathlib import Path

from PIL import Image

CANVAS, TILE = 224, 112


def imgcls(*args: str) -> None:
    print("$", shlex.join(["imgcls", *args]), flush=True)
    subprocess.run([sys.executable, "-m", "imgcls", *args], check=True, stdout=subprocess.DEVNULL)


def write_canvases(photos_root: Path, out: Path, count: int, seed: int) -> Path:
    """OUT/manifest.csv of `count` canvases with one or two photos each, labelled with their classes."""
    rng = random.Random(seed)
    photos = {c: sorted((photos_root / c).iterdir()) for c in ("cat", "dog")}
    out.mkdir(parents=True)
    rows = []
    for i in range(count):
        canvas = Image.new("RGB", (CANVAS, CANVAS), (128, 128, 128))
        labels = set()
        for cell in rng.sample(range(4), rng.choice([1, 2])):
            cls = rng.choice(["cat", "dog"])
            labels.add(cls)
            with Image.open(rng.choice(photos[cls])) as photo:
                tile = photo.convert("RGB").resize((TILE, TILE))
            canvas.paste(tile, ((cell % 2) * TILE, (cell // 2) * TILE))
        canvas.save(out / f"{i:04d}.jpg", quality=90)
        rows.append({"path": f"{i:04d}.jpg", "labels": ";".join(sorted(labels)), "split": "train"})
    return write_manifest(out / "manifest.csv", rows)


def write_manifest(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "labels", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def plant(manifest: Path, out: Path, fraction: float, seed: int) -> set[str]:
    """Write `out`, a copy of `manifest`'s train rows with `fraction` of them given a wrong label set; the
    changed rows' names as the audit names them (split/path)."""
    rows = [r for r in csv.DictReader(manifest.open()) if r.get("split", "train") == "train"]
    for r in rows:
        r["path"] = os.path.relpath(manifest.parent / r["path"], out.parent)
    classes = sorted({label for r in rows for label in r["labels"].split(";") if label})
    rng = random.Random(seed)
    changed = set()
    for i in rng.sample(range(len(rows)), round(fraction * len(rows))):
        labels = set(rows[i]["labels"].split(";"))
        missing = [c for c in classes if c not in labels]
        if len(labels) > 1 and (rng.random() < 0.5 or not missing):
            labels.remove(rng.choice(sorted(labels)))
        else:
            labels.add(rng.choice(missing))
        rows[i]["labels"] = ";".join(sorted(labels))
        changed.add(f"train/{rows[i]['path']}")
    write_manifest(out, rows)
    return changed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("IMGCLS_DATA"), help="holds cats-vs-dogs/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--canvases", type=int, default=400)
    p.add_argument("--mosaics", type=Path, help="a folder written by scripts/make_mosaics.py")
    p.add_argument("--fraction", type=float, default=0.05)
    args = p.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists; pass a fresh --out")
    photos = Path(args.data_root) / "cats-vs-dogs" / "train"
    sources = {"canvases": write_canvases(photos, args.out / "data" / "canvases", args.canvases, seed=0)}
    if args.mosaics:
        (args.out / "data" / "mosaics").symlink_to(args.mosaics.resolve())  # manifest paths may not climb out with ..
        sources["mosaics"] = args.out / "data" / "mosaics" / "manifest.csv"
    results = {}
    for name, manifest in sources.items():
        noisy = args.out / "data" / f"{name}-noisy.csv"  # the audit's --out may not lie inside what it reads
        changed = plant(manifest, noisy, args.fraction, seed=0)
        audit = args.out / f"{name}-audit.json"
        imgcls("audit", str(noisy), "--labels", "--out", str(audit), "--quiet")
        section = json.loads(audit.read_text())["label_issues"]
        flagged = {r["path"] for r in csv.DictReader((args.out / f"{name}-audit-label-issues.csv").open())}
        hits = len(flagged & changed)
        results[name] = {"rows": section["images"], "changed": len(changed), "flagged": len(flagged), "hits": hits,
                         "precision": hits / max(len(flagged), 1), "recall": hits / len(changed),
                         "oof_map": section["out_of_fold_map"], "recipe": f"{section['recipe']} {section['model']}",
                         "audit_seconds": section["seconds"]}
        print(json.dumps({name: results[name]}, indent=1), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("| data | rows | changed | out-of-fold mAP | flagged | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rows']} | {r['changed']} | {r['oof_map']:.1%} | {r['flagged']} | "
              f"{r['precision']:.1%} | {r['recall']:.1%} |")


if __name__ == "__main__":
    main()
