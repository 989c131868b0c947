"""What the benchmarks compare against, and the hardware ceiling they measure against.

The classic recipe is torchvision's CIFAR-10 tutorial pipeline: a Dataset that hands out PIL
images, RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize per image in
DataLoader workers, and an fp32 NCHW model with torch's default (foreach) AdamW.
"""

from __future__ import annotations

import time

import torch
import torchvision.transforms as T
from PIL import Image

from imgcls.data import load_dataset


class PilImages(torch.utils.data.Dataset):
    """uint8 N x 3 x H x W images served one PIL image at a time, as torchvision's CIFAR10 does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.arrays = images.permute(0, 2, 3, 1).numpy()  # HWC, what CIFAR10 keeps
        self.labels, self.transform = labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.arrays[i])), self.labels[i]


def classic_transform(mean, std, train: bool):
    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if train else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def classic_loader(split, mean, std, batch_size: int, workers: int, train: bool = True):
    dataset = PilImages(split.images, split.labels, classic_transform(mean, std, train))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=train, drop_last=train,
                                       num_workers=workers, persistent_workers=workers > 0)


def bench_data(data_dir: str | None):
    """CIFAR-10 when its folder is given, else the bundled cifar10-mini (the same 32x32 images)."""
    if data_dir:
        return load_dataset("cifar10", data_dir, download=False)
    return load_dataset("cifar10-mini")


def gemm_peak(dtype: torch.dtype, max_n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Best GFLOP/s of a square matrix product in `dtype` on `device` (2 n^3 FLOPs). n doubles from
    512 while one product takes under half a second (emulated bf16 runs at a few GFLOP/s); on a GPU
    it goes on to 8192, where the tensor cores are busy."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    n, max_n = 512, 8192 if device == "cuda" else max_n
    while True:
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        start = time.perf_counter()
        a @ b  # also the warm-up
        sync()
        if n >= max_n or (device == "cpu" and time.perf_counter() - start > 0.5):
            break
        n *= 2
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
