"""The pieces ported from airbench94, each a general trainer option, and the recipe that joins them."""

import pytest
import torch
import torch.nn.functional as F

from imgcls.config import build_config
from imgcls.data import augment as A
from imgcls.data.presets import PixelRecipe, TrainTransform, tta_view_weights, tta_views
from imgcls.errors import UserError
from imgcls.models import create_model
from imgcls.models.init import dirac_init
from imgcls.training.context import warmup_linear
from imgcls.training.lookahead import Lookahead
from imgcls.training.order import alternating_flips
from imgcls.training.transfer import apply_schedule, batchnorm_parameters, optimizer_param_groups, plan_groups
from tests.conftest import tiny_config

RECIPE = dict(model="airbench94", whiten=True, whiten_bias_epochs=1, init="dirac", freeze_bn_scale=True,
              bn_bias_lr_scale=64.0, decay_all=True, optimizer="sgd", lr=1.5, momentum=0.85, weight_decay=0.0013,
              schedule="linear", warmup_start_factor=0.2, final_lr_factor=0.07, lookahead=True,
              label_smoothing=0.2, crop_padding=2, crop_fill="reflect", alt_flip=True)


def test_dirac_init_makes_square_convolutions_pass_their_input_through():
    torch.manual_seed(0)
    model = create_model("airbench94", 10)
    assert dirac_init(model) == 7  # the six 3x3 convolutions and the 2x2 stem (which --whiten then overwrites)
    conv = model.group2[4]  # 256 -> 256
    x = torch.randn(2, 256, 8, 8)
    assert torch.allclose(conv(x), x)
    wide = model.group1[0]  # 24 -> 64: the first 24 filters copy the input, the rest keep their random init
    y = wide(torch.randn(2, 24, 8, 8))
    assert y.shape[1] == 64 and wide.weight[24:].abs().sum() > 0


def test_dirac_init_refuses_a_model_without_square_convolutions(tmp_path):
    from imgcls.training.train import fit

    with pytest.raises(UserError, match="--init dirac"):
        fit(tiny_config("cifar10-mini", tmp_path / "r", model="vit_cifar_tiny", init="dirac", epochs=1))
    assert not (tmp_path / "r").exists()


def test_lookahead_pulls_every_fifth_step_and_ends_on_the_average():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    look = Lookahead(model, total_steps=10)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    assert look.decay_at(10) == pytest.approx(0.95**5) and look.decay_at(5) == pytest.approx(0.95**5 / 8)
    for step in range(1, 11):
        with torch.no_grad():
            model[0].weight.add_(1.0)
            model[1].running_mean.add_(1.0)  # BatchNorm statistics are averaged too
        before = model[0].weight.clone()
        look.after_step(model)
        if step == 5:  # average = start + 5 moved by (1 - decay), and the weights jump back to it
            expected = start["0.weight"] + (1 - look.decay_at(5)) * 5
            assert torch.allclose(model[0].weight, expected)
            assert torch.allclose(model[1].running_mean, start["1.running_mean"] + (1 - look.decay_at(5)) * 5)
        elif step < 10:
            assert torch.equal(model[0].weight, before)  # untouched between pulls
    assert torch.equal(model[0].weight, look.average["0.weight"])  # the last step hands over the average
    assert model[1].num_batches_tracked.dtype == torch.int64  # counters are not averaged
    restored = Lookahead(model, total_steps=10)
    restored.load_state_dict(look.state_dict())
    assert restored.steps == 10 and torch.equal(restored.average["0.weight"], look.average["0.weight"])


def test_bn_biases_get_scaled_rate_and_the_same_decay_per_step():
    model = create_model("airbench94", 10)
    cfg = build_config(**RECIPE)
    groups = optimizer_param_groups(model, plan_groups(model, cfg), 0.01, bn_bias_lr_scale=64.0, decay_all=True)
    names = {id(p): n for n, p in model.named_parameters()}
    bn_biases = set(batchnorm_parameters(model, "bias"))
    for g in groups:
        members = {names[id(p)] for p in g["params"]}
        if members & bn_biases:
            assert members <= bn_biases and g["lr"] == pytest.approx(1.5 * 64)
            assert g["lr"] * g["weight_decay"] == pytest.approx(1.5 * 0.01)
        else:
            assert g["lr"] == 1.5 and g["weight_decay"] == 0.01  # decay_all: biases and norms decay too
    plain = optimizer_param_groups(model, plan_groups(model, cfg), 0.01)
    assert {g["lr"] for g in plain} == {1.5}
    assert any(g["weight_decay"] == 0.0 for g in plain)  # timm's rule: no decay on biases and norms


def test_fixed_parameters_follow_the_epoch():
    model = create_model("airbench94", 10)
    groups = plan_groups(model, build_config(**RECIPE))  # whiten_bias_epochs=1
    params = dict(model.named_parameters())
    for epoch, bias_trains in ((0, True), (1, False), (5, False)):
        apply_schedule(model, groups, epoch)
        assert params["stem.0.bias"].requires_grad is bias_trains
        assert not params["stem.0.weight"].requires_grad
        assert not any(params[n].requires_grad for n in batchnorm_parameters(model, "weight"))
        assert all(params[n].requires_grad for n in batchnorm_parameters(model, "bias"))
        assert params["head.weight"].requires_grad


