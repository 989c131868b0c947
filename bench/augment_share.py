"""What share of a training step the batched augmentation costs, per recipe.

    python bench/augment_share.py [--model resnet18_cifar] [--batch-size 128] [--repeats 5]

On cifar10-mini batches: times the full TrainTransform (augmentation, normalisation, erasing,
mixing) and one training step of the model (forward, backward, AdamW) in the same process, and
prints the augmentation's share of their sum. For contrast it also times the same recipe as
torchvision.transforms.v2 applied image by image, the way a per-sample Dataset would.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from imgcls.config import erasing_probability
from imgcls.data import AUGMENTATIONS, TrainTransform, load_dataset, per_image_transform
from imgcls.data.presets import PixelRecipe
from imgcls.models import create_model


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    data = load_dataset("cifar10-mini")
    images, labels = data.train.images[: args.batch_size], data.train.labels[: args.batch_size]
    model = create_model(args.model, data.num_classes).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(args.batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def step():
        loss = F.cross_entropy(model(x), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step_s = median_seconds(step, args.repeats)
    print(f"{args.model} training step, batch {args.batch_size}: {1000 * step_s:.1f} ms "
          f"({args.batch_size / step_s:.0f} img/s), {torch.get_num_threads()} threads")
    print(f"{'recipe':<28} {'batched ms':>10} {'share':>7} {'per-image ms':>13} {'speed-up':>9}")
    settings = [(name, {}) for name in AUGMENTATIONS] + [
        ("basic + mixup + cutmix", {"aug": "basic", "mixup": 0.2, "cutmix": 1.0}),
        ("randaugment + mix + ls 0.1", {"aug": "randaugment", "mixup": 0.2, "cutmix": 1.0, "label_smoothing": 0.1}),
    ]
    gen = torch.Generator().manual_seed(0)
    for label, opts in settings:
        aug = opts.get("aug", label)
        recipe = PixelRecipe(aug)  # the default crop padding (size/8) for the crop-based recipes
        transform = TrainTransform(recipe, 32, data.mean, data.std, data.num_classes,
                                   erasing_probability(aug, None),  # the recipe's own erasing (0.2 for standard)
                                   opts.get("mixup", 0.0), opts.get("cutmix", 0.0),
                                   label_smoothing=opts.get("label_smoothing", 0.0))
        batched = median_seconds(lambda t=transform: t(images, labels, gen), args.repeats)
        reference = per_image_transform(recipe, 32)
        per_image = median_seconds(lambda r=reference: [r(img) for img in images], max(1, args.repeats // 2))
        share = batched / (batched + step_s)
        print(f"{label:<28} {1000 * batched:>10.1f} {100 * share:>6.1f}% {1000 * per_image:>13.1f} "
              f"{per_image / batched:>8.1f}x")


if __name__ == "__main__":
    main()
