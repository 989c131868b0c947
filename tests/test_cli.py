import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from imgcls import rundir
from imgcls.cli import main


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--data", str(tiny_folder), "--model", "fastnet_cifar_small", "--epochs", "1",
                 "--img-size", "32", "--batch-size", "32", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("imgcls: error: ") and "Traceback" not in err[0]
    return err[0]


def test_eval_writes_metrics_json(run, capsys):
    assert main(["eval", str(run)]) == 0
    result = json.loads((run / "eval-test.json").read_text())
    assert result["n"] == 30 and 0 <= result["accuracy"] <= 1
    assert "top5_accuracy" not in result  # only 3 classes
    assert [r["class"] for r in result["per_class"]] == ["airplane", "automobile", "bird"]
    assert sum(map(sum, result["confusion_matrix"])) == 30
    assert "accuracy" in capsys.readouterr().out


def test_eval_records_what_it_was_computed_from(run, capsys):
    """eval-<split>.json names the checkpoint file, its sha256 (what export checks before reusing the file),
    the precision it ran at and the calibration applied."""
    from imgcls.inference.run import load_run

    assert main(["eval", str(run)]) == 0
    result = json.loads((run / "eval-test.json").read_text())
    trained = load_run(run)
    assert result["checkpoint"] == str(trained.checkpoint) and result["scaling"] is None
    assert result["precision"] == trained.config.eval_precision
    assert result["weights"] == trained.digest


def test_predict_prints_topk_probabilities(run, tiny_folder, capsys):
    images = sorted((tiny_folder / "test" / "bird").iterdir())[:2]
    assert main(["predict", str(run), *map(str, images), "--topk", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["image"] for p in out] == list(map(str, images))
    for p in out:
        probs = [t["probability"] for t in p["top"]]
        assert len(probs) == 2 and probs[0] >= probs[1] and sum(probs) <= 1.0 + 1e-6


@pytest.mark.parametrize("argv, problem", [
    (["train", "--data", "/no/such/folder"], "does not exist"),
    (["train", "--model", "resnet99"], "unknown model 'resnet99'"),
    (["train", "--data", "cifar10", "--data-dir", "/no/such/dir"], "put data_batch_1"),
    (["eval", "/no/such/run"], "not an imgcls run"),
    (["train", "--sync-bn", "--device", "cpu"], "--sync-bn needs CUDA"),
    (["train", "--model", "resnet18_cifar", "--whiten"], "--whiten initialises a fastnet_* stem"),
    (["train", "--optimizer", "lion"], "--optimizer must be one of adamw, sgd (got 'lion')"),
    (["train", "--ema", "1.5"], "--ema must be >= 0 and < 1 (got 1.5); it is a decay per step"),
])
def test_errors_are_one_line(argv, problem, capsys, monkeypatch):
    monkeypatch.setenv("IMGCLS_OFFLINE", "1")
    assert main(argv) == 2
    assert problem in _error_line(capsys)


def test_single_class_folder_is_refused(tmp_path, tiny_folder, capsys):
    shutil.copytree(tiny_folder / "train" / "bird", tmp_path / "one" / "bird")
    assert main(["train", "--data", str(tmp_path / "one")]) == 2
    assert "only one class folder (bird)" in _error_line(capsys)


def test_checkpoint_of_another_model_or_class_count_is_refused(run, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(run, other)
    config = (other / rundir.CONFIG).read_text().replace("fastnet_cifar_small", "fastnet_cifar")
    (other / rundir.CONFIG).write_text(config)
    assert main(["eval", str(other)]) == 2
    assert "holds fastnet_cifar_small with 3 classes" in _error_line(capsys)


def test_truncated_checkpoint_is_a_clear_error(run, tmp_path, capsys):
    data = (run / rundir.BEST).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    assert main(["eval", str(run), "--checkpoint", str(cut)]) == 2
    assert "damaged or truncated" in _error_line(capsys)


def test_resume_refuses_new_training_flags(run, capsys):
    assert main(["train", "--resume", str(run), "--lr", "0.1"]) == 2
    assert "drop --lr" in _error_line(capsys)


def _imgcls(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "imgcls", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_no_traceback_from_the_real_command(tmp_path):
    proc = _imgcls("train", "--data", str(tmp_path / "missing"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert err.strip().count("\n") == 0 and "Traceback" not in err and "does not exist" in err


def test_ctrl_c_saves_a_resumable_checkpoint(tiny_folder, tmp_path):
    out = tmp_path / "interrupted"
    proc = _imgcls("train", "--data", str(tiny_folder), "--model", "fastnet_cifar_small", "--img-size", "32",
                   "--batch-size", "8", "--epochs", "20", "--out", str(out))
    first, line = proc.stdout.readline(), proc.stdout.readline()  # what train is about to do; then the run header,
    assert first.startswith("train: fastnet_cifar_small on "), first  # printed once Ctrl-C is handled
    assert line.startswith("run "), line + proc.stderr.read()
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"imgcls train --resume {out}" in err
    assert (out / rundir.LAST).is_file() and not (out / rundir.SUMMARY).exists()
    done = _imgcls("train", "--resume", str(out), "--quiet", env={**os.environ, "COLUMNS": "200"})
    stdout, err = done.communicate(timeout=300)
    assert done.returncode == 0, err
    assert len(rundir.read_metrics(out)) == 20 and (out / rundir.SUMMARY).is_file()


def test_augment_preview_writes_a_grid(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["augment-preview", "--aug", "standard", "--cutmix", "--n", "4", "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG" and img.width > 300 and img.height > 300
    assert str(out) in capsys.readouterr().out


def test_augment_preview_takes_the_recipe_flags_of_train_and_no_others(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "recipe.png"
    assert main(["augment-preview", "--aug", "basic", "--crop-padding", "2", "--crop-fill", "reflect",
                 "--random-erasing", "0.5", "--mixup", "--mix-prob", "0.5", "--label-smoothing", "0.1",
                 "--seed", "3", "--n", "2", "--out", str(out)]) == 0
    with Image.open(out) as img:
        assert img.format == "PNG"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse: not an option of augment-preview
        main(["augment-preview", "--epochs", "3", "--out", str(tmp_path / "x.png")])
    assert e.value.code == 2 and "unrecognized arguments: --epochs" in capsys.readouterr().err
    assert main(["augment-preview", "--aug", "standard", "--crop-padding", "2", "--out", str(tmp_path / "y.png")]) == 2
    assert "--crop-padding" in _error_line(capsys)  # validated as train validates it
