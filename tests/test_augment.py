"""The batch augmentations: properties, and agreement with torchvision's reference versions."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from imgcls.config import CROP_RECIPES, default_crop_padding, erasing_probability
from imgcls.data import AUGMENTATIONS, TrainTransform, per_image_transform
from imgcls.data import augment as A
from imgcls.data.mixing import Mixer, cutmix, cutmix_boxes, mixup, soft_cross_entropy, soft_targets
from imgcls.data.presets import BatchAugment, PixelRecipe


@pytest.fixture(scope="module")
def batch(mini):
    return mini.train.images[:64], mini.train.labels[:64]


def _recipe(name: str, img_size: int = 32) -> PixelRecipe:
    """The pixel stage as the run plan resolves it: the default crop padding where the recipe crops."""
    return PixelRecipe(name, default_crop_padding(img_size) if name in CROP_RECIPES else None)


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_recipes_keep_shape_dtype_range_and_are_seeded(name, batch):
    x, _ = batch
    aug = BatchAugment(_recipe(name), 32)
    a, b = aug(x, torch.Generator().manual_seed(0)), aug(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    if name != "none":
        assert not torch.equal(a, aug(x, torch.Generator().manual_seed(1)))
    ref = per_image_transform(_recipe(name), 32)(x[0])  # the torchvision twin used for streamed folders
    assert ref.shape == x[0].shape and ref.dtype == torch.uint8


RANDAUGMENT_OPS = [op for op in T.RandAugment._AUGMENTATION_SPACE if op != "Identity"] + ["Invert"]


@pytest.mark.parametrize("op", RANDAUGMENT_OPS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_each_op_matches_torchvision_per_image(op, sign, batch):
    x = batch[0][:8]
    fn, signed = T.RandAugment._AUGMENTATION_SPACE.get(op, (lambda *a: None, False))
    mags = fn(31, 32, 32)
    magnitude = float(mags[9]) * (sign if signed else 1.0) if mags is not None else 0.0
    ours = A.apply_op(x, op, torch.full((8,), magnitude))
    ref = torch.stack([T.RandAugment()._apply_image_or_video_transform(
        img, op, magnitude, T.InterpolationMode.NEAREST, {}) for img in x])
    if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        assert ((ours.int() - ref.int()).abs() > 0).float().mean() < 0.01  # nearest-neighbour ties may round apart
    else:
        _assert_colour_parity(ours, ref, op)


def test_every_op_of_the_three_policies_is_known_and_an_unknown_one_is_refused():
    for cls in (T.RandAugment, T.TrivialAugmentWide, T.AutoAugment):
        assert set(cls._AUGMENTATION_SPACE) <= set(A._OPS), cls.__name__
    with pytest.raises(ValueError, match="unknown op"):
        A.apply_op(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "Blur", torch.zeros(1))


def test_per_sample_colour_factors_match_torchvision(batch):
    x = batch[0][:6]
    factors = torch.tensor([0.5, 0.8, 1.0, 1.2, 1.5, 0.9])
    hues = torch.tensor([-0.1, -0.05, 0.0, 0.02, 0.07, 0.1])
    pairs = [(A.adjust_brightness, TF.adjust_brightness, factors), (A.adjust_contrast, TF.adjust_contrast, factors),
             (A.adjust_saturation, TF.adjust_saturation, factors), (A.adjust_sharpness, TF.adjust_sharpness, factors),
             (A.adjust_hue, TF.adjust_hue, hues)]
    for ours, theirs, values in pairs:
        ref = torch.stack([theirs(img, float(v)) for img, v in zip(x, values, strict=True)])
        _assert_colour_parity(ours(x, values), ref, ours.__name__)


def test_crop_offsets_are_uniform_over_the_padding_range():
    x = torch.zeros(6000, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 0, 0] = 255  # the marker pixel's new position reveals the offset
    out = A.random_crop(x, 2, torch.Generator().manual_seed(0))
    pos = out.view(6000, -1).float().argmax(dim=1)
    seen = out.view(6000, -1).amax(dim=1) > 0
    ys, xs = pos[seen] // 8, pos[seen] % 8  # offsets of 0..2 keep the marker visible at y = 2 - oy
    counts = torch.bincount((2 - ys) * 3 + (2 - xs), minlength=9).float()
    expected = 6000 / 25  # each of the 5 x 5 offsets is equally likely
    assert ((counts - expected).abs() < 4 * expected**0.5).all()
    assert seen.float().mean().item() == pytest.approx(9 / 25, abs=0.03)


def test_erasing_areas_follow_torchvision():
    gen = torch.Generator().manual_seed(0)
    x = torch.ones(3000, 3, 32, 32)
    ours = 1 - A.random_erasing(x, 1.0, gen).mean(dim=(1, 2, 3))
    torch.manual_seed(0)
    eraser = T.RandomErasing(p=1.0)
    ref = torch.tensor([(1 - eraser(torch.ones(3, 32, 32))).mean().item() for _ in range(3000)])
    for q in (0.1, 0.5, 0.9):
        assert ours.quantile(q).item() == pytest.approx(ref.quantile(q).item(), abs=0.02)


def test_erasing_skips_samples_whose_boxes_never_fit():
    """On an 8 x 8 image most candidates of 70-95% of the area are too large; a sample with none that fits
    is left alone, as torchvision's RandomErasing leaves it. The share erased follows torchvision's."""
    gen = torch.Generator().manual_seed(0)
    ours = (A.random_erasing(torch.ones(4000, 1, 8, 8), 1.0, gen, scale=(0.7, 0.95)) == 0).flatten(1).any(1)
    torch.manual_seed(0)
    eraser = T.RandomErasing(p=1.0, scale=(0.7, 0.95))
    ref = torch.tensor([(eraser(torch.ones(1, 8, 8)) == 0).any().item() for _ in range(4000)])
    assert 0.3 < ref.float().mean() < 0.7  # both outcomes are common here
    assert ours.float().mean().item() == pytest.approx(ref.float().mean().item(), abs=0.03)


def test_erasing_probability_is_respected():
    out = A.random_erasing(torch.ones(4000, 3, 16, 16), 0.2, torch.Generator().manual_seed(0))
    rate = (out == 0).any(dim=3).any(dim=2).any(dim=1).float().mean().item()
    assert rate == pytest.approx(0.2, abs=0.025)


@pytest.mark.parametrize("height, width, scale", [(32, 32, (0.8, 1.0)), (32, 32, (0.08, 1.0)), (24, 40, (0.08, 1.0)),
                                                  (40, 24, (0.5, 1.0))])
def test_resized_crop_boxes_follow_torchvision(height, width, scale):
    """The distribution of the box's area, aspect and position, against torchvision's per-image draws; the
    wide and tall images fall back to the clamped centred box for part of the samples."""
    ratio = (3 / 4, 4 / 3)
    top, left, h, w = A.resized_crop_boxes(4000, height, width, scale, ratio, torch.Generator().manual_seed(0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, height, width), list(scale), list(ratio))
                        for _ in range(4000)])
    ours = {"area": (h * w).float() / (height * width), "aspect": (w / h).float(), "top": top / height,
            "left": left / width}
    theirs = {"area": (ref[:, 2] * ref[:, 3]).float() / (height * width), "aspect": (ref[:, 3] / ref[:, 2]).float(),
              "top": ref[:, 0] / height, "left": ref[:, 1] / width}
    for key in ours:
        for q in (0.1, 0.5, 0.9):
            assert ours[key].quantile(q).item() == pytest.approx(theirs[key].quantile(q).item(), abs=0.03), key


@pytest.mark.parametrize("height, width, ratio", [
    (50, 20, (1.2, 1.5)),  # taller than any allowed ratio: the full width, the height cut to it
    (20, 50, (0.6, 0.7)),  # wider: the full height, the width cut
    (30, 30, (1.4, 1.6)),
    (25, 31, (0.6, 0.7)),  # 25 x 0.7 = 17.5: Python's rounding, half to even
])
def test_resized_crop_fallback_is_torchvisions_centred_box(height, width, ratio):
    """At 90-100% of the area and an aspect ratio the image cannot hold, no candidate ever fits, so every
    box is the fallback, the largest centred one at the image's ratio clamped into `ratio`; torchvision's
    get_params, its ten draws all rejected, returns that same fixed box."""
    boxes = A.resized_crop_boxes(200, height, width, (0.9, 1.0), ratio, torch.Generator().manual_seed(0))
    expected = T.RandomResizedCrop.get_params(torch.zeros(1, height, width), [0.9, 1.0], list(ratio))
    assert [t.unique().tolist() for t in boxes] == [[v] for v in expected]
    # an allowed ratio but too large an area: the whole image
    boxes = A.resized_crop_boxes(50, height, width, (2.0, 3.0), (0.1, 10.0), torch.Generator().manual_seed(0))
    assert [t.unique().tolist() for t in boxes] == [[0], [0], [height], [width]]


def test_mixup_is_exactly_the_convex_combination():
    x = torch.randn(8, 3, 4, 4)
    partner = torch.randperm(8)
    lam = torch.rand(8)
    out = mixup(x, partner, lam)
    for i in range(8):
        assert torch.equal(out[i], lam[i] * x[i] + (1 - lam[i]) * x[partner[i]])


def test_cutmix_lambda_is_the_kept_area_and_the_box_stays_inside():
    gen = torch.Generator().manual_seed(0)
    lam = torch.rand(500, generator=gen)
    (y0, y1, x0, x1), kept = cutmix_boxes(lam, 20, 30, gen)
    assert (y0 >= 0).all() and (y1 <= 20).all() and (x0 >= 0).all() and (x1 <= 30).all()
    assert (y0 <= y1).all() and (x0 <= x1).all()
    x = torch.zeros(500, 1, 20, 30)
    ones = torch.ones(500, 1, 20, 30)
    # paste ones (partner) into zeros: the kept share of each image is exactly lambda
    mixed = cutmix(torch.cat([x, ones]), torch.cat([torch.arange(500) + 500, torch.arange(500)]),
                   tuple(torch.cat([t, t]) for t in (y0, y1, x0, x1)))[:500]
    assert torch.allclose(1 - mixed.mean(dim=(1, 2, 3)), kept, atol=1e-6)


def test_soft_targets_sum_to_one_and_smoothing_is_applied_once():
    a, b = torch.tensor([0, 1, 2]), torch.tensor([3, 1, 0])
    lam = torch.tensor([0.7, 0.5, 1.0])
    t = soft_targets(a, b, lam, 10, smoothing=0.1)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert t[2, 2].item() == pytest.approx(1 - 0.1 + 0.1 / 10)  # unmixed: 1 - eps + eps/K
    assert t[0, 0].item() == pytest.approx(0.7 * 0.9 + 0.01) and t[0, 3].item() == pytest.approx(0.3 * 0.9 + 0.01)


def test_soft_loss_equals_the_mixed_hard_losses():
    torch.manual_seed(0)
    logits = torch.randn(16, 10)
    a, b = torch.randint(0, 10, (16,)), torch.randint(0, 10, (16,))
    lam = torch.rand(16)
    loss = soft_cross_entropy(logits, soft_targets(a, b, lam, 10))
    ce = F.cross_entropy
    expected = (lam * ce(logits, a, reduction="none") + (1 - lam) * ce(logits, b, reduction="none")).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    smoothed = soft_cross_entropy(logits, soft_targets(a, a, torch.ones(16), 10, 0.1))
    assert smoothed.item() == pytest.approx(ce(logits, a, label_smoothing=0.1).item(), rel=1e-6)


def test_mixer_switches_between_mixup_and_cutmix(batch):
    x = TF.to_dtype(batch[0][:32], torch.float32, scale=True)
    y = batch[1][:32]
    mixer = Mixer(10, mixup_alpha=0.2, cutmix_alpha=1.0, switch_prob=0.5)
    gen = torch.Generator().manual_seed(0)
    kinds = set()
    for _ in range(20):
        out, t = mixer(x, y, gen)
        assert torch.allclose(t.sum(1), torch.ones(32))
        # CutMix leaves pixels equal to one of the two sources; Mixup blends nearly all of them
        kinds.add("cutmix" if (out == x).float().mean() > 0.3 else "mixup")
    assert kinds == {"cutmix", "mixup"}
    off, t = Mixer(10, mixup_alpha=0.2, prob=0.0)(x, y, gen)
    assert torch.equal(off, x) and torch.equal(t.argmax(1), y)


def test_train_transform_records_defaults(batch):
    x, y = batch
    # the recipe's erasing default is the run plan's (standard: 0.2), resolved before TrainTransform
    assert erasing_probability("standard", None) == 0.2 and erasing_probability("basic", None) == 0.0
    assert erasing_probability("standard", 0.0) == 0.0 and erasing_probability("basic", 0.5) == 0.5  # given wins
    recipe = PixelRecipe("standard")
    tt = TrainTransform(recipe, 32, (0.5,) * 3, (0.25,) * 3, 10, random_erasing=erasing_probability("standard", None))
    assert tt.erasing == 0.2
    assert TrainTransform(recipe, 32, (0.5,) * 3, (0.25,) * 3, 10).erasing == 0.0  # no default hidden in here
    out, t = tt(x, y, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.equal(t.argmax(1), y)


# --- pixel parity: each batched op against torchvision's functional op on the same parameters -------
# Exact where the arithmetic is the same. torchvision's uint8 resize uses fixed-point weights, so that
# difference is bounded instead, at one level (its own float path is matched exactly). Its blends end in
# add_(alpha=...), which rounds once where the machine fuses the multiply-add (AVX2 CPUs); the
# batch blend forms that sum exactly and rounds it once too (augment._fused), so the colour ops are
# exact there. On a machine whose add rounds the product first, a sum on an integer boundary can
# truncate apart: at most one level, on under 1% of the pixels.

N = 32


def _add_fuses() -> bool:
    """Whether torch.add(a, b, alpha=c) rounds once on this machine, in its vector loop and its scalar
    tail. Probed where the two roundings differ: -1 + (1 + 2^-12) * (1 + 2^-12) is 2^-11 + 2^-24 when
    fused, and 2^-11 when the product is first rounded to float32 (the 2^-24 is half its last place)."""
    e = 2.0**-12
    out = torch.add(torch.full((67,), -1.0), torch.full((67,), 1 + e), alpha=1 + e)
    return bool((out == 2 * e + e * e).all())


def _assert_colour_parity(ours, ref, what=""):
    if _add_fuses():
        assert torch.equal(ours, ref), what
    else:
        diff = (ours.int() - ref.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01, what


def _per_image(fn, x, *params):
    return torch.stack([fn(x[i], *(p[i] if isinstance(p, list) else p for p in params)) for i in range(len(x))])


def _as_list(t):
    return [v.item() for v in t]


@pytest.fixture(scope="module")
def imgs(mini):
    return mini.train.images[:N]


def test_full_image_resized_crop_is_exactly_the_identity(imgs):
    z = torch.zeros(N, dtype=torch.long)
    assert torch.equal(A.resized_crop(imgs, z, z, z + 32, z + 32), imgs)
    # and RandomResizedCrop at scale 1 with ratio 1 always draws the full box
    assert torch.equal(A.random_resized_crop(imgs, torch.Generator().manual_seed(0), (1.0, 1.0), (1.0, 1.0)), imgs)


def test_resized_crop_matches_torchvision(imgs):
    top, left, h, w = A.resized_crop_boxes(N, 32, 32, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    ours = A.resized_crop(imgs, top, left, h, w)
    params = [_as_list(t) for t in (top, left, h, w)]

    def ref(img, *box):
        return TF.resized_crop(img, *box, [32, 32], T.InterpolationMode.BILINEAR)

    on_float = _per_image(lambda img, *box: ref(img.float(), *box).round().to(torch.uint8), imgs, *params)
    assert torch.equal(ours, on_float)  # the same arithmetic as torchvision's float resize
    diff = (ours.int() - _per_image(ref, imgs, *params).int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.25  # its uint8 kernel: fixed-point weights


def test_pad_crop_and_flip_match_torchvision_exactly(imgs):
    gen = torch.Generator().manual_seed(1)
    oy, ox = torch.randint(0, 9, (N,), generator=gen), torch.randint(0, 9, (N,), generator=gen)
    ref = _per_image(lambda img, y, x: TF.crop(TF.pad(img, [4]), y, x, 32, 32), imgs, _as_list(oy), _as_list(ox))
    assert torch.equal(A.pad_crop(imgs, 4, oy, ox), ref)
    assert torch.equal(A.random_hflip(imgs, gen, p=1.0), _per_image(TF.horizontal_flip, imgs))


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_rotate_matches_torchvision_exactly(imgs, mode):
    degrees = A.uniform(N, -45, 45, torch.Generator().manual_seed(2))
    ref = _per_image(lambda img, d: TF.rotate(img, d, T.InterpolationMode(mode)), imgs, _as_list(degrees))
    assert torch.equal(A.rotate(imgs, degrees, mode), ref)


def test_affine_matches_torchvision_exactly(imgs):
    gen = torch.Generator().manual_seed(3)
    angle, tx, ty, sx, sy = (A.uniform(N, -a, a, gen).double() for a in (30, 4, 4, 15, 15))
    scale = A.uniform(N, 0.8, 1.2, gen).double()
    ours = A.affine(imgs, A._inverse_affine(angle, tx, ty, sx, sy, scale))
    ref = _per_image(lambda img, a, x, y, s, h, v: TF.affine(img, a, [x, y], s, [h, v]), imgs,
                     *(_as_list(t) for t in (angle, tx, ty, scale, sx, sy)))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("axis", ["x", "y"])
def test_shear_and_translate_match_torchvision_exactly(imgs, axis):
    magnitude = A.uniform(N, -0.3, 0.3, torch.Generator().manual_seed(7))

    def on_axis(value):
        return [value, 0.0] if axis == "x" else [0.0, value]

    ref = _per_image(lambda img, m: TF.affine(img, 0.0, [0, 0], 1.0, on_axis(math.degrees(math.atan(m))),
                                              center=[0, 0]), imgs, _as_list(magnitude))
    assert torch.equal(A.shear(imgs, magnitude, axis), ref)
    shift = magnitude * 30
    ref = _per_image(lambda img, s: TF.affine(img, 0.0, [int(v) for v in on_axis(s)], 1.0, [0.0, 0.0]), imgs,
                     _as_list(shift))
    assert torch.equal(A.translate(imgs, shift, axis), ref)


# --- the affine conventions: directions, quarter turns, and parity at other sizes -----------------


def _noise(n, h, w, seed):
    """Random uint8 images: no symmetry, so a wrong direction or a one-pixel shift shows."""
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_affine_matrix_composes_torchvision_conventions():
    def moves(point, **kw):
        params = {"angle": 0.0, "translate_x": 0.0, "translate_y": 0.0, "shear_x": 0.0, "shear_y": 0.0} | kw
        out = A.affine_matrix(**params)[0] @ torch.tensor([*point, 1.0], dtype=torch.float64)
        return [round(v, 9) for v in out[:2].tolist()]

    assert moves((1, 0), angle=90.0) == [0, 1]  # right -> down: clockwise on screen (y points down)
    assert moves((0, 1), shear_x=45.0) == [-1, 1]  # x -= y tan(shear_x)
    assert moves((1, 0), shear_y=45.0) == [1, -1]  # y -= x tan(shear_y)
    assert moves((1, 0), scale=2.0, translate_x=3.0, translate_y=-1.0) == [5, -1]  # scale, then shift
    assert moves((2, 0), angle=90.0, center_x=1.0, center_y=0.0) == [1, 1]  # about the given centre
    # shear first (x), then rotate: (0, 1) -> (-1, 1) -> (-1, -1)
    assert moves((0, 1), angle=90.0, shear_x=45.0) == [-1, -1]
    theta = A._inverse_affine(torch.tensor([30.0]), 2.0, -1.0, 10.0, -5.0, 1.1, 3.0, 4.0)
    forward = A.affine_matrix(30.0, 2.0, -1.0, 10.0, -5.0, 1.1, 3.0, 4.0)
    assert torch.allclose(theta @ forward, torch.eye(3, dtype=torch.float64)[:2])


def test_pixel_directions():
    def marker(row, col, size=7):
        x = torch.zeros(1, 1, size, size, dtype=torch.uint8)
        x[0, 0, row, col] = 255
        return x

    def where(x):
        return x[0, 0].nonzero().tolist()

    one = torch.ones(1)
    assert where(A.translate(marker(3, 3), 2 * one, "x")) == [[3, 5]]  # +x: right
    assert where(A.translate(marker(3, 3), 2 * one, "y")) == [[5, 3]]  # +y: down
    assert where(A.rotate(marker(0, 6), 90 * one)) == [[0, 0]]  # rotate +90: counter-clockwise
    assert where(A.rotate(marker(0, 6), -90 * one)) == [[6, 6]]
    z = torch.zeros(1, dtype=torch.float64)
    assert where(A.affine(marker(0, 6), A._inverse_affine(90 * one.double(), z, z, z, z))) == [[6, 6]]  # clockwise
    # AutoAugment's shear about the top-left corner: the bottom row moves by -6.5 * tan(30 deg) = -3.75 px
    tan30 = torch.tensor([math.tan(math.radians(30))])
    assert where(A.shear(marker(6, 6), tan30, "x")) == [[6, 2]]
    assert where(A.shear(marker(6, 6), tan30, "y")) == [[2, 6]]


@pytest.mark.parametrize("size", [31, 32])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_quarter_turns_are_exactly_rot90(size, mode):
    x = _noise(8, size, size, 10)
    for degrees, k in ((90, 1), (180, 2), (270, 3), (-90, 3), (450, 1), (-180, 2)):
        assert torch.equal(A.rotate(x, torch.full((8,), float(degrees)), mode), torch.rot90(x, k, dims=(2, 3))), degrees
    # a different quarter turn per sample in one call
    turns = torch.tensor([0, 1, 2, 3, 1, 0, 3, 2])
    ref = torch.stack([torch.rot90(img, int(k), dims=(1, 2)) for img, k in zip(x, turns, strict=True)])
    assert torch.equal(A.rotate(x, 90.0 * turns, mode), ref)


@pytest.mark.parametrize("size", [31, 32, 64])
def test_rotate_over_the_whole_circle_matches_torchvision_exactly(size):
    x = _noise(N, size, size, 11)
    degrees = A.uniform(N, -400, 400, torch.Generator().manual_seed(12))  # beyond +-360: the angle wraps
    assert torch.equal(A.rotate(x, degrees), _per_image(TF.rotate, x, _as_list(degrees)))


@pytest.mark.parametrize("size", [31, 32, 64])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_strong_shear_and_translate_match_torchvision_at_each_size(size, axis):
    x = _noise(N, size, size, 13)
    gen = torch.Generator().manual_seed(14)
    magnitude = A.uniform(N, -1.0, 1.0, gen)  # up to 45 degrees: much of the image leaves the frame

    def on_axis(value):
        return [value, 0.0] if axis == "x" else [0.0, value]

    ref = _per_image(lambda img, m: TF.affine(img, 0.0, [0, 0], 1.0, on_axis(math.degrees(math.atan(m))),
                                              center=[0, 0]), x, _as_list(magnitude))
    assert torch.equal(A.shear(x, magnitude, axis), ref)
    shift = A.uniform(N, -0.6 * size, 0.6 * size, gen)
    ref = _per_image(lambda img, s: TF.affine(img, 0.0, [int(v) for v in on_axis(s)], 1.0, [0.0, 0.0]), x,
                     _as_list(shift))
    assert torch.equal(A.translate(x, shift, axis), ref)


@pytest.mark.parametrize("height, width", [(31, 31), (32, 32), (64, 64), (31, 45)])
def test_affine_about_any_centre_matches_torchvision_exactly(height, width):
    x = _noise(N, height, width, 15)
    gen = torch.Generator().manual_seed(16)
    angle, tx, ty, sx, sy, cx, cy = (A.uniform(N, -a, a, gen).double() for a in (180, 5.5, 5.5, 30, 30, 10, 10))
    scale = A.uniform(N, 0.7, 1.3, gen).double()
    ours = A.affine(x, A._inverse_affine(angle, tx, ty, sx, sy, scale, cx, cy))
    # torchvision's centre is in pixels from the top-left corner; ours is from the image centre
    ref = _per_image(lambda img, a, u, v, s, h, g, p, q: TF.affine(img, a, [u, v], s, [h, g],
                                                                   center=[p + width / 2, q + height / 2]),
                     x, *(_as_list(t) for t in (angle, tx, ty, scale, sx, sy, cx, cy)))
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("name, exact", [("brightness", True), ("contrast", False), ("saturation", False),
                                         ("sharpness", False), ("hue", True)])
@pytest.mark.parametrize("source", ["cifar", "noise"])
def test_colour_ops_match_torchvision(imgs, name, exact, source):
    """Brightness (no second product to add) and hue are exact everywhere; the blends of contrast,
    saturation and sharpness are exact where add fuses (see the note above)."""
    x = imgs if source == "cifar" else _noise(N, 32, 32, 17)
    gen = torch.Generator().manual_seed(4)
    factors = A.uniform(N, -0.5, 0.5, gen) if name == "hue" else A.uniform(N, 0.1, 2.0, gen)
    ours = getattr(A, f"adjust_{name}")(x, factors)
    ref = _per_image(getattr(TF, f"adjust_{name}"), x, _as_list(factors))
    if exact:
        assert torch.equal(ours, ref)
    else:
        _assert_colour_parity(ours, ref)


@pytest.mark.parametrize("height, width", [(1, 5), (2, 2), (3, 3), (5, 4), (31, 45)])
def test_sharpness_matches_torchvision_at_any_size(height, width):
    """The smoothing covers the interior only; images without one (2 px or less) come back unchanged, as
    torchvision returns them. The smoothed values themselves (factor 0) are exact on any machine."""
    x = _noise(8, height, width, 18)
    factors = A.uniform(8, 0.0, 2.0, torch.Generator().manual_seed(19))
    ours = A.adjust_sharpness(x, factors)
    _assert_colour_parity(ours, _per_image(TF.adjust_sharpness, x, _as_list(factors)))
    if min(height, width) <= 2:
        assert torch.equal(ours, x)
    zero = torch.zeros(8)
    assert torch.equal(A.adjust_sharpness(x, zero), _per_image(TF.adjust_sharpness, x, [0.0] * 8))


def test_posterize_solarize_autocontrast_equalize_invert_match_torchvision_exactly(imgs):
    gen = torch.Generator().manual_seed(5)
    bits = torch.randint(1, 9, (N,), generator=gen)
    assert torch.equal(A.posterize(imgs, bits), _per_image(TF.posterize, imgs, _as_list(bits)))
    threshold = torch.randint(0, 256, (N,), generator=gen).float()
    assert torch.equal(A.solarize(imgs, threshold), _per_image(TF.solarize, imgs, _as_list(threshold)))
    for op, fn in (("AutoContrast", TF.autocontrast), ("Equalize", TF.equalize), ("Invert", TF.invert)):
        assert torch.equal(A.apply_op(imgs, op, torch.zeros(N)), _per_image(fn, imgs)), op


def test_erasing_matches_torchvision_exactly(imgs):
    x = TF.to_dtype(imgs, torch.float32, scale=True)
    gen = torch.Generator().manual_seed(6)
    h, w = torch.randint(1, 20, (N,), generator=gen), torch.randint(1, 20, (N,), generator=gen)
    top, left = torch.randint(0, 12, (N,), generator=gen), torch.randint(0, 12, (N,), generator=gen)
    selected = torch.rand(N, generator=gen) < 0.7
    ref = torch.stack([TF.erase(x[i], *_as_list(torch.stack([top[i], left[i], h[i], w[i]])), torch.tensor(0.0))
                       if selected[i] else x[i] for i in range(N)])
    assert torch.equal(A.erase(x, top, left, h, w, selected), ref)
