"""Training recipes: the batch pipeline for in-memory data and its torchvision twin for streams.

    none            nothing
    basic           random crop (zero padding of size/8: 4 px at 32) + horizontal flip
    standard        RandomResizedCrop(0.8-1) + flip + ColorJitter(.2, .2, .2, .1) + rotation <= 15
                    + RandomErasing(0.2)
    randaugment     crop + flip + RandAugment(2 ops, magnitude 9)
    trivialaugment  crop + flip + TrivialAugmentWide
    autoaugment     crop + flip + AutoAugment (CIFAR-10 policy up to 64 px, ImageNet's above)

In memory, `BatchAugment` runs a recipe's pixel stage on whole uint8 batches with per-sample parameters
(data/augment.py). A streamed folder runs `per_image_transform`, the same recipe in
torchvision.transforms.v2, in its DataLoader workers. Random erasing (on normalised pixels),
Mixup/CutMix and label smoothing then act on the batch in both cases (`TrainTransform`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torchvision.transforms.v2 as T

from imgcls.config import AUGMENTATIONS, CROP_RECIPES, default_crop_padding
from imgcls.data import augment as A
from imgcls.data.mixing import Mixer
from imgcls.data.preprocessing import normalize


@dataclass(frozen=True)
class PixelRecipe:
    """A recipe's pixel stage as a run's plan resolved it: what training augments with, what `--tta N`
    redraws at test time, and what an export records so that its TTA is the run's."""

    aug: str = "basic"
    crop_padding: int | None = None  # the random crop's padding; None: the recipe has no random crop
    crop_fill: str = "zeros"  # zeros | reflect

    @classmethod
    def of(cls, cfg) -> PixelRecipe:
        """The recipe of a resolved TrainConfig."""
        return cls(cfg.aug, cfg.crop_padding, cfg.crop_fill)

    def padding(self, img_size: int) -> int:
        return self.crop_padding if self.crop_padding is not None else default_crop_padding(img_size)

    def as_dict(self) -> dict:
        return asdict(self)


def _autoaugment_policy(img_size: int) -> T.AutoAugmentPolicy:
    return T.AutoAugmentPolicy.CIFAR10 if img_size <= 64 else T.AutoAugmentPolicy.IMAGENET


class BatchAugment:
    """A recipe's pixel stage on uint8 batches: `aug(images, gen) -> images`."""

    def __init__(self, recipe: PixelRecipe, img_size: int, random_flip: bool = True):
        if recipe.aug not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {recipe.aug}")
        name = recipe.aug
        self.name, self.pad, self.fill = name, recipe.padding(img_size), recipe.crop_fill
        # off under --alt-flip, whose flips the loop applies (they depend on the epoch and the image)
        self.flip = A.random_hflip if random_flip else lambda images, gen: images
        self.auto = {
            "randaugment": lambda: A.BatchRandAugment(img_size, img_size, num_ops=2, magnitude=9),
            "trivialaugment": lambda: A.BatchTrivialAugment(img_size, img_size),
            "autoaugment": lambda: A.BatchAutoAugment(img_size, img_size, _autoaugment_policy(img_size)),
        }.get(name, lambda: None)()

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.name == "none":
            return images
        if self.name == "standard":
            images = self.flip(A.random_resized_crop(images, gen, scale=(0.8, 1.0)), gen)
            images = A.color_jitter(images, gen, 0.2, 0.2, 0.2, 0.1)
            return A.rotate(images, A.uniform(len(images), -15.0, 15.0, gen))
        if self.name not in CROP_RECIPES:  # the recipes with a random crop, declared once (config.py)
            raise ValueError(f"{self.name} is neither none, standard nor a crop recipe of {CROP_RECIPES}")
        images = self.flip(A.random_crop(images, self.pad, gen, self.fill), gen)
        return self.auto(images, gen) if self.auto is not None else images


