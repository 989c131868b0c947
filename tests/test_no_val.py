"""--val-fraction 0: train on every training image, with no validation split (airbench94's recipe).

best.pt is the final epoch, metrics carry no val numbers, and everything that needs a validation
split (early stopping, the plateau schedule, --monitor, calibrate, --reject auto) refuses in one line.
"""

import json
import math
import re
import shutil

import pytest
import torch

from imgcls import rundir
from imgcls.cli import main
from imgcls.config import build_config
from imgcls.data import load_dataset
from imgcls.errors import UserError
from imgcls.training.train import Interrupted, fit
from tests.conftest import tiny_config

from .conftest import run_metrics

MINI_TRAIN = 5000  # cifar10-mini's training images: 4500 train + 500 val with the default --val-fraction 0.1
# 16 px and batch 500 (10 steps an epoch) keep two epochs over all 5,000 images short on a CPU.
MINI_FLAGS = ["--data", "cifar10-mini", "--model", "fastnet_cifar_small", "--epochs", "2", "--img-size", "16",
              "--batch-size", "500", "--precision", "fp32", "--val-fraction", "0", "--quiet"]


def _error_line(capsys) -> str:
    """The one line a refused command prints: a UserError's (exit 2), not an unforeseen exception's."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("imgcls: error: ") and "Traceback" not in err[0] and "--debug" not in err[0]
    return err[0]


def _no_nan(obj) -> None:
    """No NaN or infinity anywhere in a JSON-like value: missing figures are null, never a fake number."""
    if isinstance(obj, dict):
        for v in obj.values():
            _no_nan(v)
    elif isinstance(obj, list):
        for v in obj:
            _no_nan(v)
    elif isinstance(obj, float):
        assert math.isfinite(obj), obj


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("noval") / "run"
    assert main(["train", *MINI_FLAGS, "--out", str(out)]) == 0
    return out


def test_every_training_image_trains_and_there_is_no_val_split():
    with_val, without = load_dataset("cifar10-mini"), load_dataset("cifar10-mini", val_fraction=0)
    assert without.val is None and len(without.train) == len(with_val.train) + len(with_val.val) == MINI_TRAIN
    assert without.fingerprint["sizes"] == {"train": MINI_TRAIN, "test": 1000}
    with pytest.raises(UserError, match="no 'val' split .--val-fraction 0"):
        without.split("val")


def test_run_trains_on_all_images_and_logs_no_val_numbers(run):
    assert rundir.read_json(run / rundir.DATASET)["fingerprint"]["sizes"] == {"train": MINI_TRAIN, "test": 1000}
    metrics = rundir.read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert not [k for k in m if k.startswith("val_")], m  # absent, not a made-up number
        assert round(m["images_per_s"] * m["epoch_time"]) == MINI_TRAIN  # every image, every epoch
        _no_nan(m)


def test_best_is_the_final_epoch_and_the_summary_says_why(run):
    summary = rundir.read_json(run / rundir.SUMMARY)
    _no_nan(summary)
    assert summary["best_epoch"] == summary["epochs_run"] == 2
    assert "final epoch" in summary["selection"] and "no validation split" in summary["selection"]
    assert summary["val_split"] is False and summary["monitor"] is None
    assert summary["best_val_acc"] is None and summary["final_val_acc"] is None and summary["best_score"] is None
    assert summary["test_acc"] == summary["test_acc_final"] and 0 < summary["test_acc"] <= 1
    best, last = (torch.load(run / name, map_location="cpu", weights_only=False) for name in (rundir.BEST,
                                                                                             rundir.LAST))
    assert best["epoch"] == last["epoch"] == 2 and best["val_acc"] is None
    assert best["model"].keys() == last["model"].keys()
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])


def test_eval_on_test_works_and_val_is_refused(run, capsys):
    capsys.readouterr()
    assert main(["eval", str(run)]) == 0
    result = json.loads((run / "eval-test.json").read_text())
    assert result["n"] == 1000
    assert result["accuracy"] == pytest.approx(rundir.read_json(run / rundir.SUMMARY)["test_acc"], abs=1e-6)
    capsys.readouterr()
    assert main(["eval", str(run), "--split", "val"]) == 2
    assert "no 'val' split" in _error_line(capsys)


def test_calibrate_refuses_in_one_line(run, capsys):
    capsys.readouterr()
    assert main(["calibrate", str(run)]) == 2
    line = _error_line(capsys)
    assert "needs a validation split" in line and "--val-fraction 0.1" in line
    assert not (run / rundir.CALIBRATION).exists()


def test_reject_auto_threshold_is_refused_not_invented(run):
    from imgcls.inference.reject import resolve_threshold
    from imgcls.inference.run import load_run

    trained = load_run(run)
    assert not trained.has_split("val") and trained.has_split("test")
    with pytest.raises(UserError, match="needs a validation split"):
        trained.require_split("val", "--reject auto")
    assert trained.risk_coverage is None  # calibrate never stored a curve
    with pytest.raises(UserError, match="--val-fraction 0"):
        resolve_threshold("auto", trained.risk_coverage)
    assert resolve_threshold("0.8", None) == 0.8  # an explicit threshold still works
    assert resolve_threshold("off", None) is None


def test_report_says_no_validation_split_and_shows_no_nan(run):
    assert main(["report", str(run), "--tta", "none"]) == 0
    analysis = rundir.read_json(run / rundir.REPORT_DIR / rundir.ANALYSIS_JSON)
    _no_nan(analysis)
    assert analysis["split"] == "test"
    assert analysis["calibration"]["temperature"] == 1.0 and "no validation split" in analysis["calibration"]["where"]
    page = (run / rundir.REPORT_DIR / rundir.REPORT_HTML).read_text()
    text = " ".join(part.split('"', 1)[-1] for part in page.split("base64,"))  # without the images' data
    assert "no validation split" in text and "val-selected" not in text
    assert not re.search(r"\bnan\b", text, re.IGNORECASE)


def test_comparison_table_and_model_card_say_final_epoch(run):
    from imgcls.export import export_spec
    from imgcls.export.model_card import model_card
    from imgcls.inference.run import load_run
    from imgcls.reporting.figures import comparison_charts
    from imgcls.reporting.tables import aggregate, to_markdown

    summary, metrics = rundir.read_json(run / rundir.SUMMARY), rundir.read_metrics(run)
    records = [{"variant": "airbench-like", "summary": summary, "metrics": metrics}]
    rows = aggregate(records)
    table = to_markdown(rows)
    assert "final epoch" in table and "val-selected" not in table and not re.search(r"\bnan\b", table, re.I)
    assert "no validation split" in table
    assert comparison_charts(records, run) == []  # nothing to draw: no run has validation accuracy

    trained = load_run(run)
    ev = json.loads((run / "eval-test.json").read_text()) if (run / "eval-test.json").is_file() else None
    if ev is None:
        from imgcls.evaluation.evaluate import evaluate_run

        ev, _ = evaluate_run(run, "test", device="cpu")
    card = model_card(trained, export_spec(trained), ev, None, {}, summary)
    assert "no validation split" in card and not re.search(r"\bnan\b", card, re.IGNORECASE)


def test_options_that_need_validation_refuse_before_a_folder_exists(tmp_path, capsys):
    for extra, named in ((["--patience", "2"], "--patience"), (["--schedule", "plateau"], "--schedule plateau"),
                         (["--monitor", "val_loss"], "--monitor val_loss")):
        out = tmp_path / "refused"
        capsys.readouterr()
        assert main(["train", *MINI_FLAGS, *extra, "--out", str(out)]) == 2
        line = _error_line(capsys)
        assert named in line and "needs a validation split" in line and "--val-fraction 0.1" in line
        assert not out.exists()


def test_folder_without_val_refuses_early_stop_before_a_folder_exists(tiny_folder, tmp_path):
    out = tmp_path / "refused"
    cfg = build_config(data=str(tiny_folder), model="fastnet_cifar_small", epochs=2, batch_size=32, img_size=32,
                       quiet=True, val_fraction=0, patience=1, out=str(out))  # a folder may have its own val/
    with pytest.raises(UserError, match="--patience needs a validation split"):
        fit(cfg)
    assert not out.exists()


def test_a_folder_keeps_its_own_val_split(tiny_folder, tmp_path):
    root = tmp_path / "with_val"
    for split, source in (("train", "train"), ("test", "test"), ("val", "test")):
        shutil.copytree(tiny_folder / source, root / split)
    dataset = load_dataset(str(root), img_size=32, val_fraction=0)
    assert len(dataset.val) == 30 and len(dataset.train) == 120  # val/ as it is; train not carved
    build_config(data=str(root), val_fraction=0, patience=2)  # allowed: the folder brings its validation split


def test_resumed_run_without_val_ends_exactly_like_an_uninterrupted_one(tiny_folder, tmp_path):
    def cfg(out):  # TINY_RUN gives the layout: two runs on a busy machine could time their way to two layouts
        return tiny_config(tiny_folder, out, val_fraction=0)

    straight = fit(cfg(tmp_path / "straight"))
    with pytest.raises(Interrupted):
        fit(cfg(tmp_path / "stopped"), stop_after_steps=5)  # inside epoch 2 (120 images: 4 steps an epoch)
    resumed = fit(resume=tmp_path / "stopped")
    assert run_metrics(resumed) == run_metrics(straight)
    assert not [k for m in rundir.read_metrics(resumed) for k in m if k.startswith("val_")]
    summary = rundir.read_json(resumed / rundir.SUMMARY)
    assert summary["best_epoch"] == 2 and summary["test_acc"] == rundir.read_json(straight / rundir.SUMMARY)["test_acc"]
    best = torch.load(resumed / rundir.BEST, map_location="cpu", weights_only=False)["model"]
    last = torch.load(resumed / rundir.LAST, map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(best[k], last[k]) for k in best)
