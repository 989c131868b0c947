"""The batch augmentations: properties, and agreement with torchvision's reference versions."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
import torchvision.transforms.v2.functional as TF

from imgcls.data import AUGMENTATIONS, TrainTransform, per_image_transform
from imgcls.data import augment as A
from imgcls.data.mixing import Mixer, cutmix, cutmix_boxes, mixup, soft_cross_entropy, soft_targets
from imgcls.data.presets import BatchAugment


@pytest.fixture(scope="module")
def batch(mini):
    return mini.train.images[:64], mini.train.labels[:64]


@pytest.mark.parametrize("name", AUGMENTATIONS)
def test_recipes_keep_shape_dtype_range_and_are_seeded(name, batch):
    x, _ = batch
    aug = BatchAugment(name, 32)
    a, b = aug(x, torch.Generator().manual_seed(0)), aug(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    if name != "none":
        assert not torch.equal(a, aug(x, torch.Generator().manual_seed(1)))
    ref = per_image_transform(name, 32)(x[0])  # the torchvision twin used for streamed folders
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
    diff = (ours.int() - ref.int()).abs()
    if op in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
        assert (diff > 0).float().mean() < 0.01  # nearest-neighbour ties may round differently
    else:
        assert diff.max() <= 1


def test_per_sample_colour_factors_match_torchvision(batch):
    x = batch[0][:6]
    factors = torch.tensor([0.5, 0.8, 1.0, 1.2, 1.5, 0.9])
    hues = torch.tensor([-0.1, -0.05, 0.0, 0.02, 0.07, 0.1])
    pairs = [(A.adjust_brightness, TF.adjust_brightness, factors), (A.adjust_contrast, TF.adjust_contrast, factors),
             (A.adjust_saturation, TF.adjust_saturation, factors), (A.adjust_sharpness, TF.adjust_sharpness, factors),
             (A.adjust_hue, TF.adjust_hue, hues)]
    for ours, theirs, values in pairs:
        ref = torch.stack([theirs(img, float(v)) for img, v in zip(x, values, strict=True)])
        assert (ours(x, values).int() - ref.int()).abs().max() <= 1, ours.__name__


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


def test_erasing_probability_is_respected():
    out = A.random_erasing(torch.ones(4000, 3, 16, 16), 0.2, torch.Generator().manual_seed(0))
    rate = (out == 0).any(dim=3).any(dim=2).any(dim=1).float().mean().item()
    assert rate == pytest.approx(0.2, abs=0.025)


def test_resized_crop_boxes_follow_torchvision():
    top, left, h, w = A.resized_crop_boxes(4000, 32, 32, (0.8, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.zeros(3, 32, 32), [0.8, 1.0], [3 / 4, 4 / 3])
                        for _ in range(4000)])
    ours_area, ref_area = (h * w).float() / 1024, (ref[:, 2] * ref[:, 3]).float() / 1024
    for q in (0.1, 0.5, 0.9):
        assert ours_area.quantile(q).item() == pytest.approx(ref_area.quantile(q).item(), abs=0.02)


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
    tt = TrainTransform("standard", 32, (0.5,) * 3, (0.25,) * 3, 10)
    assert tt.erasing == 0.2
    out, t = tt(x, y, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.equal(t.argmax(1), y)


# --- pixel parity: each batched op against torchvision's functional op on the same parameters -------
# Exact where the arithmetic is the same. Two kinds of difference are bounded instead, never more
# than one level: torchvision's uint8 resize uses fixed-point weights (its own float path is matched
# exactly), and torchvision blends with add_(alpha=...), a fused multiply-add on vector CPUs, where a
# per-sample factor needs a separate multiply; a sum on an integer boundary can then truncate apart.

N = 32


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


@pytest.mark.parametrize("name, exact", [("brightness", True), ("contrast", False), ("saturation", False),
                                         ("sharpness", False), ("hue", True)])
def test_colour_ops_match_torchvision(imgs, name, exact):
    gen = torch.Generator().manual_seed(4)
    factors = A.uniform(N, -0.5, 0.5, gen) if name == "hue" else A.uniform(N, 0.1, 2.0, gen)
    ours = getattr(A, f"adjust_{name}")(imgs, factors)
    ref = _per_image(getattr(TF, f"adjust_{name}"), imgs, _as_list(factors))
    diff = (ours.int() - ref.int()).abs()
    if exact:
        assert torch.equal(ours, ref)
    else:  # see the note above: a fused multiply-add in torchvision's blend
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01


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
