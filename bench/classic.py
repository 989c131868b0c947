"""What the benchmarks compare against, and the hardware ceiling they measure against.

The classic recipe is torchvision's CIFAR-10 tutorial pipeline: a Dataset that hands out PIL
images, RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor + Normalize per image in
DataLoader workers, and an fp32 NCHW model with torch's default (foreach) AdamW. The textbook loop is
that pipeline with the models a practitioner would write for CIFAR-10 instead of imgcls's:
torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool, and a ViT assembled from
nn.TransformerEncoder (patch 4, dim 256, depth 6, 8 heads, MLP 4x, dropout 0.1).
"""

from __future__ import annotations

import time

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch import nn

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


def textbook_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 adapted to 32x32 inputs the way tutorials do: the 7x7/2 stem becomes a
    3x3/1 convolution and the max-pool goes."""
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class TextbookViT(nn.Module):
    """A ViT for 32x32 images out of torch's own blocks: a 4x4 patch convolution, a class token and learned
    positions, nn.TransformerEncoder (pre-norm, GELU), a final LayerNorm and a linear head on the class token."""

    def __init__(self, num_classes: int = 10, img_size: int = 32, patch: int = 4, dim: int = 256, depth: int = 6,
                 heads: int = 8, dropout: float = 0.1):
        super().__init__()
        self.patches = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + (img_size // patch) ** 2, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.encoder(tokens))[:, 0])


TEXTBOOK = {"resnet18_cifar": textbook_resnet18, "vit_cifar": TextbookViT}  # imgcls model -> the textbook one
