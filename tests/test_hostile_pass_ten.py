"""What the tenth hostile pass found, each kept as a test of its class (docs/reliability.md lists them)."""

import json
import os
import shutil

import pytest
import yaml

from imgcls import rundir
from imgcls.cli import main
from imgcls.config import build_config
from imgcls.errors import UserError
from imgcls.inference.files import collect_paths, path_error
from imgcls.inference.reject import resolve_threshold
from imgcls.inference.run import load_run
from imgcls.options import decimal, integer
from imgcls.yamlio import load_yaml_mapping
from tests.conftest import tiny_config


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


@pytest.fixture
def copy_(one_epoch_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run, out)
    return out


# ---------------------------------------------------------------- records of a run: every part of them is checked

def test_a_key_deleted_from_the_data_record_is_a_change_not_a_pass(copy_, tmp_path):
    """Deleting content_sha256 from dataset.json let eval use changed pixels as the run's own data."""
    info = json.loads((copy_ / rundir.DATASET).read_text())
    del info["fingerprint"]["content_sha256"]
    (copy_ / rundir.DATASET).write_text(json.dumps(info))
    with pytest.raises(UserError, match="does not record the data best.pt was trained on"):
        load_run(copy_)
    changes = rundir.data_changes({"sizes": {"train": 3}}, {"sizes": {"train": 3}, "content_sha256": "ab"})
    assert changes == ["image content is missing from the run's record"]


def test_resume_without_the_data_record_is_refused(tiny_folder, tmp_path):
    """With dataset.json deleted, --resume trained on other data and recorded it as the run's own."""
    from imgcls.training.stops import Interrupted
    from imgcls.training.train import fit

    with pytest.raises(Interrupted):
        fit(tiny_config(tiny_folder, tmp_path / "run", epochs=2), stop_after_steps=5)
    run = tmp_path / "run"
    (run / rundir.DATASET).unlink()
    with pytest.raises(UserError, match="holds last.pt but no dataset.json"):
        fit(resume=run)


def test_last_pt_copied_over_best_pt_is_refused(copy_, capsys):
    """eval and predict printed the final epoch's accuracy as the best checkpoint's."""
    shutil.copy(copy_ / rundir.LAST, copy_ / rundir.BEST)
    assert main(["eval", str(copy_), "--split", "val"]) == 2
    assert "is a last checkpoint, not the run's best" in _err(capsys)


def test_every_metrics_line_is_sealed_and_strictly_parsed(copy_):
    from imgcls.evaluation.analysis import training_record

    line = (copy_ / rundir.METRICS).read_text().splitlines()[0]
    (copy_ / rundir.METRICS).write_text(line.replace('{"epoch": 1,', '{"epoch": 1, "epoch": 1,', 1) + "\n")
    with pytest.raises(UserError, match="damaged line 1 .*twice"):
        training_record(copy_)
    record = json.loads(line)
    record["val_acc"] = 0.001
    (copy_ / rundir.METRICS).write_text(json.dumps(record) + "\n")
    with pytest.raises(UserError, match="line 1 was edited after imgcls wrote it"):
        training_record(copy_)


def test_file_options_are_recorded_absolute(tiny_folder, tmp_path, monkeypatch):
    """A resume from another folder failed on a relative --class-weights file no flag could fix."""
    from imgcls.training.train import fit

    (tmp_path / "w.json").write_text('{"airplane": 1, "automobile": 2, "bird": 1}')
    (tmp_path / "skip.txt").write_text("train/airplane/000.jpg\n")
    monkeypatch.chdir(tmp_path)
    run = fit(tiny_config(tiny_folder, tmp_path / "run", epochs=1, class_weights="w.json", exclude="skip.txt"))
    written = yaml.safe_load((run / rundir.CONFIG).read_text())
    assert written["class_weights"] == str(tmp_path / "w.json") and written["exclude"] == str(tmp_path / "skip.txt")


# ---------------------------------------------------------------- outputs never land in what imgcls reads

def test_runs_and_exports_inside_the_training_images_are_refused(tiny_folder, one_epoch_run, tmp_path, capsys):
    """train --out DATA/train/x made a class folder; report then wrote its PNGs among the cat images."""
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    with pytest.raises(UserError, match="lies inside"):
        from imgcls.training.train import fit

        fit(tiny_config(data, data / "train" / "airplane" / "run", epochs=1))
    assert sorted(p.name for p in (data / "train" / "airplane").iterdir() if p.is_dir()) == []
    nested = data / "train" / "airplane" / "old-run"  # trained before the guard, or moved there
    shutil.copytree(one_epoch_run, nested)
    cfg = yaml.safe_load((nested / rundir.CONFIG).read_text())
    (nested / rundir.CONFIG).write_text(yaml.safe_dump({**cfg, "data": str(data)}, sort_keys=False))
    from imgcls.evaluation.analysis import analyze_run

    with pytest.raises(UserError, match="lies inside"):
        analyze_run(nested, tta="none")
    assert not (nested / rundir.REPORT_DIR).exists()
    copy_ = tmp_path / "run"
    shutil.copytree(one_epoch_run, copy_)
    assert main(["export", str(copy_), "--format", "safetensors", "--out", str(tiny_folder / "val-export")]) == 2
    assert "lies inside" in _err(capsys) and not (tiny_folder / "val-export").exists()


