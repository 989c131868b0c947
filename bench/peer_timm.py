"""imgcls against timm's train.py on the same job: one model from scratch on one image folder, the same
epochs, optimizer, schedule, batch and augmentation, on this machine; wall time, training images/s and
validation accuracy of each, alternated `--repeats` times.

    python bench/peer_timm.py --timm-train /path/to/pytorch-image-models/train.py \\
        --data-dir $IMGCLS_DATA/cats-vs-dogs --model resnet10t --img-size 128 --epochs 4

timm's train.py is not part of this repository: pass the path of a checkout's (it runs with the timm
installed here). The job: `--model` from timm's registry on both sides (`timm/<model>` for imgcls), AdamW at
--lr with weight decay 0.05, a cosine schedule after one warm-up epoch, no augmentation (timm's --no-aug:
resize and centre-crop; imgcls --aug none, the same crop made once at decoding), no label smoothing, seed 0,
2 DataLoader workers for timm. timm validates every epoch, so imgcls does too (the folder's val/). timm runs in
fp32, or with --timm-amp in bf16 autocast (its best where bf16 is fast); imgcls chooses by measurement.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMGCLS = [sys.executable, "-m", "imgcls"]


def timm_job(args, out: Path) -> list[str]:
    return [sys.executable, str(args.timm_train), "--data-dir", str(args.data_dir), "--train-split", "train",
            "--val-split", "val", "--model", args.model, "--num-classes", str(args.classes), "--img-size",
            str(args.img_size), "--epochs", str(args.epochs), "-b", str(args.batch_size), "--opt", "adamw", "--lr",
            str(args.lr), "--weight-decay", "0.05", "--sched", "cosine", "--warmup-epochs", "1", "--no-aug",
            "--smoothing", "0", "--device", "cpu", "--workers", "2", "--seed", "0", "--output", str(out),
            "--experiment", "timm", "--checkpoint-hist", "1", "--log-interval", "1000",
            *(["--amp", "--amp-dtype", "bfloat16"] if args.timm_amp else [])]


def imgcls_job(args, out: Path) -> list[str]:
    return [*IMGCLS, "train", "--data", str(args.data_dir), "--model", f"timm/{args.model}", "--img-size",
            str(args.img_size), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--optimizer",
            "adamw", "--lr", str(args.lr), "--weight-decay", "0.05", "--warmup-epochs", "1", "--aug", "none",
            "--label-smoothing", "0", "--seed", "0", "--out", str(out / "imgcls"), "--quiet"]


def run(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def timm_accuracy(out: Path) -> float:
    with open(out / "timm" / "summary.csv", newline="") as f:
        return float(list(csv.DictReader(f))[-1]["eval_top1"]) / 100


def imgcls_accuracy(out: Path) -> float:
    summary = json.loads((out / "imgcls" / "summary.json").read_text())
    PRECISIONS.add(summary["precision"])
    return summary["final_val_acc"]


PRECISIONS: set[str] = set()  # what imgcls's --precision auto chose, run by run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", type=Path, required=True, help="train.py of a pytorch-image-models checkout")
    parser.add_argument("--data-dir", type=Path, required=True, help="an image folder with train/ and val/")
    parser.add_argument("--model", default="resnet10t")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--timm-amp", action="store_true",
                        help="timm in bf16 autocast (--amp --amp-dtype bfloat16), its best on a CPU with fast bf16")
    args = parser.parse_args()
    train_images = sum(1 for p in (args.data_dir / "train").rglob("*") if p.is_file())
    results = {"timm": [], "imgcls": []}
    for _ in range(args.repeats):  # alternated, so a change in the machine's load hits both
        for name, job, accuracy in (("timm", timm_job, timm_accuracy), ("imgcls", imgcls_job, imgcls_accuracy)):
            with tempfile.TemporaryDirectory() as tmp:
                seconds = run(job(args, Path(tmp)), args.timm_train.parent if name == "timm" else Path.cwd())
                results[name].append((seconds, accuracy(Path(tmp))))
    print(f"{args.model} from scratch, {args.img_size} px, {args.epochs} epochs of {train_images} images, batch "
          f"{args.batch_size}, AdamW lr {args.lr}, cosine, no augmentation; medians of {args.repeats}")
    for name, runs in results.items():
        wall = statistics.median(s for s, _ in runs)
        precision = ("bf16 autocast" if args.timm_amp else "fp32") if name == "timm" else \
            f"--precision auto: {', '.join(sorted(PRECISIONS))}"
        print(f"  {name:<7} ({precision}) wall {wall:7.1f} s   {args.epochs * train_images / wall:6.1f} train img/s "
              f"(wall)   val accuracy {statistics.median(a for _, a in runs):.2%}   (runs: "
              + ", ".join(f"{s:.0f} s {a:.2%}" for s, a in runs) + ")")
    ratio = statistics.median(s for s, _ in results["timm"]) / statistics.median(s for s, _ in results["imgcls"])
    print(f"  imgcls is {ratio:.2f}x timm's throughput on this job")


if __name__ == "__main__":
    main()
