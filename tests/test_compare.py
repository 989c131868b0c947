import io
import json
import zipfile

import numpy as np
import pytest

from imgcls import rundir
from imgcls.cli import main
from imgcls.config import build_config
from imgcls.errors import UserError
from imgcls.reporting.tables import TEXT_WIDTH, aggregate, to_markdown, to_text
from imgcls.training.compare import read_experiment


def test_flag_form_aggregates_seeds_and_skips_finished_runs(tiny_folder, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(tiny_folder), "--models", "fastnet_cifar_small,vit_cifar", "--epochs", "1",
            "--seeds", "0,1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["runs"]) == 4
    table = (out / "results.md").read_text()
    assert table.count("| fastnet_cifar_small |") == 1 and table.count("| vit_cifar |") == 1
    assert "± " in table and (out / "results.csv").read_text().count("\n") == 3
    assert (out / "accuracy_per_epoch.png").stat().st_size > 1000 and (out / "accuracy_vs_time.png").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/summary.json")}
    capsys.readouterr()
    assert main(argv) == 0  # second time: nothing is retrained
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed-*/summary.json")} == stamps
    assert "(replaced the existing results.json, results.csv, results.md" in capsys.readouterr().out  # said


def test_a_finished_runs_edited_summary_or_forged_predictions_never_reach_the_table(tiny_folder, tmp_path, capsys):
    """test_acc 0.9876 in a finished run's summary.json became 98.76 in results.md (the predictions said
    33.33%); a test_predictions.npz whose header promised 10^6 x 10^6 floats was a 3.6 TiB MemoryError."""
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(tiny_folder), "--models", "fastnet_cifar_small", "--epochs", "1",
            "--out", str(out), "--quiet"]
    assert main(argv) == 0
    run = next(out.glob("*/seed-0"))
    npz = run / "test_predictions.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)})
    with zipfile.ZipFile(npz, "w") as archive:
        archive.writestr("labels.npy", header.getvalue() + bytes(16))
        archive.writestr("probs.npy", header.getvalue() + bytes(16))
    capsys.readouterr()
    assert main(argv) == 0  # computed again, with a warning naming the file
    assert f"{npz} is not usable ({npz} is damaged (labels.npy promises" in capsys.readouterr().err
    assert np.load(npz)["probs"].shape == (30, 3)  # the test predictions of best.pt, written again
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "test_acc": 0.9876}))
    assert main(argv) == 2  # the seal finds the edit: params 12, inference 999999 img/s would reach the table too
    assert "summary.json was edited after imgcls wrote it" in capsys.readouterr().err
    rundir.write_sealed_json(run / "summary.json", {**summary, "test_acc": 0.9876})  # past the seal, the cross-check
    assert main(argv) == 2
    assert "says test accuracy 98.76%, but best.pt's test predictions give" in capsys.readouterr().err


def test_runs_on_other_data_are_refused(tiny_folder, tmp_path, capsys):
    out = tmp_path / "cmp"
    base = ["compare", "--models", "fastnet_cifar_small", "--epochs", "1", "--out", str(out), "--quiet"]
    assert main([*base, "--data", str(tiny_folder)]) == 0
    assert main([*base, "--data", "cifar10-mini", "--models", "fastnet_cifar_small,vit_cifar"]) == 2
    assert "different data or splits" in capsys.readouterr().err


def test_variants_cannot_change_the_shared_budget(tmp_path):
    exp = tmp_path / "e.yaml"
    exp.write_text("data: cifar10-mini\nvariants:\n  a: {model: vit_cifar, epochs: 3}\n")
    with pytest.raises(UserError, match="sets epochs"):
        read_experiment(exp)


@pytest.mark.parametrize("name", ["cnn_vs_vit_cifar10", "cnn_vs_vit_cats_dogs", "quickstart", "transfer_cats_dogs"])
def test_shipped_comparisons_are_valid(name, monkeypatch):
    monkeypatch.setenv("IMGCLS_DATA", "/data")
    exp = read_experiment(f"experiments/{name}.yaml")
    assert len(exp.variants) >= 2 and exp.seeds
    if name.endswith("cats_dogs"):
        assert exp.train["data"] == "/data/cats-vs-dogs"
    for options in exp.variants.values():
        build_config(**{**exp.train, **options})  # every variant is a valid train configuration


def _summary(variant, **kw):
    base = {"model": "m", "params": 1e6, "gflops": 0.1, "test_acc": None, "test_acc_final": None,
            "test_split": None, "best_val_acc": 0.9, "final_val_acc": 0.8, "train_time_s": 10.0,
            "train_images_per_s": 100.0, "inference_images_per_s": 200.0}
    return {"variant": variant, "summary": {**base, **kw}}


def test_table_without_a_test_split_reports_final_validation_accuracy():
    rows = aggregate([_summary("scratch"), _summary("finetune", strategy="finetune", trainable_params=2e5,
                                                   final_val_acc=0.95)])
    table = to_markdown(rows)
    assert "val acc % (final epoch)" in table and "test acc" not in table and "ECE" not in table
    assert "| finetune | m | finetune | 0.2M |" in table and "| 95.00 |" in table and "+15.00" in table
    assert "± " not in table and "1 seed per variant" in table


def test_printed_comparison_puts_the_compared_figures_first_and_fits_100_columns():
    test = {"balanced_accuracy": 0.75, "macro_f1": 0.7}
    vs = {"vs": "a", "acc_diff": 0.03, "ci_low": 0.01, "ci_high": 0.05, "mcnemar_p": 0.002, "significant": True}
    one_seed = [{**_summary("fastnet_cifar_small+mixup", model="fastnet_cifar_small", test_acc=0.8,
                            test_acc_final=0.79, test_split="test", test_ece=0.05), "test": test, "vs_first": None},
                {**_summary("vit_cifar+randaugment+cutmix", model="vit_cifar", test_acc=0.83, test_acc_final=0.8,
                            test_split="test", test_ece=0.04), "test": test, "vs_first": vs}]
    text = to_text(aggregate(one_seed))
    lines = text.splitlines()
    assert max(map(len, lines)) <= TEXT_WIDTH
    assert lines[0].split()[:4] == ["variant", "test", "acc", "%"] and "Δ vs first [95% CI]" in lines[0]
    assert lines[2].split()[:6] == ["vit_cifar+randaugment+cutmix", "83.00", "+3.00", "[+1.00,", "+5.00]", "*"]
    assert "±" not in text and lines[-1].startswith("1 seed per variant")
    seeds = [{**r, "summary": {**r["summary"], "test_acc": acc}} for r in one_seed for acc in (0.8, 0.82)]
    text = to_text(aggregate(seeds))
    assert "81.00 ± 1.41" in text and text.splitlines()[-1].startswith("Mean ± standard deviation over 2 seeds")
    assert max(map(len, text.splitlines())) <= TEXT_WIDTH


def test_shipped_augmentation_experiment_is_valid():
    exp = read_experiment("experiments/augmentation.yaml")
    assert list(exp.variants) == ["none", "basic", "mixup", "cutmix", "randaugment", "mixup+cutmix"]
    assert len(exp.seeds) >= 2 and exp.train["data"] == "cifar10"
