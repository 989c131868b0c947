"""Calibration refuses to fit on validation data too small to fit anything, and never stores a
temperature that only says so."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import rundir
from imgcls.cli import main
from imgcls.errors import UserError
from imgcls.evaluation.calibration import MIN_PER_CLASS, check_calibration_data, check_scaling, fit_scaling
from imgcls.inference.scaling import TEMPERATURE_RANGE, Scaling
from imgcls.models.checkpoint import save_checkpoint

TEMPERATURE_MIN = MIN_PER_CLASS["temperature"]  # one parameter: ten images of each class
VECTOR_MIN = MIN_PER_CLASS["vector"]  # a scale and a bias per class: twenty of each


def _error(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


# --- the checks on their own ---------------------------------------------------------------------

def test_a_class_without_validation_images_is_named():
    labels = torch.tensor([0] * 20 + [2] * 20)
    message = _error(lambda: check_calibration_data(labels, 3, ["cat", "dog", "bird"]))
    assert "no images of 'dog'" in message and f"at least {TEMPERATURE_MIN}" in message


def test_too_few_validation_images_of_a_class_are_refused():
    labels = torch.tensor([0] * 30 + [1] * (TEMPERATURE_MIN - 1))
    message = _error(lambda: check_calibration_data(labels, 2, ["cat", "dog"]))
    assert f"only {TEMPERATURE_MIN - 1} images of 'dog'" in message and "--val-fraction" in message
    check_calibration_data(torch.tensor([0, 1] * TEMPERATURE_MIN), 2)  # exactly the minimum is enough


def test_vector_scaling_needs_twice_the_images_of_temperature_scaling():
    assert VECTOR_MIN == 2 * TEMPERATURE_MIN  # two parameters per class against one in all
    enough_for_temperature = torch.tensor([0, 1] * TEMPERATURE_MIN)
    check_calibration_data(enough_for_temperature, 2, method="temperature")
    message = _error(lambda: check_calibration_data(enough_for_temperature, 2, ["cat", "dog"], method="vector"))
    assert f"only {TEMPERATURE_MIN} images of 'cat'" in message
    assert f"vector scaling needs at least {VECTOR_MIN}" in message
    labels = torch.tensor([0] * 30 + [1] * (VECTOR_MIN - 1))
    assert f"only {VECTOR_MIN - 1} images of 'dog'" in _error(
        lambda: check_calibration_data(labels, 2, ["cat", "dog"], method="vector"))
    check_calibration_data(torch.tensor([0, 1] * VECTOR_MIN), 2, method="vector")  # exactly the minimum


def _logits(labels, classes, margin, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(labels), classes, generator=gen, dtype=torch.float64)
    z[torch.arange(len(labels)), labels] += margin
    return z


def test_a_split_classified_all_right_is_refused_before_fitting():
    labels = torch.arange(3).repeat(TEMPERATURE_MIN)
    logits = _logits(labels, 3, margin=4.0)  # every image right by a wide margin
    scaling = fit_scaling(logits, labels)
    assert scaling.temperature < 0.2  # the loss falls towards T = 0: the fit stops wherever L-BFGS gives up
    message = _error(lambda: check_calibration_data(labels, 3, logits=logits))
    assert f"every one of the {len(labels)} validation images is classified right" in message
    logits[0] = logits[0].flip(0)  # one mistake: a finite optimum exists, the data may be fitted
    check_calibration_data(labels, 3, logits=logits)


def test_one_class_predicted_as_another_fits_an_absurd_temperature():
    labels = torch.zeros(6, dtype=torch.long)
    logits = _logits(labels, 3, margin=0.0)
    logits[:, 1] += 3  # all confidently wrong
    scaling = fit_scaling(logits, labels)
    assert scaling.temperature > TEMPERATURE_RANGE[1]
    assert f"{scaling.temperature:.4g}" in _error(lambda: check_scaling(scaling))


def test_a_plausible_scaling_passes_and_a_non_finite_one_does_not():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3000, 4, generator=gen, dtype=torch.float64) * 1.5
    labels = torch.multinomial(z.softmax(1), 1, generator=gen).flatten()
    scaling = fit_scaling(3 * z, labels)  # over-confident by 3
    check_scaling(scaling)
    assert scaling.temperature == pytest.approx(3.0, rel=0.1)
    assert "non-finite" in _error(lambda: check_scaling(Scaling("vector", [1.0, float("nan")], [0.0, 0.0])))


# --- imgcls calibrate on runs ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tiny_folder, tmp_path_factory):
    """tiny_folder has no val/: 10% of its 120 training images are carved off, 4 per class."""
    out = tmp_path_factory.mktemp("calib") / "tiny"
    assert main(["train", "--data", str(tiny_folder), "--model", "fastnet_cifar_small", "--epochs", "1",
                 "--img-size", "32", "--batch-size", "32", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def val_run(mini, tmp_path_factory):
    """A folder with its own val/ of exactly TEMPERATURE_MIN images per class, and a 1-epoch run on it."""
    root = tmp_path_factory.mktemp("withval")
    for split, source, start, count in (("train", mini.train, 0, 30), ("val", mini.train, 30, TEMPERATURE_MIN),
                                        ("test", mini.test, 0, 10)):
        for cls in range(3):
            folder = root / split / mini.classes[cls]
            folder.mkdir(parents=True)
            for n, i in enumerate(np.flatnonzero(source.labels.numpy() == cls)[start:start + count]):
                Image.fromarray(source.images[i].permute(1, 2, 0).numpy()).save(folder / f"{n:03d}.png")
    out = root.parent / f"{root.name}-run"
    assert main(["train", "--data", str(root), "--model", "fastnet_cifar_small", "--epochs", "1",
                 "--img-size", "32", "--batch-size", "32", "--out", str(out), "--quiet"]) == 0
    return out


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgcls: error: "), err
    return err[0]


def test_calibrate_refuses_a_carved_validation_split_of_four_per_class(tiny_run, capsys):
    assert main(["calibrate", str(tiny_run)]) == 2
    line = _one_line(capsys)
    assert "validation split has only 4 images of" in line and f"at least {TEMPERATURE_MIN}" in line
    assert not (tiny_run / rundir.CALIBRATION).exists()


def test_calibrate_refuses_a_runaway_temperature_and_stores_nothing(val_run, tmp_path, capsys):
    # Logits 1000 times larger: whatever temperature this model's val split calls for, now 1000 times it.
    ckpt = torch.load(val_run / rundir.BEST, weights_only=True)
    ckpt["model"]["head.weight"] *= 1000
    ckpt["model"]["head.bias"] *= 1000
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "loud.pt")
    assert main(["calibrate", str(val_run), "--checkpoint", str(tmp_path / "loud.pt")]) == 2
    line = _one_line(capsys)
    assert "temperature of" in line and f"outside the plausible {TEMPERATURE_RANGE[0]:g}-" in line
    value = float(line.split("temperature of ")[1].split(",")[0])
    assert value > TEMPERATURE_RANGE[1]
    assert not (val_run / rundir.CALIBRATION).exists()


def test_calibrate_refuses_vector_scaling_on_what_suffices_for_a_temperature(val_run, capsys):
    # TEMPERATURE_MIN per class is enough for one temperature, not for a scale and a bias per class.
    assert main(["calibrate", str(val_run), "--method", "vector"]) == 2
    line = _one_line(capsys)
    assert f"only {TEMPERATURE_MIN} images of" in line and f"vector scaling needs at least {VECTOR_MIN}" in line
    assert not (val_run / rundir.CALIBRATION).exists()


def test_calibrate_on_enough_data_stores_only_a_plausible_temperature(val_run, capsys):
    # Exactly TEMPERATURE_MIN per class: the count check passes; the fit is then stored or refused by its value.
    code = main(["calibrate", str(val_run), "--method", "temperature"])
    stored = val_run / rundir.CALIBRATION
    if code == 0:
        temperature = json.loads(stored.read_text())["scaling"]["temperature"]
        assert TEMPERATURE_RANGE[0] <= temperature <= TEMPERATURE_RANGE[1]
    else:
        assert "outside the plausible" in _one_line(capsys) and not stored.exists()