def test_a_comparisons_files_and_a_reports_figures_are_never_an_output(copy_, tmp_path, capsys):
    comparison = tmp_path / "cmp"
    comparison.mkdir()
    (comparison / rundir.COMPARISON_RESULTS).write_text("{}")
    for name in ("results.csv", "accuracy_per_epoch.png", "results.md"):
        with pytest.raises(UserError, match=f"is {name} of the comparison"):
            rundir.refuse_run_file(comparison / name)
    (copy_ / rundir.REPORT_DIR).mkdir()
    with pytest.raises(UserError, match="report folder of the run"):
        rundir.refuse_run_file(copy_ / rundir.REPORT_DIR / "curves.png")
    assert main(["augment-preview", "--data", "cifar10-mini", "--out", str(copy_ / "report" / "curves.png")]) == 2
    assert "report folder of the run" in _err(capsys)


# ---------------------------------------------------------------- numbers as written, checked as used

def test_derived_rates_are_checked_in_float32():
    """--bn-bias-lr-scale 1e-40 with --decay-all made a decay of 5e38: inf, then 'lower --lr'."""
    with pytest.raises(UserError, match="weight-decay / --bn-bias-lr-scale is 5e\\+38"):
        build_config(optimizer="sgd", lr=0.001, bn_bias_lr_scale=1e-40, decay_all=True)
    with pytest.raises(UserError, match="--lr x --bn-bias-lr-scale"):
        build_config(lr=10.0, bn_bias_lr_scale=1e38)
    build_config(optimizer="sgd", lr=0.001, bn_bias_lr_scale=64, decay_all=True)  # airbench's


@pytest.mark.parametrize("text", ["1_000", "0.5_0", " 5", "５", "0x10", "1e3.5", "", "nan", "inf"])
def test_numbers_are_read_as_written_in_decimal(text, capsys):
    with pytest.raises(ValueError):
        decimal(text)
    with pytest.raises(ValueError):
        integer(text)
    with pytest.raises(SystemExit) as exit_:  # argparse's one-line usage error
        main(["predict", "cifar10-mini", "x.png", "--topk", text])
    assert exit_.value.code == 2
    with pytest.raises(UserError, match="neither auto, off nor a probability"):
        resolve_threshold(text, None)


def test_recipe_values_are_read_as_the_flags_read_them(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{lr: 0.5, lr: 0.001, epochs: 1}\n")  # both on one line
    with pytest.raises(UserError, match="lr"):
        load_yaml_mapping(recipe, "recipe")
    recipe.write_text("seed: 1e3\n")
    with pytest.raises(UserError, match="--seed takes an integer"):
        build_config(recipe)
    recipe.write_text("prefetch: off\n")  # YAML 1.1's boolean; the option's value here
    assert build_config(recipe).prefetch == "off"
    recipe.write_text("whiten: yes\n")  # a boolean option still takes yes/no, as its flag's value does
    assert build_config(recipe).whiten is True


def test_reject_options_that_would_be_ignored_are_refused():
    curve = {"threshold": [0.5], "coverage": [1.0], "accuracy": [1.0]}
    with pytest.raises(UserError, match="--reject 0.5 is a threshold already"):
        resolve_threshold("0.5", curve, target_accuracy=0.9)
    with pytest.raises(UserError, match="give one of them"):
        resolve_threshold("auto", curve, target_accuracy=0.5, coverage=0.5)


def test_links_in_a_folder_are_error_rows_that_say_what_they_are(tmp_path):
    (tmp_path / "a.jpg").symlink_to(tmp_path / "nowhere.jpg")
    (tmp_path / "b.jpg").symlink_to(tmp_path / "b.jpg")
    (tmp_path / "c.jpg").symlink_to("/dev/null")
    found = collect_paths([str(tmp_path)])
    assert [p.name for p in found] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [path_error(p).split(":")[0] for p in found] == ["FileNotFoundError", "SymlinkLoopError",
                                                             "NotARegularFile"]
    assert "symbolic link to a file that does not exist" in path_error(found[0])
    assert os.path.islink(found[1])
