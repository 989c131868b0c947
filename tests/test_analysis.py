"""Understanding a model: calibration, temperature scaling, test-time augmentation, Grad-CAM, the report."""

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import rundir
from imgcls.cli import main
from imgcls.config import build_config
from imgcls.data import normalize
from imgcls.data.presets import PixelRecipe, tta_views
from imgcls.evaluation.calibration import (
    brier_score,
    calibration_metrics,
    classwise_calibration_error,
    expected_calibration_error,
    fit_scaling,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)
from imgcls.evaluation.cam import explain, grad_cam
from imgcls.inference.run import load_run, run_engine
from imgcls.models.contract import token_grid
from imgcls.training.train import fit

# --- calibration metrics on hand-computed examples -----------------------------------------------

# confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 1.0 (right)
PROBS = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [1.0, 0.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 1, 1, 0])


def test_ece_and_mce_hand_computed():
    # 10 bins. Bin 9 holds 0.9, 0.9 and 1.0 (1.0 goes to the last bin): confidence 2.8/3, accuracy 2/3.
    # Bin 6 holds 0.6, right: |0.6 - 1| = 0.4. ECE = (|2.8 - 2| + 0.4) / 4 = 0.3; MCE = max(0.2667, 0.4).
    assert expected_calibration_error(PROBS, LABELS, bins=10) == pytest.approx(0.3)
    assert maximum_calibration_error(PROBS, LABELS, bins=10) == pytest.approx(0.4)
    bins = reliability_bins(PROBS, LABELS, bins=10)
    assert bins["count"] == [0, 0, 0, 0, 0, 0, 1, 0, 0, 3]
    assert bins["accuracy"][9] == pytest.approx(2 / 3) and bins["confidence"][9] == pytest.approx(2.8 / 3)
    assert math.isnan(bins["accuracy"][0])


def test_classwise_ece_nll_brier_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    # class 0: 0.7 (is 0) -> 0.3, 0.3 (not) -> 0.3: (0.3 + 0.3) / 2 = 0.3
    # class 1: 0.2 (not) -> 0.2, 0.6 (not) -> 0.6: 0.4;  class 2: both 0.1 in one bin, one hit: |0.2 - 1| / 2 = 0.4
    assert classwise_calibration_error(probs, labels, bins=10) == pytest.approx((0.3 + 0.4 + 0.4) / 3)
    assert negative_log_likelihood(PROBS, LABELS) == pytest.approx(-(math.log(0.9) + math.log(0.1) + math.log(0.6)) / 4)
    # (0.01 + 0.01) + (0.81 + 0.81) + (0.16 + 0.16) + 0, over 4 samples
    assert brier_score(PROBS, LABELS) == pytest.approx(1.96 / 4)


