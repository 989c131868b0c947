"""Augmentation ops vectorised over a batch, with per-sample random parameters.

torchvision's transforms draw one set of parameters per call, so applying them to a batch gives
every image the same crop, the same RandAugment op, the same jitter. Calling them per image in
Python costs more than the small networks' training step. These ops draw per-sample parameters
from an explicit generator and do the pixel work as batch tensor ops that round as torchvision's
per-image functions do (blend, grayscale, smoothing, affine grid), so that the results match them;
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


def _box_shapes(n: int, attempts: int, area: int, scale, ratio, gen: torch.Generator):
    """`attempts` candidate box shapes for each of n samples, drawn as RandomResizedCrop and RandomErasing
    draw theirs: the box covers a fraction of `area` uniform in `scale`, and its aspect ratio is
    log-uniform in `ratio`. Returns the rounded sides (sqrt(size * aspect), sqrt(size / aspect)), each
    n x attempts: (width, height) when the ratio is width / height, (height, width) when it is height / width."""
    size = area * uniform(n * attempts, scale[0], scale[1], gen).view(n, attempts)
    aspect = uniform(n * attempts, math.log(ratio[0]), math.log(ratio[1]), gen).view(n, attempts).exp()
    return (size * aspect).sqrt().round().long(), (size / aspect).sqrt().round().long()


def _first_fit(fits: torch.Tensor, *sides: torch.Tensor):
    """The sides of each sample's first candidate that fits (per row of the n x attempts mask `fits`), and
    whether one did; a sample with none gets its first candidate's sides, for the caller to replace."""
    attempts = fits.shape[1]
    tried = torch.arange(attempts).expand_as(fits)
    first = torch.where(fits, tried, attempts).amin(dim=1, keepdim=True)
    found = first.squeeze(1) < attempts
    first = first.masked_fill(~found[:, None], 0)
    return *(side.gather(1, first).squeeze(1) for side in sides), found


