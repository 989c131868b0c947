"""Training-order reading of an image folder streamed from disk against the WebDataset shards `imgcls
shard` wrote from it (PNG and JPEG): images/s over one epoch of the train split and the peak RSS of the
reading process (its DataLoader workers counted apart), each read in a fresh process, the three
interleaved, medians of --repeats.

    .venv/bin/python bench/shard_throughput.py --data $IMGCLS_DATA/cats-vs-dogs [--img-size 128]
        [--workers 2] [--shard-size 250] [--repeats 3] [--keep DIR]

Both are read as `imgcls train` reads them: the folder through its streaming DataLoader (decode, resize
and crop per file, in a random order), the shards a chunk at a time in their seeded order
(data/shards.py). Writing each shard set is timed once.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
import torch
from imgcls.data import load_dataset
from imgcls.data.shards import chunk_batches, epoch_chunks

kind, data, size, workers, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), 64
torch.set_num_threads(1)
start = time.perf_counter()
if kind != "folder":
    train = load_dataset(data, workers=workers).train
    batches = chunk_batches(train.shards, epoch_chunks(train.shards, 0, 0, 1, 0), train.labels, batch, workers)
else:
    train = load_dataset(data, img_size=size, mode="stream", workers=workers).train
    batches = train.batches(torch.randperm(len(train), generator=torch.Generator().manual_seed(0)), batch)
n = checksum = 0
for images, labels in batches:
    n += len(labels)
    checksum += int(images[:, :, 0, 0].sum())
seconds = time.perf_counter() - start
peak = {"self_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
print(json.dumps({"images": n, "seconds": seconds, **peak}))
"""


def read_once(kind: str, data: str, size: int, workers: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, data, str(size), str(workers)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="an image folder (train/ and val/ of class folders)")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=250, help="samples per shard (250: 8 train shards of "
                        "Cats vs Dogs, more than the workers, as a large set has)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep", help="write the shard sets into this folder (default: a temporary one)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sources = {"folder": args.data}
        for image_format in ("png", "jpg"):
            shards = Path(args.keep or tmp) / f"shards-{image_format}"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "imgcls", "shard", args.data, "--out", str(shards), "--img-size",
                            str(args.img_size), "--shard-size", str(args.shard_size), "--image-format", image_format,
                            "--quiet"], check=True, stdout=subprocess.DEVNULL)
            mib = sum(p.stat().st_size for p in shards.glob("*.tar")) / 2**20
            print(f"{image_format} shards of {args.shard_size}: written in {time.perf_counter() - start:.1f} s, "
                  f"{mib:.1f} MiB of tar files")
            sources[f"{image_format} shards"] = str(shards)
        results: dict[str, list[dict]] = {kind: [] for kind in sources}
        for _ in range(args.repeats):
            for kind, data in sources.items():
                results[kind].append(read_once(kind, data, args.img_size, args.workers))
    print(f"{cpu_name()}; {args.img_size} px, {args.workers} workers, median of {args.repeats}")
    print(f"{'read':<11} {'images':>7} {'images/s':>9} {'peak RSS MiB':>13} {'worker MiB':>11}")
    for kind, runs in results.items():
        rate = statistics.median(r["images"] / r["seconds"] for r in runs)
        print(f"{kind:<11} {runs[0]['images']:>7} {rate:>9.0f} "
              f"{statistics.median(r['self_mib'] for r in runs):>13.0f} "
              f"{statistics.median(r['worker_mib'] for r in runs):>11.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