def test_linear_schedule_is_airbenchs_triangle():
    factor = warmup_linear(total_steps=100, warmup_steps=23, start=0.2, end=0.07)
    assert factor(0) == pytest.approx(0.2)
    assert factor(23) == pytest.approx(1.0)
    assert factor(100) == pytest.approx(0.07)
    values = [factor(s) for s in range(101)]
    assert values[:24] == sorted(values[:24]) and values[23:] == sorted(values[23:], reverse=True)


def test_reflect_crop_matches_reflect_padding():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    oy, ox = torch.randint(0, 5, (16,), generator=gen), torch.randint(0, 5, (16,), generator=gen)
    out = A.pad_crop(images, 2, oy, ox, fill="reflect")
    padded = F.pad(images.float(), (2, 2, 2, 2), mode="reflect").to(torch.uint8)
    for i in range(16):
        assert torch.equal(out[i], padded[i, :, oy[i] : oy[i] + 8, ox[i] : ox[i] + 8])
    zeros = A.pad_crop(images, 2, torch.zeros(16, dtype=torch.long), torch.zeros(16, dtype=torch.long))
    assert (zeros[:, :, :2] == 0).all()  # the zero fill is unchanged


def test_reflect_padding_as_wide_as_the_image_is_refused(tmp_path):
    from imgcls.training.train import fit

    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="reflect padding of 8"):
        A.pad_crop(images, 8, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), fill="reflect")
    with pytest.raises(UserError, match="give at most 31") as e:
        fit(tiny_config("cifar10-mini", tmp_path / "r", crop_padding=40, crop_fill="reflect", epochs=1))
    assert "\n" not in str(e.value) and not (tmp_path / "r").exists()


def test_alternating_flips_show_each_image_both_ways_in_turn():
    n, batch = 12, 5
    images = torch.arange(n).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone().to(torch.uint8)
    images[:, :, :, 1] += 100  # left and right columns differ, so a flip is visible
    labels = torch.arange(n)
    seen = []
    for epoch in range(3):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        batches = ((images[order[k : k + batch]], labels[order[k : k + batch]]) for k in range(0, n, batch))
        flipped = {}
        for x, y in alternating_flips(batches, order, batch, n, seed=7, epoch=epoch):
            for img, label in zip(x, y, strict=True):
                flipped[int(label)] = bool(img[0, 0, 0] >= 100)
        seen.append(flipped)
    assert all(seen[0][i] != seen[1][i] and seen[0][i] == seen[2][i] for i in range(n))
    assert 0 < sum(seen[0].values()) < n  # the first epoch's flips are random, not all or none


def test_alt_flip_turns_the_recipes_random_flip_off():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    images[..., 4:] = 0  # right half dark: a flip would move the dark half left
    transform = TrainTransform(PixelRecipe("basic", crop_padding=0), 8, (0.5,) * 3, (0.5,) * 3, 10, random_flip=False)
    x, _ = transform(images, torch.zeros(64, dtype=torch.long), torch.Generator().manual_seed(0))
    assert (x[..., 4:] == -1).all()  # never flipped


def test_flip_crop_tta_weighs_the_unshifted_pair_half():
    w = tta_view_weights("flip-crop")
    assert w.sum() == pytest.approx(1.0) and w[0] + w[3] == pytest.approx(0.5)
    images = torch.arange(3 * 32 * 32).view(1, 3, 32, 32).to(torch.uint8)
    views = tta_views(images, "flip-crop", PixelRecipe("basic"), torch.Generator())
    assert torch.equal(views[1][..., 1:, 1:], images[..., :-1, :-1])  # 1 px at 32x32, as airbench
    assert tta_view_weights(4).tolist() == [0.25] * 4


@pytest.mark.parametrize("bad, message", [
    (dict(whiten_bias_epochs=3), "--whiten-bias-epochs"),
    (dict(init="dirac", pretrained=True, strategy="finetune"), "--init dirac"),
    (dict(lookahead=True, ema=0.99), "--lookahead and --ema"),
    (dict(final_lr_factor=0.1), "--final-lr-factor"),
    (dict(alt_flip=True, aug="none"), "--alt-flip"),
    (dict(crop_padding=2, aug="standard"), "--crop-padding"),
])
def test_contradictory_recipe_options_are_refused_in_one_line(bad, message):
    with pytest.raises(UserError, match=message) as e:
        build_config(**bad)
    assert "\n" not in str(e.value)


def test_the_recipe_trains_with_every_piece_in_place(tiny_folder, tmp_path):
    """Two epochs of the whole recipe on the tiny folder: the fixed parameters stay fixed, the
    whitening bias trains only in its epochs, and the saved weights are the lookahead average."""
    from imgcls.models.checkpoint import load_checkpoint
    from imgcls.training.train import fit

    run = tmp_path / "airbench"
    fit(tiny_config(tiny_folder, run, **RECIPE, epochs=2, batch_size=16, val_fraction=0.1))
    weights = load_checkpoint(run / "last.pt", "airbench94", 3)["model"]
    for name in batchnorm_parameters(create_model("airbench94", 3), "weight"):
        assert torch.equal(weights[name], torch.ones_like(weights[name]))
    assert weights["stem.0.bias"].abs().sum() > 0  # it trained in epoch 1

    model = create_model("airbench94", 3)
    from imgcls.data import load_dataset
    from imgcls.data.preprocessing import normalize

    data = load_dataset(str(tiny_folder), img_size=32, val_fraction=0.1)
    model.init_whitening(normalize(data.train.images[:5000], data.mean, data.std))
    assert torch.allclose(weights["stem.0.weight"], model.stem[0].weight)  # never trained