def _uniform_offset(room: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A per-sample integer uniform in [0, room[i]]."""
    return (torch.rand(len(room), generator=gen) * (room + 1).float()).long()


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
    """RandomResizedCrop's boxes for n samples: (top, left, h, w) integer tensors.

    As torchvision does per image: up to ten candidate boxes per sample, the first that fits inside the
    image taken at a uniform position; a sample whose candidates all fail gets the fallback, the largest
    centred box whose aspect ratio is the image's own clamped into `ratio`.
    """
    w, h = _box_shapes(n, attempts, height * width, scale, ratio, gen)
    h, w, found = _first_fit((w >= 1) & (w <= width) & (h >= 1) & (h <= height), h, w)
    aspect = min(max(width / height, min(ratio)), max(ratio))
    h = torch.where(found, h, min(height, round(width / aspect)))
    w = torch.where(found, w, min(width, round(height * aspect)))
    top = torch.where(found, _uniform_offset(height - h, gen), (height - h) // 2)
    left = torch.where(found, _uniform_offset(width - w, gen), (width - w) // 2)
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


# Affine maps. A point is (x, y, 1): x to the right and y down, in pixels, measured from the image
# centre, so the pixel in row i, column j has its centre at (j + 1/2 - W/2, i + 1/2 - H/2). Each map
# is a 3 x 3 homogeneous matrix per sample, built and inverted in float64: torchvision computes its
# matrices in Python floats, and only then does the float32 grid agree with its per-image kernel.


def _homogeneous(a, b, c, d, e, f) -> torch.Tensor:
    """N x 3 x 3 matrices [[a, b, c], [d, e, f], [0, 0, 1]] from N-vectors."""
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    return torch.stack([a, b, c, d, e, f, zero, zero, one], dim=-1).view(-1, 3, 3)


def affine_matrix(angle, translate_x, translate_y, shear_x, shear_y, scale=1.0, center_x=0.0, center_y=0.0):
    """Per-sample forward maps (N x 3 x 3, float64) with the parameters of torchvision's `affine`.

    Sample i's matrix takes a point of the input image to the point of the output it lands on:

        M = T(c + t) @ R(angle) @ Hy(shear_y) @ Hx(shear_x) @ S(scale) @ T(-c)

    Read right to left: move the centre c = (center_x, center_y) (relative to the image centre) to the
    origin; scale by `scale`; shear along x, x -= y * tan(shear_x); then along y, y -= x * tan(shear_y);
    rotate by R(a) = [[cos a, -sin a], [sin a, cos a]]; move the origin to c + t, t = (translate_x,
    translate_y). With y pointing down, R turns the picture clockwise for a positive angle, which is
    torchvision's `affine` convention; its `rotate` turns counter-clockwise, i.e. is this map with
    -angle (see `rotate`). Angles in degrees; the arguments are N-vectors or scalars.
    """
    params = (angle, translate_x, translate_y, shear_x, shear_y, scale, center_x, center_y)
    angle, tx, ty, sx, sy, s, cx, cy = torch.broadcast_tensors(*(torch.as_tensor(p, dtype=torch.float64)
                                                                 for p in params))
    zero, one = torch.zeros_like(angle), torch.ones_like(angle)
    cos, sin = torch.cos(torch.deg2rad(angle)), torch.sin(torch.deg2rad(angle))
    to_origin = _homogeneous(one, zero, -cx, zero, one, -cy)
    scaling = _homogeneous(s, zero, zero, zero, s, zero)
    along_x = _homogeneous(one, -torch.tan(torch.deg2rad(sx)), zero, zero, one, zero)
    along_y = _homogeneous(one, zero, zero, -torch.tan(torch.deg2rad(sy)), one, zero)
    rotation = _homogeneous(cos, -sin, zero, sin, cos, zero)
    back = _homogeneous(one, zero, cx + tx, zero, one, cy + ty)
    return back @ rotation @ along_y @ along_x @ scaling @ to_origin


def _inverse_affine(angle, translate_x, translate_y, shear_x, shear_y, scale=1.0, center_x=0.0, center_y=0.0):
    """Per-sample inverse maps (N x 2 x 3, float64): output point -> input point, for `affine`."""
    forward = affine_matrix(angle, translate_x, translate_y, shear_x, shear_y, scale, center_x, center_y)
    return torch.linalg.inv(forward)[:, :2]


def _sampling_grid(theta: torch.Tensor, height: int, width: int, device) -> torch.Tensor:
    """grid_sample's coordinates (N x H x W x 2) of the input points that theta sends each output pixel
    centre to.

    With align_corners=False grid_sample puts the input's outer edges at -1 and 1, so a point u pixels
    right of the centre is at u / (W/2), and likewise down with H/2. Dividing theta's two rows by those
    half-sizes gives a map from an output centre straight to normalised input coordinates, applied to
    all centres at once as one float32 matrix product. These float32 steps (the rows cast, then divided,
    then one product with the exact centre coordinates) round as torchvision's per-image kernel does:
    composing the division into the float64 matrix instead moves about 3 in 10^5 bilinear values by
    one level, and the odd nearest pixel at 64 px.
    """
    half = torch.tensor([[width / 2], [height / 2]], device=device)
    rows = theta[:, :2].to(device, torch.float32) / half  # N x 2 x 3
    xs = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    ys = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    centres = torch.stack(torch.broadcast_tensors(xs, ys[:, None], torch.ones((), device=device)), dim=-1)
    points = centres.view(1, height * width, 3).expand(len(rows), -1, -1)
    return points.bmm(rows.transpose(1, 2)).view(-1, height, width, 2)


def affine(images: torch.Tensor, theta: torch.Tensor, mode: str = "nearest") -> torch.Tensor:
    """Resample sample i through its inverse map theta[i] (N x 2 x 3 or N x 3 x 3, output point -> input
    point, in affine_matrix's coordinates): nearest or bilinear, points outside the input read 0,
    uint8 results rounded."""
    _, _, h, w = images.shape
    grid = _sampling_grid(theta, h, w, images.device)
    out = F.grid_sample(images.float(), grid, mode=mode, padding_mode="zeros", align_corners=False)
    return out.round().clamp(0, 255).to(images.dtype) if images.dtype == torch.uint8 else out


def _zeros_like(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x, dtype=torch.float64)


def rotate(images, degrees: torch.Tensor, mode: str = "nearest"):
    """torchvision's rotate: counter-clockwise by `degrees` about the centre, i.e. affine_matrix with
    the angle negated (after reducing it to [0, 360), as torchvision does)."""
    z = _zeros_like(degrees)
    return affine(images, _inverse_affine(-degrees.double().remainder(360.0), z, z, z, z), mode)


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


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Clamped to [0, 255] and truncated, as torchvision converts its float results back."""
    return x.clamp(0, 255).to(torch.uint8)


def _fused(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a + b * c for float32 operands, rounded to float32 once, as a fused multiply-add rounds it.

    torchvision's blends end in `add_(other, alpha=...)`, which the vector kernels of AVX2 CPUs evaluate
    as a fused multiply-add (CUDA's too, nvcc contracting a + alpha * b by default). Its alpha is one
    Python float per image; ours differs per sample, so no alpha argument can carry it. The product and
    the sum are formed in float64 instead, where the product of two float32 numbers is exact and the sum
    nearly always is: the one rounding to float32 then gives the fused result (a second rounding could
    only differ if an inexact float64 sum fell exactly halfway between two float32 numbers, about one
    chance in 2^29).
    """
    return (a.double() + b.double() * c.double()).float()


def _blend(images: torch.Tensor, towards: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Each sample moved from `towards` (factor 0) to itself (factor 1), or beyond it, per sample:
    factor * images + (1 - factor) * towards, clamped and truncated to uint8.

    The roundings are torchvision's: images * factor rounded to float32, then the second product added with
    one rounding (see `_fused`). 1 - factor is taken in float64 and then rounded, as torchvision takes it
    in Python.
    """
    own = images.float() * _per_sample(factor, images)
    rest = _per_sample((1.0 - factor.double()).float(), images)
    return _to_uint8(_fused(own, towards, rest))


_LUMA = (0.2989, 0.587, 0.114)  # the ITU-R 601-2 luma weights of R, G and B, as torchvision and PIL use them


def _gray(images: torch.Tensor) -> torch.Tensor:
    """The luma of each pixel (N x 1 x H x W), floored to an integer, as torchvision floors it for uint8
    images before blending with it.

    The weighted sum is accumulated a channel at a time, each later channel added with add's `alpha`, the
    same float32 kernels (fused or not, as the machine runs them) that torchvision's grayscale uses, so a
    luma that lands near an integer floors the same way.
    """
    first, *others = images.float().unbind(dim=1)
    luma = first * _LUMA[0]
    for channel, weight in zip(others, _LUMA[1:], strict=True):
        luma = torch.add(luma, channel, alpha=weight)
    return luma.floor().unsqueeze(1)


def adjust_brightness(images, factor):
    return _blend(images, torch.zeros((), device=images.device), factor)


def adjust_saturation(images, factor):
    return _blend(images, _gray(images), factor)


def adjust_contrast(images, factor):
    mean = _gray(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factor)


def _smoothed_interior(images: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH filter on the interior pixels (all but a 1-pixel border), as integers: each pixel's
    3 x 3 neighbourhood with weight 1, its own value with weight 5, the sum divided by 13 and rounded.

    The sum is exact in int32. k / 13 is never halfway between two integers, and a float32 convolution with
    the weights 1/13 and 5/13 errs by far less than the 1/26 that separates it from one, so rounding the
    exact quotient gives the values torchvision's rounded convolution gives.
    """
    x = images.to(torch.int32)
    height, width = x.shape[-2:]
    total = 4 * x[..., 1:-1, 1:-1]  # the centre's extra weight; the loop adds it a fifth time
    for dy in range(3):
        for dx in range(3):
            total = total + x[..., dy : height - 2 + dy, dx : width - 2 + dx]
    return torch.div(2 * total + 13, 26, rounding_mode="floor")  # round(total / 13), total >= 0


def adjust_sharpness(images, factor):
    """Per-sample sharpness, as PIL and torchvision define it: the interior blended between the smoothed
    image (factor 0) and the image (factor 1, and beyond it above 1); the border pixels stay as they are."""
    inner = images[..., 1:-1, 1:-1].float()
    smooth = _smoothed_interior(images).float()
    rest = _per_sample((1.0 - factor.double()).float(), images)
    out = images.clone()
    out[..., 1:-1, 1:-1] = _to_uint8(_fused(inner, smooth - inner, rest))
    return out


def adjust_hue(images, shift):
    """Each sample's hue turned by shift[i] (a fraction of the colour circle, in [-0.5, 0.5]) in HSV.

    The RGB <-> HSV conversions and the uint8 <-> float scaling are torchvision's own (its private
    _rgb_to_hsv and _hsv_to_rgb, and to_dtype), so the results equal its adjust_hue's per image.
    """
    hsv = _rgb_to_hsv(TF.to_dtype(images, torch.float32, scale=True))
    hue = (hsv[:, :1] + _per_sample(shift, images)).remainder(1.0)
    turned = _hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], dim=1))
    return TF.to_dtype(turned, torch.uint8, scale=True)


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
    RandomErasing(value=0): each sample is selected with probability p and tries up to ten candidate
    boxes (its ratio is height / width) for one strictly smaller than the image; with none it is left as
    it was."""
    n, _, height, width = images.shape
    selected = torch.rand(n, generator=gen) < p
    h, w = _box_shapes(n, attempts, height * width, scale, ratio, gen)
    h, w, found = _first_fit((h < height) & (w < width), h, w)
    top, left = _uniform_offset(height - h, gen), _uniform_offset(width - w, gen)
    return erase(images, top, left, h, w, selected & found)


def erase(images: torch.Tensor, top, left, h, w, selected: torch.Tensor) -> torch.Tensor:
    """Set box i of each selected sample i to 0, as torchvision's erase(image, top, left, h, w, v=0)."""
    _, _, height, width = images.shape
    top, left, h, w = (t.to(images.device).view(-1, 1, 1) for t in (top, left, h, w))
    ys = torch.arange(height, device=images.device).view(1, -1, 1)
    xs = torch.arange(width, device=images.device).view(1, 1, -1)
    box = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w) & selected.to(images.device).view(-1, 1, 1)
    return images.masked_fill(box.unsqueeze(1), 0.0)


# ---------------------------------------------------------------- AutoAugment family


def _enhancement(adjust):
    """An ImageEnhance-style op (brightness, colour, contrast, sharpness) whose AutoAugment magnitude is an
    offset from the factor 1 that leaves the image unchanged."""
    return lambda images, magnitude: adjust(images, magnitude + 1.0)


def _along(op, axis: str):
    return lambda images, magnitude: op(images, magnitude, axis)


# The AutoAugment family's ops by name, each (images, per-sample magnitudes with their signs) -> images.
# AutoContrast and Equalize are torchvision's own: they already work on each image of a batch separately.
_OPS = {
    "Identity": lambda images, _: images,
    # the ImageEnhance family
    "Brightness": _enhancement(adjust_brightness),
    "Color": _enhancement(adjust_saturation),
    "Contrast": _enhancement(adjust_contrast),
    "Sharpness": _enhancement(adjust_sharpness),
    # tone curves
    "Posterize": posterize,
    "Solarize": lambda images, fraction: solarize(images, fraction * 255.0),  # the threshold, as a share of 255
    "Invert": lambda images, _: 255 - images,
    "AutoContrast": lambda images, _: TF.autocontrast(images),
    "Equalize": lambda images, _: TF.equalize(images),
    # geometry
    "Rotate": lambda images, degrees: rotate(images, degrees),
    "ShearX": _along(shear, "x"),
    "ShearY": _along(shear, "y"),
    "TranslateX": _along(translate, "x"),
    "TranslateY": _along(translate, "y"),
}


def apply_op(images: torch.Tensor, op: str, magnitude: torch.Tensor) -> torch.Tensor:
    """One AutoAugment-family op with per-sample magnitudes (signs already applied)."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op}")
    return _OPS[op](images, magnitude)


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
