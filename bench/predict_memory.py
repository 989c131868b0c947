"""Peak memory of `imgcls predict DIR --out preds.csv` at 1,000 and at 20,000 images: it streams, so
the two should be about equal. Prints the peak RSS of the predicting process (and of its largest
DataLoader worker) for each size.

    .venv/bin/python bench/predict_memory.py [--sizes 1000,20000] [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = """
import json, resource, sys
from imgcls.cli import main
code = main(["predict", sys.argv[1], sys.argv[2], "--out", sys.argv[3], "--quiet", "--workers", sys.argv[4]])
print(json.dumps({"code": code, "self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    """`n` random 48x40 PNGs in subfolders of 1,000 (a real decode and resize each)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(sub / f"{i:06d}.png")


def tiny_run(root: Path) -> Path:
    from imgcls.config import build_config
    from imgcls.training.train import fit

    return fit(build_config(model="fastnet_cifar_small", epochs=1, out=str(root / "run"), quiet=True,
                            precision="fp32"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,20000")
    parser.add_argument("--workers", default="2")
    parser.add_argument("--run", help="a run folder (default: train fastnet_cifar_small for one epoch)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = Path(args.run) if args.run else tiny_run(root)
        results = []
        for n in map(int, args.sizes.split(",")):
            folder = root / f"images-{n}"
            make_images(folder, n)
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", CHILD, str(run), str(folder), str(root / f"p{n}.csv"),
                                  args.workers], capture_output=True, text=True, check=True)
            record = json.loads(out.stdout.strip().splitlines()[-1])
            rows = sum(1 for _ in open(root / f"p{n}.csv")) - 1
            results.append({"images": n, "rows": rows, "seconds": round(time.perf_counter() - start, 1),
                            "peak_rss_mib": round(record["self_kib"] / 1024, 1),
                            "peak_worker_rss_mib": round(record["children_kib"] / 1024, 1)})
            print(json.dumps(results[-1]), flush=True)
        first, last = results[0], results[-1]
        print(f"peak RSS {first['peak_rss_mib']} MiB at {first['images']} images, {last['peak_rss_mib']} MiB at "
              f"{last['images']} images: ratio {last['peak_rss_mib'] / first['peak_rss_mib']:.3f}")


if __name__ == "__main__":
    main()
