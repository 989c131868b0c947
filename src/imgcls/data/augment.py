"""Augmentation ops vectorised over a batch, with per-sample random parameters.

torchvision's transforms draw one set of parameters per call, so applying them to a batch gives
every image the same crop, the same RandAugment op, the same jitter. Calling them per image in
Python costs more than the small networks' training step. These ops draw per-sample parameters
from an explicit generator and do the pixel work as batch tensor ops, following torchvision's
arithmetic (blend, grayscale, affine grid) so that the results match its per-image functions;
tests/test_augment.py checks them against torchvision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torchvision.transforms.v2 import AutoAugment, AutoAugmentPolicy, RandAugment, TrivialAugmentWide

# torchvision's private colour-space helpers, reused so hue matches its adjust_hue exactly.
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

# ---------------------------------------------------------------- sampling helpers


def uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _first_valid(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the index of the first True attempt and whether any was True."""
    any_valid = valid.any(dim=1)
    first = torch.argmax(valid.int(), dim=1)
    return first, any_valid


# ---------------------------------------------------------------- geometry


def random_crop(images: torch.Tensor, pad: int, gen: torch.Generator, fill: str = "zeros") -> torch.Tensor:
    """Pad by `pad` (zeros, or the image reflected) and crop back to size at a per-sample offset,
    uniform in [0, 2*pad]."""
    n = len(images)
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    return pad_crop(images, pad, oy, ox, fill)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside [0, size) mirrored back in, without repeating the edge (torch's 'reflect')."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def pad_crop(images: torch.Tensor, pad: int, oy: torch.Tensor, ox: torch.Tensor, fill: str = "zeros") -> torch.Tensor:
    """Pad by `pad` (zeros or reflect), then crop each sample back to size at its own offset (oy, ox) into
    the padding. Reflection is done by index arithmetic, so uint8 batches need no float round trip."""
    n, c, h, w = images.shape
    dev = images.device
    oy, ox = oy.to(dev), ox.to(dev)
    rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chans = torch.arange(c, device=dev)[None, :, None, None]
    if fill == "reflect":
        if pad >= min(h, w):  # a second reflection would index past the image (or wrap, silently)
            raise ValueError(f"reflect padding of {pad} needs an image larger than {pad} px, not {h}x{w}")
        return images[batch, chans, _reflect(rows - pad, h), _reflect(cols - pad, w)]
    padded = F.pad(images, (pad, pad, pad, pad))
    return padded[batch, chans, rows, cols]


def random_hflip(images: torch.Tensor, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = (torch.rand(len(images), generator=gen) < p).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def resized_crop_boxes(n: int, height: int, width: int, scale, ratio, gen: torch.Generator, attempts: int = 10):
    """RandomResizedCrop.get_params for n samples: (top, left, h, w) integer tensors.

    Ten attempts per sample as torchvision makes; the first that fits wins, and a sample with
    none falls back to the whole image cropped to the allowed aspect ratio, as torchvision does.
    """
    area = height * width
    target = area * uniform(n * attempts, scale[0], scale[1], gen).view(n, attempts)
    log_r = uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), gen).view(n, attempts)
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(target * aspect)).long()
    h = torch.round(torch.sqrt(target / aspect)).long()
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first, ok = _first_valid(valid)
    rows = torch.arange(n)
    h, w = h[rows, first], w[rows, first]
    # fallback: centre crop at the clamped ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    h = torch.where(ok, h, torch.full_like(h, fh))
    w = torch.where(ok, w, torch.full_like(w, fw))
    top = (torch.rand(n, generator=gen) * (height - h + 1).float()).long()
    left = (torch.rand(n, generator=gen) * (width - w + 1).float()).long()
    top = torch.where(ok, top, (height - h) // 2)
    left = torch.where(ok, left, (width - w) // 2)
    return top, left, h, w


def random_resized_crop(images: torch.Tensor, gen: torch.Generator, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)):
    """RandomResizedCrop with a per-sample box, resized back to the input size."""
    n, _, height, width = images.shape
    return resized_crop(images, *resized_crop_boxes(n, height, width, scale, ratio, gen))


def _bilinear_taps(start: torch.Tensor, length: torch.Tensor, out_size: int, device):
    """interpolate's bilinear sampling (align_corners=False) of each sample's span [start, start+length)
    onto out_size pixels: (low index, high index, weight of high), each N x out_size. The taps stay
    inside the span, as when the crop is cut out first and then resized."""
    length = length.to(device).view(-1, 1)
    scale = length.float() / out_size
    src = ((torch.arange(out_size, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
    low = torch.minimum(src.floor().long(), length - 1)
    high = torch.minimum(low + 1, length - 1)
    weight = (src - low).clamp(0, 1)
    start = start.to(device).view(-1, 1)
    return start + low, start + high, weight


def resized_crop(images: torch.Tensor, top, left, h, w) -> torch.Tensor:
    """Crop box i (top, left, h, w) from sample i and resize it to the input size, bilinear, with
    torchvision's resized_crop sampling: a full-image box is exactly the identity. The box never
    exceeds the input, so the resize only enlarges and antialiasing would change nothing."""
    n, c, height, width = images.shape
    x0, x1, wx = _bilinear_taps(left, w, width, images.device)
    y0, y1, wy = _bilinear_taps(top, h, height, images.device)
    x = images.float()

    def cols(index):  # N x C x H_in x width
        return x.gather(3, index.view(n, 1, 1, width).expand(n, c, x.shape[2], width))

    wx = wx.view(n, 1, 1, width)
    across = cols(x0) * (1 - wx) + cols(x1) * wx

    def rows(index):  # N x C x height x width
        return across.gather(2, index.view(n, 1, height, 1).expand(n, c, height, width))

    wy = wy.view(n, 1, height, 1)
    out = rows(y0) * (1 - wy) + rows(y1) * wy
    return out.round().clamp(0, 255).to(images.dtype)


def _inverse_affine(angle, translate_x, translate_y, shear_x, shear_y, scale=1.0, center_x=0.0, center_y=0.0):
    """Per-sample inverse affine matrices (N x 2 x 3), torchvision's _get_inverse_affine_matrix."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -torch.cos(rot - sy) * torch.tan(sx) / torch.cos(sy) - torch.sin(rot)
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = -torch.sin(rot - sy) * torch.tan(sx) / torch.cos(sy) + torch.cos(rot)
    m0, m1, m3, m4 = d / scale, -b / scale, -c / scale, a / scale
    m2 = m0 * (-center_x - translate_x) + m1 * (-center_y - translate_y) + center_x
    m5 = m3 * (-center_x - translate_x) + m4 * (-center_y - translate_y) + center_y
    return torch.stack([m0, m1, m2, m3, m4, m5], dim=1).view(-1, 2, 3)


def affine(images: torch.Tensor, theta: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Apply per-sample inverse affine matrices with torchvision's pixel-centred grid, zero fill."""
    n, _, h, w = images.shape
    theta = theta.to(images.device, torch.float32)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=images.device)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=images.device)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=images.device)], -1)
    scaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], device=images.device)
    grid = base.view(1, h * w, 3).expand(n, -1, -1).bmm(scaled).view(n, h, w, 2)
    out = F.grid_sample(images.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.round().clamp(0, 255).to(images.dtype) if images.dtype == torch.uint8 else out


# The matrices are computed in float64, as torchvision computes them in Python floats, so that the
# float32 grid is the same and nearest-neighbour sampling picks the same pixels.
def _zeros_like(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x, dtype=torch.float64)


def rotate(images, degrees: torch.Tensor, mode: str = "nearest"):
    z = _zeros_like(degrees)
    return affine(images, _inverse_affine(-degrees.double(), z, z, z, z), mode)


def shear(images, magnitude: torch.Tensor, axis: str):
    """AutoAugment's shear: angle atan(magnitude), about the top-left corner."""
    n, _, h, w = images.shape
    deg = torch.rad2deg(torch.atan(magnitude.double()))
    z = _zeros_like(deg)
    sx, sy = (deg, z) if axis == "x" else (z, deg)
    # torchvision passes center=[0, 0] in pixels, i.e. (-w/2, -h/2) relative to the image centre
    return affine(images, _inverse_affine(z, z, z, sx, sy, 1.0, -w * 0.5, -h * 0.5))


def translate(images, pixels: torch.Tensor, axis: str):
    shift = pixels.double().trunc()  # torchvision passes int(magnitude)
    z = _zeros_like(shift)
    tx, ty = (shift, z) if axis == "x" else (z, shift)
    return affine(images, _inverse_affine(z, tx, ty, z, z))


# ---------------------------------------------------------------- colour (uint8 in, uint8 out)


def _per_sample(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return values.to(images.device, torch.float32).view(-1, 1, 1, 1)


def _blend(image1: torch.Tensor, image2: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend with a per-sample ratio; uint8 results are truncated as there. 1 - ratio
    is taken in float64 and then rounded, as torchvision does with a Python float."""
    r = _per_sample(ratio, image1)
    rest = (1.0 - ratio.double()).to(image1.device, torch.float32).view(-1, 1, 1, 1)
    out = image1.float().mul(r).add_(image2 * rest).clamp_(0, 255)
    return out.to(torch.uint8)


def _gray(images: torch.Tensor) -> torch.Tensor:
    """torchvision's grayscale in float, floored as it is for uint8 images before blending."""
    r, g, b = images.float().unbind(dim=1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(1).floor_()


def adjust_brightness(images, factor):
    return _blend(images, torch.zeros((), device=images.device), factor)


def adjust_saturation(images, factor):
    return _blend(images, _gray(images), factor)


def adjust_contrast(images, factor):
    mean = _gray(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def adjust_sharpness(images, factor):
    a, b = 1.0 / 13.0, 5.0 / 13.0  # torchvision's kernel, rounded to float32 the same way
    kernel = torch.tensor([[a, a, a], [a, b, a], [a, a, a]], device=images.device)
    x = images.float()
    blurred = F.conv2d(x, kernel.expand(3, 1, 3, 3), groups=3).round()
    out = x.clone()
    inner = out[..., 1:-1, 1:-1]
    r = _per_sample(factor, images)
    out[..., 1:-1, 1:-1] = inner + (1.0 - r) * (blurred - inner)
    return out.clamp(0, 255).to(torch.uint8)


def adjust_hue(images, shift):
    hsv = _rgb_to_hsv(TF.to_dtype(images, torch.float32, scale=True))
    h, s, v = hsv.unbind(dim=1)
    h = (h + _per_sample(shift, images).view(-1, 1, 1)).remainder(1.0)
    rgb = _hsv_to_rgb(torch.stack((h, s, v), dim=1))
    return TF.to_dtype(rgb, torch.uint8, scale=True)


def posterize(images, bits: torch.Tensor):
    mask = (255 - (2 ** (8 - bits.long()) - 1)).to(images.device, torch.uint8).view(-1, 1, 1, 1)
    return images & mask


def solarize(images, threshold: torch.Tensor):
    t = _per_sample(threshold, images)
    return torch.where(images.float() >= t, 255 - images, images)


def color_jitter(images, gen: torch.Generator, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1):
    """ColorJitter with per-sample factors; the order of the four is drawn once per batch."""
    n = len(images)
    factors = {
        "brightness": uniform(n, 1 - brightness, 1 + brightness, gen),
        "contrast": uniform(n, 1 - contrast, 1 + contrast, gen),
        "saturation": uniform(n, 1 - saturation, 1 + saturation, gen),
        "hue": uniform(n, -hue, hue, gen),
    }
    ops = {"brightness": adjust_brightness, "contrast": adjust_contrast,
           "saturation": adjust_saturation, "hue": adjust_hue}
    for i in torch.randperm(4, generator=gen).tolist():
        name = list(ops)[i]
        images = ops[name](images, factors[name])
    return images


# ---------------------------------------------------------------- random erasing (float, normalised)


def random_erasing(images: torch.Tensor, p: float, gen: torch.Generator, scale=(0.02, 0.33), ratio=(0.3, 3.3),
                   attempts: int = 10) -> torch.Tensor:
    """Erase one box per selected sample to 0 (the mean, after normalisation), as torchvision's
    RandomErasing(value=0): up to ten tries per sample for a box that fits."""
    n, _, height, width = images.shape
    chosen = torch.rand(n, generator=gen) < p
    area = height * width * uniform(n * attempts, scale[0], scale[1], gen).view(n, attempts)
    aspect = torch.exp(uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), gen)).view(n, attempts)
    h = torch.round(torch.sqrt(area * aspect)).long()
    w = torch.round(torch.sqrt(area / aspect)).long()
    first, ok = _first_valid((h < height) & (w < width))
    rows = torch.arange(n)
    h, w = h[rows, first], w[rows, first]
    top = (torch.rand(n, generator=gen) * (height - h + 1).float()).long()
    left = (torch.rand(n, generator=gen) * (width - w + 1).float()).long()
    return erase(images, top, left, h, w, chosen & ok)


def erase(images: torch.Tensor, top, left, h, w, selected: torch.Tensor) -> torch.Tensor:
    """Set box i of each selected sample i to 0, as torchvision's erase(image, top, left, h, w, v=0)."""
    _, _, height, width = images.shape
    top, left, h, w = (t.to(images.device).view(-1, 1, 1) for t in (top, left, h, w))
    ys = torch.arange(height, device=images.device).view(1, -1, 1)
    xs = torch.arange(width, device=images.device).view(1, 1, -1)
    box = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w) & selected.to(images.device).view(-1, 1, 1)
    return images.masked_fill(box.unsqueeze(1), 0.0)


# ---------------------------------------------------------------- AutoAugment family


def apply_op(images: torch.Tensor, op: str, magnitude: torch.Tensor) -> torch.Tensor:
    """One AutoAugment-family op with per-sample magnitudes (signs already applied)."""
    if op == "Identity":
        return images
    if op in ("ShearX", "ShearY"):
        return shear(images, magnitude, op[-1].lower())
    if op in ("TranslateX", "TranslateY"):
        return translate(images, magnitude, op[-1].lower())
    if op == "Rotate":
        return rotate(images, magnitude)
    if op == "Brightness":
        return adjust_brightness(images, 1.0 + magnitude)
    if op == "Color":
        return adjust_saturation(images, 1.0 + magnitude)
    if op == "Contrast":
        return adjust_contrast(images, 1.0 + magnitude)
    if op == "Sharpness":
        return adjust_sharpness(images, 1.0 + magnitude)
    if op == "Posterize":
        return posterize(images, magnitude)
    if op == "Solarize":
        return solarize(images, 255.0 * magnitude)
    if op == "AutoContrast":
        return TF.autocontrast(images)  # per image already
    if op == "Equalize":
        return TF.equalize(images)  # per image already
    if op == "Invert":
        return 255 - images
    raise ValueError(f"unknown op {op}")


def apply_per_sample(images: torch.Tensor, op_ids: torch.Tensor, magnitudes: torch.Tensor, names: list[str]):
    """Each sample gets op names[op_ids[i]] at magnitudes[i]: one batched call per op present."""
    out = images.clone()
    for k in torch.unique(op_ids).tolist():
        idx = torch.nonzero(op_ids == k).flatten()
        out[idx.to(images.device)] = apply_op(images[idx.to(images.device)], names[k], magnitudes[idx])
    return out


def _space(cls, num_bins: int, height: int, width: int):
    """torchvision's op table for RandAugment/TrivialAugmentWide/AutoAugment: name -> (mags, signed)."""
    table = {}
    for name, (fn, signed) in cls._AUGMENTATION_SPACE.items():
        mags = fn(num_bins, height, width)
        table[name] = (mags.float() if mags is not None else None, signed)
    return table


def _signed(mags: torch.Tensor, signed: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = (torch.rand(len(mags), generator=gen) < 0.5) & signed
    return torch.where(flip, -mags, mags)


class BatchRandAugment:
    """RandAugment (Cubuk et al., 2020): `num_ops` ops per sample, each chosen uniformly, at a fixed
    magnitude bin, with a random sign where the op is signed. Ops and signs are per sample."""

    def __init__(self, height: int, width: int, num_ops: int = 2, magnitude: int = 9, num_bins: int = 31):
        space = _space(RandAugment, num_bins, height, width)
        self.names = list(space)
        self.mags = torch.tensor([m[magnitude].item() if m is not None and m.ndim else 0.0
                                  for m, _ in space.values()])
        self.signed = torch.tensor([s for _, s in space.values()])
        self.num_ops = num_ops

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        for _ in range(self.num_ops):
            ops = torch.randint(0, len(self.names), (len(images),), generator=gen)
            images = apply_per_sample(images, ops, _signed(self.mags[ops], self.signed[ops], gen), self.names)
        return images


class BatchTrivialAugment:
    """TrivialAugment Wide (Müller & Hutter, 2021): one op per sample at a uniform random magnitude."""

    def __init__(self, height: int, width: int, num_bins: int = 31):
        space = _space(TrivialAugmentWide, num_bins, height, width)
        self.names = list(space)
        self.table = torch.stack([m if m is not None and m.ndim else torch.zeros(num_bins) for m, _ in space.values()])
        self.signed = torch.tensor([s for _, s in space.values()])
        self.num_bins = num_bins

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = len(images)
        ops = torch.randint(0, len(self.names), (n,), generator=gen)
        bins = torch.randint(0, self.num_bins, (n,), generator=gen)
        mags = _signed(self.table[ops, bins], self.signed[ops], gen)
        return apply_per_sample(images, ops, mags, self.names)


class BatchAutoAugment:
    """AutoAugment (Cubuk et al., 2019) with torchvision's learned policies: each sample draws a
    sub-policy, then applies each of its two ops with that op's probability."""

    def __init__(self, height: int, width: int, policy: AutoAugmentPolicy):
        space = _space(AutoAugment, 10, height, width)
        self.names = list(space)
        policies = AutoAugment(policy)._policies  # torchvision's published tables
        self.op = torch.tensor([[self.names.index(name) for name, _, _ in sub] for sub in policies])
        self.prob = torch.tensor([[p for _, p, _ in sub] for sub in policies])
        self.mag = torch.tensor([[space[name][0][m].item() if m is not None else 0.0 for name, _, m in sub]
                                 for sub in policies])
        self.signed = torch.tensor([s for _, s in space.values()])

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        n = len(images)
        sub = torch.randint(0, len(self.op), (n,), generator=gen)
        identity = self.names.index("Identity") if "Identity" in self.names else None
        for j in range(2):
            ops = self.op[sub, j]
            apply = torch.rand(n, generator=gen) <= self.prob[sub, j]
            mags = _signed(self.mag[sub, j], self.signed[ops], gen)
            if identity is None:  # AutoAugment's table has no Identity: skip the samples instead
                keep = torch.nonzero(apply).flatten()
                if len(keep):
                    images = images.clone()
                    images[keep] = apply_per_sample(images[keep], ops[keep], mags[keep], self.names)
            else:
                images = apply_per_sample(images, torch.where(apply, ops, identity), mags, self.names)
        return images
