"""Prediction at folder scale: `imgcls predict` against a plain torchvision ImageFolder + DataLoader +
inference_mode loop at its best batch size and worker count, on the same files and model; images/s, and
the share of the time that is decoding (the files decoded alone, one process, against the whole pass).

    python bench/predict_throughput.py RUN_OR_EXPORT FOLDER [--batches 32 64 128] [--workers 0 1 2]

RUN_OR_EXPORT is anything `imgcls predict` takes; the plain loop runs the same model (the run's fp32
weights) with the same preprocessing, in torchvision's transforms: Resize(size / crop_pct, bicubic),
CenterCrop(size), ToTensor, Normalize. Both passes are timed twice, alternated; medians.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch
import torchvision
import torchvision.transforms as T

from imgcls.inference.exported import open_engine
from imgcls.inference.files import collect_paths, predict_rows


def plain_loop(model: torch.nn.Module, folder: Path, prep, batch: int, workers: int) -> float:
    """Images/s of the loop a practitioner writes."""
    transform = T.Compose([T.Resize(round(prep.img_size / prep.crop_pct), T.InterpolationMode.BICUBIC),
                           T.CenterCrop(prep.img_size), T.ToTensor(), T.Normalize(prep.mean, prep.std)])
    data = torchvision.datasets.ImageFolder(str(folder), transform=transform)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers)
    start = time.perf_counter()
    with torch.inference_mode():
        for x, _ in loader:
            model(x)
    return len(data) / (time.perf_counter() - start)


def imgcls_pass(engine, paths: list[Path], workers: int) -> float:
    start = time.perf_counter()
    for _ in predict_rows(engine, paths, topk=1, workers=workers):
        pass
    return len(paths) / (time.perf_counter() - start)


def decode_alone(prep, paths: list[Path]) -> float:
    """Seconds to decode, resize and crop every file in one process, as predict's workers do."""
    start = time.perf_counter()
    for p in paths:
        prep.load(p)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run folder, an export folder or a .onnx file")
    parser.add_argument("folder", type=Path, help="an ImageFolder (class folders of images)")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    engine = open_engine(args.source)
    paths = collect_paths([str(args.folder)])
    model = engine.module.eval()
    print(f"{len(paths)} files, {engine.describe()}")
    grid = {(b, w): [] for b, w in itertools.product(args.batches, args.workers)}
    ours = {w: [] for w in args.workers}
    for _ in range(args.repeats):  # alternated: the machine's load hits both alike
        for (b, w), runs in grid.items():
            runs.append(plain_loop(model, args.folder, engine.preprocessing, b, w))
        for w, runs in ours.items():
            runs.append(imgcls_pass(engine, paths, w))
    plain = {k: statistics.median(v) for k, v in grid.items()}
    best = max(plain, key=plain.get)
    mine = {w: statistics.median(v) for w, v in ours.items()}
    best_w = max(mine, key=mine.get)
    decode = decode_alone(engine.preprocessing, paths)
    for (b, w), ips in sorted(plain.items()):
        print(f"  plain loop batch {b:>3} workers {w}: {ips:7.1f} img/s")
    for w, ips in sorted(mine.items()):
        print(f"  imgcls predict  workers {w} (batch {engine.batch_size}): {ips:7.1f} img/s")
    print(f"  best plain: batch {best[0]}, {best[1]} workers, {plain[best]:.1f} img/s; imgcls ({best_w} workers) "
          f"{mine[best_w]:.1f} img/s = {mine[best_w] / plain[best]:.2f}x")
    decode_ips = len(paths) / decode
    print(f"  decoding alone (decode, resize, crop; one process): {decode_ips:.1f} img/s: one core decoding would "
          f"take {mine[best_w] / decode_ips:.0%} of imgcls's wall time, {plain[best] / decode_ips:.0%} of the plain "
          "loop's")


if __name__ == "__main__":
    main()
