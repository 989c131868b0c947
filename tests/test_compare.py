import json

import pytest

from imgcls.cli import main
from imgcls.errors import UserError
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


@pytest.mark.parametrize("name", ["cnn_vs_vit_cifar10", "cnn_vs_vit_cats_dogs", "quickstart"])
def test_shipped_comparisons_are_valid(name, monkeypatch):
    monkeypatch.setenv("IMGCLS_DATA", "/data")
    exp = read_experiment(f"experiments/{name}.yaml")
    assert len(exp.variants) >= 2 and exp.seeds
    if name == "cnn_vs_vit_cats_dogs":
        assert exp.train["data"] == "/data/cats-vs-dogs"


def test_shipped_augmentation_experiment_is_valid():
    exp = read_experiment("experiments/augmentation.yaml")
    assert list(exp.variants) == ["none", "basic", "mixup", "cutmix", "randaugment", "mixup+cutmix"]
    assert len(exp.seeds) >= 2 and exp.train["data"] == "cifar10"
