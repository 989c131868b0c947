"""Does `imgcls audit --labels` find wrong labels, and does training without them help?

    python bench/label_errors.py --data-root $IMGCLS_DATA --out /tmp/label-errors [--fraction 0.05]

For each of two datasets, 5% of the training images are filed under another class at random (seeded):
  cats-vs-dogs  its train/ (2,000 photos) flipped; its val/ kept clean as test/ (validation is carved from
                the flipped train, as a user's would be); audit's default recipe (pretrained efficientnet_lite0
                features, a logistic head per fold);
  cifar10-mini  the bundled 5,000 training images written as PNG files and flipped; its 1,000 test images
                clean; audit's default for 32 px images (fastnet_cifar_small trained from scratch per fold).
Then: precision and recall of the flagged training images against the flips, and the clean-test accuracy
of one training recipe on the flipped data, with and without `--exclude` of the audit's list (per seed).
Every step is an `imgcls` command, printed before it runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

# A recipe per dataset whose accuracy wrong labels can move: fine-tuning all layers, or training from scratch.
TRAIN = {"cats-vs-dogs": ["--model", "efficientnet_lite0", "--pretrained", "--img-size", "128", "--epochs", "5"],
         "cifar10-mini": ["--recipe", "recipes/quickstart.yaml", "--epochs", "15"]}


def imgcls(*args: str) -> None:
    cmd = [sys.executable, "-m", "imgcls", *args]
    print("$", shlex.join(["imgcls", *args]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def flip(files: list[tuple[str, Path]], classes: list[str], fraction: float, seed: int) -> dict[int, str]:
    """Which of `files` ((class, path)) to file under another class, and under which, at random."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(files), size=round(fraction * len(files)), replace=False)
    out = {}
    for i in chosen.tolist():
        others = [c for c in classes if c != files[i][0]]
        out[i] = others[rng.integers(len(others))]
    return out


def flipped_cats_dogs(source: Path, root: Path, fraction: float, seed: int) -> set[str]:
    classes = sorted(p.name for p in (source / "train").iterdir() if p.is_dir())
    files = [(c, f) for c in classes for f in sorted((source / "train" / c).iterdir())]
    moved = flip(files, classes, fraction, seed)
    for i, (cls, f) in enumerate(files):
        dest = root / "train" / moved.get(i, cls) / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f, dest)
    for cls in classes:
        (root / "test" / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((source / "val" / cls).iterdir()):
            os.symlink(f, root / "test" / cls / f.name)
    return {f"train/{moved[i]}/{files[i][1].name}" for i in moved}


def flipped_mini(root: Path, fraction: float, seed: int) -> set[str]:
    from PIL import Image

    from imgcls.data import load_dataset

    mini = load_dataset("cifar10-mini", val_fraction=0.0)
    planted = set()
    for split, part in (("train", mini.train), ("test", mini.test)):
        files = [(mini.classes[y], Path(f"{i:05d}.png")) for i, y in enumerate(part.labels.tolist())]
        moved = flip(files, mini.classes, fraction, seed) if split == "train" else {}
        for i, (cls, name) in enumerate(files):
            dest = root / split / moved.get(i, cls) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(part.images[i].permute(1, 2, 0).numpy()).save(dest)
            if i in moved:
                planted.add(f"{split}/{moved[i]}/{name}")
    return planted


def test_accuracy(run: Path) -> float:
    return json.loads((run / "summary.json").read_text())["test_acc"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=os.environ.get("IMGCLS_DATA"), help="holds cats-vs-dogs/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--fraction", type=float, default=0.05)
    p.add_argument("--seeds", default="0,1", help="training seeds with and without --exclude")
    p.add_argument("--only", choices=tuple(TRAIN), help="one dataset")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in [args.only] if args.only else TRAIN:
        root = args.out / f"{name}-flipped"
        if root.exists():
            sys.exit(f"{root} exists; pass a fresh --out")
        planted = (flipped_cats_dogs(Path(args.data_root) / "cats-vs-dogs", root, args.fraction, 0)
                   if name == "cats-vs-dogs" else flipped_mini(root, args.fraction, 0))
        audit = args.out / f"{name}-audit.json"
        size = ["--img-size", "32"] if name == "cifar10-mini" else []
        imgcls("audit", str(root), "--labels", *size, "--out", str(audit), "--quiet")
        section = json.loads(audit.read_text())["label_issues"]
        listed = args.out / f"{name}-audit-label-issues.csv"
        flagged = {r["path"] for r in csv.DictReader(listed.open()) if r["split"] == "train"}
        hits = len(flagged & planted)
        row = {"flipped": len(planted), "flagged_train": len(flagged), "hits": hits,
               "precision": hits / max(len(flagged), 1), "recall": hits / len(planted),
               "flagged_all": section["count"], "oof_accuracy": section["out_of_fold_accuracy"],
               "audit_seconds": section["seconds"], "recipe": f"{section['recipe']} {section['model']}",
               "test_acc": {"all": [], "excluded": []}}
        for seed in args.seeds.split(","):
            for kind, extra in (("all", []), ("excluded", ["--exclude", str(listed)])):
                run = args.out / f"{name}-{kind}-s{seed}"
                imgcls("train", "--data", str(root), *TRAIN[name], "--seed", seed, *extra, "--out", str(run),
                       "--quiet")
                row["test_acc"][kind].append(test_accuracy(run))
        results[name] = row
        print(json.dumps({name: row}, indent=1), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print("| data | flipped | flagged (train) | precision | recall | test acc, all | test acc, --exclude |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        acc = {k: ", ".join(f"{a:.1%}" for a in v) for k, v in r["test_acc"].items()}
        print(f"| {name} | {r['flipped']} | {r['flagged_train']} | {r['precision']:.1%} | {r['recall']:.1%} | "
              f"{acc['all']} | {acc['excluded']} |")


if __name__ == "__main__":
    main()
