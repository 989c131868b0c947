"""Inference throughput: a plain evaluation loop against imgcls's, with and without TTA, in one process.

    python bench/inference_speed.py [--models resnet18_cifar vit_cifar convnext_cifar] [--images 2048]
                                    [--workers 2] [--data-dir DIR/cifar10]

Plain: PIL images through ToTensor + Normalize in DataLoader workers, batch 128, fp32 NCHW,
under torch.no_grad (bench/classic.py). imgcls: `predict_probs` as `imgcls eval` runs it, on the
uint8 test images in memory, inference_mode, channels_last, --precision auto, batches of up to
512 images; once plain and once with flip TTA (2 views, so half the images per second at best).
Images per second count input images, not views.
"""

from __future__ import annotations

import argparse
import time

import torch
from classic import bench_data, classic_loader

from imgcls.evaluation.predict import predict_probs
from imgcls.models import create_model
from imgcls.runtime import resolve_precision


def timed(fn, images: int) -> float:
    fn()  # warm-up: first-call allocations and oneDNN kernel choice
    start = time.perf_counter()
    fn()
    return images / (time.perf_counter() - start)


def measure(name: str, data, split, workers: int, precision: str) -> tuple[float, float, float]:
    """Images/s of the plain loop, of imgcls, and of imgcls with flip TTA."""
    torch.manual_seed(0)
    model = create_model(name, data.num_classes).eval()
    device = torch.device("cpu")

    loader = classic_loader(split, data.mean, data.std, 128, workers, train=False)  # workers persist

    @torch.no_grad()
    def plain():
        for x, _ in loader:
            model(x)

    plain_ips = timed(plain, len(split))
    model = model.to(memory_format=torch.channels_last)
    ours = timed(lambda: predict_probs(model, split, data.mean, data.std, device, precision), len(split))
    tta = timed(lambda: predict_probs(model, split, data.mean, data.std, device, precision, tta="flip"), len(split))
    return plain_ips, ours, tta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18_cifar", "vit_cifar", "convnext_cifar"])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop")
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py/ (default: bundled cifar10-mini)")
    args = parser.parse_args()

    data = bench_data(args.data_dir)
    split = data.test.subset(torch.arange(min(args.images, len(data.test))))
    precision = resolve_precision("auto", torch.device("cpu"))
    print(f"{torch.get_num_threads()} threads, {len(split)} test images, imgcls precision auto = {precision}")
    print(f"{'model':<20} {'plain img/s':>11} {'imgcls img/s':>12} {'speed-up':>8} {'imgcls + flip TTA':>17}")
    for name in args.models:
        plain_ips, ours, tta = measure(name, data, split, args.workers, precision)
        print(f"{name:<20} {plain_ips:>11.0f} {ours:>12.0f} {ours / plain_ips:>7.2f}x {tta:>17.0f}", flush=True)

if __name__ == "__main__":
    main()