def per_image_transform(recipe: PixelRecipe, img_size: int) -> T.Compose:
    """The same recipe as torchvision v2 transforms on one uint8 image (for streamed folders)."""
    name, pad = recipe.aug, recipe.padding(img_size)
    mode = "reflect" if recipe.crop_fill == "reflect" else "constant"
    crop_flip = [T.RandomCrop(img_size, padding=pad, padding_mode=mode), T.RandomHorizontalFlip()]
    steps = {
        "none": [T.Identity()],
        "basic": crop_flip,
        "standard": [T.RandomResizedCrop(img_size, scale=(0.8, 1.0), antialias=True), T.RandomHorizontalFlip(),
                     T.ColorJitter(0.2, 0.2, 0.2, 0.1), T.RandomRotation(15)],
        "randaugment": [*crop_flip, T.RandAugment(num_ops=2, magnitude=9)],
        "trivialaugment": [*crop_flip, T.TrivialAugmentWide()],
        "autoaugment": [*crop_flip, T.AutoAugment(_autoaugment_policy(img_size))],
    }[name]
    return T.Compose(steps)


class TrainTransform:
    """uint8 batch + labels -> normalised float batch + soft targets, per the run's settings."""

    def __init__(self, recipe: PixelRecipe, img_size: int, mean, std, num_classes: int, random_erasing: float = 0.0,
                 mixup: float = 0.0, cutmix: float = 0.0, mix_prob: float = 1.0, mix_switch_prob: float = 0.5,
                 label_smoothing: float = 0.0, pixels_done: bool = False, random_flip: bool = True):
        self.pixels = None if pixels_done else BatchAugment(recipe, img_size, random_flip)
        self.mean, self.std = mean, std
        self.erasing = random_erasing
        self.mixer = Mixer(num_classes, mixup, cutmix, mix_prob, mix_switch_prob, label_smoothing)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        if self.pixels is not None:
            images = self.pixels(images, gen)
        x = normalize(images, self.mean, self.std)
        if self.erasing > 0:
            x = A.random_erasing(x, self.erasing, gen)
        return self.mixer(x, labels, gen)


def parse_tta(mode: str) -> str | int:
    """'none', 'flip', 'flip-crop', or a number of random training-recipe views."""
    if mode in ("none", "flip", "flip-crop"):
        return mode
    if mode.isascii() and mode.isdigit() and int(mode) >= 1:  # ASCII: '５' is a digit to str.isdigit
        return int(mode)
    raise ValueError(f"--tta must be flip, flip-crop or a number of views (got '{mode}')")


def tta_view_count(mode: str | int) -> int:
    return mode if isinstance(mode, int) else {"none": 1, "flip": 2, "flip-crop": 6}[mode]


def tta_view_weights(mode: str | int) -> torch.Tensor:
    """How much each of `tta_views`' views counts in the average. flip-crop weighs as airbench94 does: the
    unshifted pair half, the four shifted views the other half; every other mode weighs its views equally."""
    if mode == "flip-crop":
        return torch.tensor([2.0, 1.0, 1.0, 2.0, 1.0, 1.0], dtype=torch.float64) / 8
    n = tta_view_count(mode)
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def tta_views(images: torch.Tensor, mode: str | int, recipe: PixelRecipe, gen: torch.Generator) -> list[torch.Tensor]:
    """The views test-time augmentation averages over, each a uint8 N x 3 x H x W batch like `images`.

    flip: the image and its mirror. flip-crop: those two plus the image shifted by size/32 pixels (at
    least 1; reflect-padded) towards the top-left and the bottom-right, each also mirrored: 6 views, as
    airbench94's TTA. N: N random draws of the training recipe's pixel stage (no erasing or mixing).
    """
    if mode == "none":
        return [images]
    if isinstance(mode, int):
        pixels = BatchAugment(recipe, images.shape[-1])
        return [pixels(images, gen) for _ in range(mode)]
    views = [images]
    if mode == "flip-crop":
        s = max(1, images.shape[-1] // 32)
        height, width = images.shape[-2:]
        padded = torch.nn.functional.pad(images.float(), (s, s, s, s), mode="reflect").to(torch.uint8)
        views += [padded[..., dy : dy + height, dx : dx + width] for dy, dx in ((0, 0), (2 * s, 2 * s))]
    return views + [v.flip(-1) for v in views]