def _synthetic_logits(n=20000, k=5, seed=0):
    """Calibrated logits z (labels drawn from softmax(z)) and an over-confident copy 2z."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=gen, dtype=torch.float64) * 1.5
    labels = torch.multinomial(z.softmax(1), 1, generator=gen).flatten()
    return z, labels


def test_temperature_scaling_recovers_the_temperature_and_never_changes_a_prediction():
    z, labels = _synthetic_logits()
    scaling = fit_scaling(2 * z, labels, "temperature")
    assert scaling.temperature == pytest.approx(2.0, rel=0.05)
    scaled = scaling.apply(2 * z)
    assert torch.equal(scaled.argmax(1), (2 * z).argmax(1))
    before, after = calibration_metrics((2 * z).softmax(1), labels), calibration_metrics(scaled.softmax(1), labels)
    assert before["accuracy"] == after["accuracy"]
    assert after["ece"] < before["ece"] / 2 and after["nll"] < before["nll"]


def test_vector_scaling_recovers_per_class_scale_and_bias():
    z, _ = _synthetic_logits()
    scale, bias = torch.tensor([0.5, 1.0, 1.5, 2.0, 1.0], dtype=torch.float64), torch.tensor([0.3, -0.2, 0, 0.5, -0.6])
    labels = torch.multinomial((z * scale + bias).softmax(1), 1, generator=torch.Generator().manual_seed(1)).flatten()
    fitted = fit_scaling(z, labels, "vector")
    assert torch.allclose(torch.tensor(fitted.scale, dtype=torch.float64), scale, atol=0.15)
    centred = torch.tensor(fitted.bias) - torch.tensor(fitted.bias).mean()  # softmax ignores a common shift
    assert torch.allclose(centred.float(), (bias - bias.mean()).float(), atol=0.15)


# --- test-time augmentation -----------------------------------------------------------------------

def test_tta_views():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).reshape(2, 3, 8, 8).to(torch.uint8)
    basic = PixelRecipe("basic")
    flip = tta_views(images, "flip", basic, torch.Generator())
    assert len(flip) == 2 and torch.equal(flip[1], images.flip(-1))
    views = tta_views(images, "flip-crop", basic, torch.Generator())
    assert len(views) == 6 and all(v.shape == images.shape for v in views)
    assert torch.equal(views[1][..., 1:, 1:], images[..., :-1, :-1])  # shifted by 1 px (size/32, at least 1)
    assert len(tta_views(images, 3, basic, torch.Generator().manual_seed(0))) == 3


def test_tta_views_are_bounded():
    from imgcls.errors import UserError
    from imgcls.evaluation.evaluate import MAX_TTA_VIEWS, parse_tta_flag

    assert parse_tta_flag(str(MAX_TTA_VIEWS)) == MAX_TTA_VIEWS and parse_tta_flag("flip") == "flip"
    with pytest.raises(UserError, match=f"--tta 100000 asks for more than {MAX_TTA_VIEWS} views"):
        parse_tta_flag("100000")


# --- a deliberately over-confident model on cifar10-mini ------------------------------------------

@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory):
    """fastnet_cifar_small on cifar10-mini without augmentation or smoothing, long enough to overfit."""
    out = tmp_path_factory.mktemp("overfit") / "run"
    # the layout given: calibrate and eval, compared to 1e-6 below, must not time different kernels
    return fit(build_config(data="cifar10-mini", model="fastnet_cifar_small", epochs=8, aug="none", lr=3e-3,
                            warmup_epochs=0.5, label_smoothing=0.0, out=str(out), quiet=True,
                            memory_format="channels_last"))


def test_eval_with_tta_prints_before_and_after(overfit_run, capsys):
    assert main(["eval", str(overfit_run), "--tta", "flip"]) == 0
    out = capsys.readouterr().out
    assert "test-time augmentation (flip)" in out and "no TTA" in out and "ECE" in out
    result = json.loads((overfit_run / "eval-test.json").read_text())
    without, with_tta = result["tta"]["without"], result["tta"]["with"]
    assert without["accuracy"] == pytest.approx(result["accuracy"])
    assert with_tta["accuracy"] != without["accuracy"] or with_tta["nll"] != without["nll"]


def test_calibrate_fits_a_temperature_above_one_and_lowers_test_ece(overfit_run, capsys):
    assert main(["calibrate", str(overfit_run)]) == 0
    out = capsys.readouterr().out
    assert "before" in out and "after" in out and "held out" in out
    report = json.loads((overfit_run / rundir.CALIBRATION).read_text())
    assert report["scaling"]["temperature"] > 1.0  # over-confident: the fitted temperature softens it
    test = report["splits"]["test"]
    assert test["after"]["ece"] < test["before"]["ece"] and test["after"]["accuracy"] == test["before"]["accuracy"]
    # eval and predict now apply the temperature: same predictions, softer probabilities
    trained = load_run(overfit_run)
    assert trained.scaling is not None and trained.scaling.temperature == report["scaling"]["temperature"]
    assert main(["eval", str(overfit_run)]) == 0
    result = json.loads((overfit_run / "eval-test.json").read_text())
    assert result["calibration"]["ece"] == pytest.approx(test["after"]["ece"], abs=1e-6)


def test_report_is_one_html_page_that_a_real_browser_renders(overfit_run, tmp_path, capsys):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    assert main(["report", str(overfit_run)]) == 0
    page = overfit_run / rundir.REPORT_DIR / rundir.REPORT_HTML
    text = page.read_text()
    assert text.count("<img") >= 6 and "data:image/png;base64," in text and 'src="http' not in text
    for section in ("Training curves", "Classification report", "Confusion matrix", "Reliability",
                    "Test-time augmentation", "Grad-CAM", "Top losses", "Configuration"):
        assert section in text, section
    assert "<th></th>" not in text  # no header row of empty cells (the name-value table has none)
    assert re.search(r"<table><tr><td>parameters</td>", text)

    def render(html_file):
        shot = tmp_path / f"{html_file.stem}.png"
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr",
                 "--v=0", "--window-size=1150,1600"]
        dom = subprocess.run([chromium, *flags, "--dump-dom", html_file.as_uri()], capture_output=True, text=True,
                             timeout=120)
        subprocess.run([chromium, *flags, f"--screenshot={shot}", html_file.as_uri()], capture_output=True,
                       timeout=120, check=True)
        decoded = re.search(r'data-images-decoded="(\d+)/(\d+)"', dom.stdout)
        console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
        return decoded, console, shot

    decoded, console, shot = render(page)
    assert decoded is not None and decoded.group(1) == decoded.group(2) and int(decoded.group(2)) >= 6
    assert console == []
    assert Image.open(shot).size == (1150, 1600) and len(np.unique(np.asarray(Image.open(shot)))) > 50
    # The same check catches a broken page: an undecodable image and a script error.
    broken = tmp_path / "broken.html"
    broken.write_text(text.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1)
                      .replace("</body>", "<script>undefinedFunction()</script></body>"))
    decoded, console, _ = render(broken)
    assert decoded.group(1) != decoded.group(2) and console


def test_report_on_a_comparison_links_every_run(tiny_folder, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--data", str(tiny_folder), "--models", "fastnet_cifar_small,vit_cifar_tiny",
                 "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    assert main(["report", str(out)]) == 0
    text = (out / rundir.REPORT_HTML).read_text()
    for variant in ("fastnet_cifar_small", "vit_cifar_tiny"):
        link = f"{variant}/seed-0/report/report.html"
        assert f'href="{link}"' in text and (out / link).is_file()


def test_cam_command_writes_one_overlay_per_image(overfit_run, tmp_path, capsys):
    split = load_run(overfit_run).split("test")
    paths = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(split.images[i].permute(1, 2, 0).numpy()).save(path)
        paths.append(str(path))
    assert main(["cam", str(overfit_run), *paths, "--class", "cat", "--method", "gradcam++",
                 "--out", str(tmp_path / "cams")]) == 0
    assert sorted(p.name for p in (tmp_path / "cams").iterdir()) == ["img0-cam.png", "img1-cam.png", "img2-cam.png"]
    assert main(["cam", str(overfit_run), paths[0], "--class", "unicorn"]) == 2
    assert "unknown class 'unicorn'" in capsys.readouterr().err


# --- Grad-CAM looks where the label is decided --------------------------------------------------

def _quadrant_folder(root, size, n_train=400, n_test=100, seed=0):
    """Two classes, red or blue: the colour of a square placed somewhere in the top-right quadrant of
    grey noise. The top-right quadrant is not symmetric under transposition, so a swapped grid fails."""
    rng = np.random.default_rng(seed)
    side = size // 4 + 4
    for split, count in (("train", n_train), ("test", n_test)):
        for i in range(count):
            cls = i % 2
            img = rng.integers(60, 140, size=(size, size, 3), dtype=np.uint8)
            y, x = rng.integers(0, size // 2 - side + 1, size=2)
            img[y : y + side, size // 2 + x : size // 2 + x + side] = [[230, 30, 30], [30, 30, 230]][cls]
            folder = root / split / ("red", "blue")[cls]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i:04d}.png")
    return root


@pytest.mark.parametrize("model, size, epochs, lr", [("fastnet_cifar_small", 64, 4, 3e-3),
                                                     ("vit_cifar_tiny", 32, 8, 1e-3)])
def test_grad_cam_puts_most_mass_in_the_quadrant_that_decides_the_label(model, size, epochs, lr, tmp_path):
    data = _quadrant_folder(tmp_path / "quadrant", size)
    run = fit(build_config(data=str(data), model=model, img_size=size, epochs=epochs, batch_size=64, lr=lr,
                           aug="none", warmup_epochs=0.5, out=str(tmp_path / "run"), quiet=True))
    trained = load_run(run)
    test = trained.split("test")
    images, labels = next(test.batches(torch.arange(len(test)), len(test)))
    assert (token_grid(trained.model) is not None) == model.startswith("vit")  # where the maps come from
    x = normalize(images, trained.dataset["mean"], trained.dataset["std"])
    engine = run_engine(trained)  # what imgcls cam and the report explain through
    for method in ("gradcam", "gradcam++"):
        cams, classes, probs = grad_cam(trained.model, x, method=method)
        assert (classes == labels).float().mean() > 0.95  # the model solved the task
        mass = cams[:, : size // 2, size // 2 :].sum(dim=(1, 2)) / cams.sum(dim=(1, 2))
        assert mass.mean() > 0.55, (method, mass.mean())  # the quadrant is a quarter of the image
        through, same, _ = explain(engine, images.permute(0, 2, 3, 1), method=method)  # uint8 NHWC in
        assert torch.equal(same, classes) and torch.allclose(through, cams, atol=1e-4)
