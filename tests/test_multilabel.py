"""Multi-label data, training, metrics and prediction (issue 24, part 1)."""

import csv
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from imgcls.cli import main
from imgcls.config import build_config
from imgcls.data import load_dataset
from imgcls.data.manifest import read_manifest
from imgcls.data.mixing import soft_targets
from imgcls.errors import UserError
from imgcls.evaluation.multilabel import average_precision, best_f1_thresholds, mean_ap, multilabel_metrics
from imgcls.inference.files import row
from imgcls.training.imbalance import positive_weights

sklearn_metrics = pytest.importorskip("sklearn.metrics")
ROOT = Path(__file__).resolve().parents[1]


def _mosaics(out: Path, train: int, test: int) -> Path:
    spec = importlib.util.spec_from_file_location("make_mosaics", ROOT / "scripts" / "make_mosaics.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import sys

    argv, sys.argv = sys.argv, ["make_mosaics.py", str(out), "--train", str(train), "--test", str(test)]
    try:
        module.main()
    finally:
        sys.argv = argv
    return out / "manifest.csv"


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory) -> Path:
    return _mosaics(tmp_path_factory.mktemp("mosaics") / "set", train=1000, test=200)


@pytest.fixture(scope="module")
def multilabel_run(mosaics, tmp_path_factory) -> Path:
    from imgcls.training.train import fit

    cfg = build_config(data=str(mosaics), model="fastnet_cifar_small", img_size=32, epochs=8, lr=3e-3, batch_size=64,
                       precision="fp32", memory_format="channels_last", quiet=True,
                       out=str(tmp_path_factory.mktemp("ml") / "run"))
    return fit(cfg)


def _image(path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (120, 30, 200)).save(path)


# ---------------------------------------------------------------- manifests

def test_both_manifest_layouts_and_jsonl_read_the_same_labels(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _image(tmp_path / "img" / name)
    (tmp_path / "listed.csv").write_text("path,labels,split\nimg/a.png,cat;dog,train\nimg/b.png,dog,train\n"
                                         "img/c.png,,test\n")
    (tmp_path / "spaced.csv").write_text("path,labels\nimg/a.png,dog cat\nimg/b.png, dog \nimg/c.png,\n")
    (tmp_path / "columns.csv").write_text("path,cat,dog,split\nimg/a.png,1,1,train\nimg/b.png,0,1,train\n"
                                          "img/c.png,0,0,test\n")
    (tmp_path / "lines.jsonl").write_text('{"path": "img/a.png", "labels": ["cat", "dog"]}\n'
                                          '{"path": "img/b.png", "labels": "dog"}\n'
                                          '{"path": "img/c.png", "labels": []}\n')
    expected = [[1, 1], [0, 1], [0, 0]]
    for name in ("listed.csv", "spaced.csv", "columns.csv", "lines.jsonl"):
        m = read_manifest(tmp_path / name)
        assert m.classes == ["cat", "dog"] and m.targets.tolist() == expected, name
        assert m.multilabel
    assert read_manifest(tmp_path / "listed.csv").splits == ["train", "train", "test"]


@pytest.mark.parametrize("text, message", [
    ("path,labels\nimg/a.png,cat;dog\nimg/b.png,dog,extra\n", "row 3 has 3 field"),
    ("path,labels\nimg/a.png,cat;dog\nimg/a.png,dog\n", "row 3: img/a.png is the image of row 2 again"),
    ("path,labels\nimg/a.png,cat;dog\nimg/./a.png,dog\n", "row 3: img/./a.png is the image of row 2 again"),
    ("path,labels\nimg/a.png,cat\nimg/nope.png,dog\n", "row 3: img/nope.png does not exist"),
    ("path,labels\n/etc/passwd.png,cat;dog\n", "row 2: /etc/passwd.png is not a path inside"),
    ("path,labels\nimg/../img/a.png,cat;dog\n", "is not a path inside"),
    ("path,labels\nimg/a.txt,cat;dog\n", "is not an image file name"),
    ("path,cat,dog\nimg/a.png,1,-1\n", "row 2 column dog: '-1' is not 0 or 1"),
    ("path,cat,dog\nimg/a.png,1,\n", "row 2 column dog: '' is not 0 or 1"),
    ("path,labels,split\nimg/a.png,cat;dog,valid\n", "row 2: split valid is not train, val or test"),
    ("path,labels,split\nimg/a.png,cat;dog,test\n", "has no train rows"),
    ("path,labels\nimg/a.png,cat\n", "names 1 label"),
    ("path,labels\nimg/a.png,cat;cat;dog\n", "row 2 names a label twice"),
    ("name,labels\nimg/a.png,cat\n", "has no path column"),
    ("path,labels\n", "lists no images"),
    ("path,path\nimg/a.png,x\n", "names a column twice"),
])
def test_a_bad_manifest_row_is_one_line_naming_the_row(tmp_path, text, message):
    _image(tmp_path / "img" / "a.png")
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(UserError, match=message) as e:
        read_manifest(tmp_path / "m.csv")
    assert "\n" not in str(e.value)


def test_a_manifest_label_written_two_ways_is_refused_at_read(tmp_path):
    _image(tmp_path / "img" / "a.png")
    _image(tmp_path / "img" / "b.png")
    (tmp_path / "m.csv").write_text("path,labels\nimg/a.png,caf\u00e9;dog\nimg/b.png,cafe\u0301\n")
    with pytest.raises(UserError, match="are the same text in two Unicode spellings; write each label one way"):
        read_manifest(tmp_path / "m.csv")
    (tmp_path / "c.csv").write_text("path,caf\u00e9,cafe\u0301\nimg/a.png,1,0\nimg/b.png,0,1\n")
    with pytest.raises(UserError, match="name each class column one way"):
        read_manifest(tmp_path / "c.csv")


def test_a_manifest_path_that_leads_outside_by_a_link_or_repeats_an_image_is_refused(tmp_path):
    outside = tmp_path / "elsewhere" / "x.png"
    _image(outside)
    _image(tmp_path / "set" / "img" / "a.png")
    (tmp_path / "set" / "out").symlink_to(outside.parent)
    (tmp_path / "set" / "same").symlink_to(tmp_path / "set" / "img")
    (tmp_path / "set" / "m.csv").write_text("path,labels\nimg/a.png,cat\nout/x.png,dog\n")
    with pytest.raises(UserError, match="row 3: out/x.png leads outside the manifest's folder"):
        read_manifest(tmp_path / "set" / "m.csv")
    (tmp_path / "set" / "m.csv").write_text("path,labels\nimg/a.png,cat\nsame/a.png,dog\n")
    with pytest.raises(UserError, match="row 3: same/a.png is the image of row 2 again"):
        read_manifest(tmp_path / "set" / "m.csv")


def test_a_bad_jsonl_line_is_named(tmp_path):
    _image(tmp_path / "img" / "a.png")
    (tmp_path / "m.jsonl").write_text('{"path": "img/a.png", "labels": ["a", "b"]}\n[1]\n')
    with pytest.raises(UserError, match="line 2 is not a JSON object"):
        read_manifest(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").write_text('{"path": "img/a.png", "labels": ["a", "b"]}\n{"path": "img/a.png"}\n')
    with pytest.raises(UserError, match="line 2 has keys"):
        read_manifest(tmp_path / "m.jsonl")
    (tmp_path / "m.jsonl").write_text('{"path": "img/a.png", "labels": "cat", "labels": "dog;bird"}\n')
    with pytest.raises(UserError, match="line 1 is not a JSON object \\(the key 'labels' is given twice\\)"):
        read_manifest(tmp_path / "m.jsonl")


def test_a_manifest_of_one_label_each_is_multiclass_unless_told(tmp_path):
    for name in ("a.png", "b.png", "c.png", "d.png"):
        _image(tmp_path / name)
    (tmp_path / "m.csv").write_text("path,labels\na.png,cat\nb.png,dog\nc.png,cat\nd.png,dog\n")
    plain = load_dataset(str(tmp_path / "m.csv"), img_size=8, val_fraction=0.25)
    assert plain.task == "multiclass" and plain.train.labels.dim() == 1
    forced = load_dataset(str(tmp_path / "m.csv"), img_size=8, val_fraction=0.25, task="multilabel")
    assert forced.task == "multilabel" and forced.train.labels.shape[1] == 2
    with pytest.raises(UserError, match="needs a manifest"):
        load_dataset("cifar10-mini", task="multilabel")


# ---------------------------------------------------------------- metrics against scikit-learn

@pytest.mark.parametrize("ties", [False, True])
def test_average_precision_is_scikit_learns(ties):
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(400, 7, generator=g) < 0.3
    scores = torch.rand(400, 7, generator=g) * 0.6 + 0.4 * truth.double()
    if ties:
        scores = (scores * 8).round() / 8
    for k in range(7):
        expected = sklearn_metrics.average_precision_score(truth[:, k].numpy(), scores[:, k].numpy())
        assert average_precision(scores[:, k], truth[:, k]) == pytest.approx(expected, abs=1e-12)
    assert mean_ap(scores, truth.double()) == pytest.approx(
        sklearn_metrics.average_precision_score(truth.numpy(), scores.numpy(), average="macro"), abs=1e-12)
    assert average_precision(scores[:, 0], torch.zeros(400, dtype=torch.bool)) is None


def test_thresholded_metrics_are_scikit_learns_and_best_f1_is_best():
    g = torch.Generator().manual_seed(1)
    truth = torch.rand(300, 5, generator=g) < 0.4
    scores = torch.rand(300, 5, generator=g) * 0.7 + 0.3 * truth.double()
    thresholds = best_f1_thresholds(scores, truth.double())
    found = multilabel_metrics(scores, truth.double(), list("abcde"), thresholds)
    predicted = (scores >= thresholds).numpy()
    y = truth.numpy()
    assert found["micro_f1"] == pytest.approx(sklearn_metrics.f1_score(y, predicted, average="micro"))
    assert found["macro_f1"] == pytest.approx(sklearn_metrics.f1_score(y, predicted, average="macro"))
    assert found["hamming_loss"] == pytest.approx(sklearn_metrics.hamming_loss(y, predicted))
    assert found["subset_accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, predicted))
    for k in range(5):  # no threshold among the class's own scores does better
        best = max(sklearn_metrics.f1_score(y[:, k], (scores[:, k] >= t).numpy()) for t in scores[:, k].unique())
        assert found["per_class"][k]["f1"] == pytest.approx(best)


# ---------------------------------------------------------------- training

def test_multi_hot_targets_mix_and_smooth_as_binary_targets():
    a = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.uint8)
    b = torch.tensor([[0, 0, 1], [1, 1, 1]], dtype=torch.uint8)
    mixed = soft_targets(a, b, torch.tensor([0.25, 1.0]), 3, smoothing=0.1)
    assert torch.allclose(mixed[0], torch.tensor([0.25, 0.0, 1.0]) * 0.9 + 0.05)
    assert torch.allclose(mixed[1], torch.tensor([0.0, 1.0, 0.0]) * 0.9 + 0.05)


def test_pos_weight_auto_is_negatives_over_positives():
    targets = torch.tensor([[1, 0, 0], [1, 0, 1], [0, 0, 1], [1, 0, 0]])
    assert positive_weights(targets).tolist() == pytest.approx([1 / 3, 1.0, 1.0])


def test_bce_on_mosaics_reaches_a_map_well_above_chance(multilabel_run, mosaics):
    summary = json.loads((multilabel_run / "summary.json").read_text())
    test = [r for r in csv.DictReader(mosaics.open()) if r["split"] == "test"]
    prevalence = np.mean([len(r["labels"].split(";")) for r in test]) / 10  # the AP of random scores, about
    assert summary["task"] == "multilabel" and summary["monitor"] == "map"
    assert summary["test_map"] > prevalence + 0.12, (summary["test_map"], prevalence)
    assert len(summary["thresholds"]) == 10 and all(0 < t < 1 for t in summary["thresholds"])
    metrics = [json.loads(line) for line in (multilabel_run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["val_map"] > metrics[0]["val_map"]


def test_predict_applies_the_runs_thresholds(multilabel_run, mosaics, capsys, tmp_path):
    test = [r for r in csv.DictReader(mosaics.open()) if r["split"] == "test"][:20]
    paths = [str(mosaics.parent / r["path"]) for r in test]
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(multilabel_run), *paths, "--out", str(out), "--topk", "10", "--quiet"]) == 0
    thresholds = json.loads((multilabel_run / "summary.json").read_text())["thresholds"]
    classes = json.loads((multilabel_run / "dataset.json").read_text())["classes"]
    for line in out.read_text().splitlines():
        r = json.loads(line)
        probs = {t["class"]: t["probability"] for t in r["top"]}
        assert r["labels"] == sorted((c for c in classes if probs[c] >= thresholds[classes.index(c)]),
                                     key=lambda c: -probs[c])
        assert r["label"] == ";".join(r["labels"])
    assert main(["predict", str(multilabel_run), paths[0], "--reject", "0.5"]) == 2
    assert "decides each label at its own threshold" in capsys.readouterr().err


def test_eval_scores_a_multilabel_run_as_its_summary_did(multilabel_run, tmp_path, capsys):
    out = tmp_path / "ev.json"
    assert main(["eval", str(multilabel_run), "--out", str(out)]) == 0
    ev = json.loads(out.read_text())
    summary = json.loads((multilabel_run / "summary.json").read_text())
    assert ev["task"] == "multilabel" and ev["map"] == pytest.approx(summary["test_map"], abs=1e-6)
    assert [r["threshold"] for r in ev["per_class"]] == pytest.approx(summary["thresholds"])
    assert "mAP" in capsys.readouterr().out


def test_a_row_decides_each_class_at_its_threshold():
    probs = torch.tensor([0.9, 0.2, 0.55], dtype=torch.float64)
    found = row(Path("x.png"), ["a", "b", "c"], probs, None, 3, None, thresholds=torch.tensor([0.5, 0.1, 0.6]))
    assert found["labels"] == ["a", "b"] and found["label"] == "a;b"
    none = row(Path("x.png"), ["a", "b", "c"], probs, None, 3, None, thresholds=torch.tensor([0.95, 0.95, 0.95]))
    assert none["labels"] == [] and none["label"] == ""


def test_options_of_one_task_are_refused_for_the_other(mosaics, multilabel_run, tmp_path, capsys):
    from imgcls.training.train import fit

    for options, message in (({"class_weights": "auto"}, "--class-weights weighs"),
                             ({"sampler": "balanced"}, "--sampler weighs"),
                             ({"monitor": "val_acc"}, "--monitor val_acc is for one label")):
        with pytest.raises(UserError, match=message):
            fit(build_config(data=str(mosaics), model="fastnet_cifar_small", img_size=32, epochs=1, quiet=True,
                             out=str(tmp_path / "r"), **options))
    with pytest.raises(UserError, match="--pos-weight weighs"):
        fit(build_config(data="cifar10-mini", model="fastnet_cifar_small", epochs=1, quiet=True,
                         out=str(tmp_path / "r"), pos_weight="auto"))
    assert main(["calibrate", str(multilabel_run), "--method", "vector"]) == 2
    assert "use --method temperature (one per label) or platt" in capsys.readouterr().err
    assert not (multilabel_run / "calibration.json").exists()


def test_a_multilabel_export_carries_sigmoid_outputs_and_thresholds_with_parity(multilabel_run, mosaics, tmp_path):
    import onnx
    import onnxruntime

    from imgcls.inference.exported import open_engine
    from imgcls.inference.metadata import parse_spec

    out = tmp_path / "export"
    assert main(["export", str(multilabel_run), "--out", str(out)]) == 0
    parity = json.loads((out / "parity.json").read_text())["results"]
    assert all(r["passed"] and r["top1_agreement"] == 1.0 for r in parity.values())
    thresholds = json.loads((multilabel_run / "summary.json").read_text())["thresholds"]
    document = json.loads((out / "model.json").read_text())
    assert document["task"] == "multilabel" and document["thresholds"] == pytest.approx(thresholds)
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(props["imgcls.thresholds"]) == pytest.approx(thresholds)
    test = [r for r in csv.DictReader(mosaics.open()) if r["split"] == "test"][:16]
    from imgcls.inference.files import load_images

    engine = open_engine(str(out / "model.onnx"))
    images = load_images([mosaics.parent / r["path"] for r in test], engine.preprocessing)
    session = onnxruntime.InferenceSession(str(out / "model.onnx"))
    logits, probs = session.run(["logits", "probabilities"], {"images": images.numpy()})
    assert np.allclose(probs, 1 / (1 + np.exp(-logits)), atol=1e-6)  # per class, not a softmax
    assert not np.allclose(probs.sum(axis=1), 1.0)
    for source in (out / "model.onnx", out):  # both exported forms decide as the run does in fp32
        exported = open_engine(str(source))
        assert torch.equal(exported.thresholds, torch.tensor(thresholds, dtype=torch.float64))
    for bad, message in (({"thresholds": thresholds[:3]}, "is not a list of 10"),
                         ({"thresholds": [2.0] * 10}, "outside"), ({"task": "multiclass"}, "multiclass export"),
                         ({"task": "several"}, "task")):
        with pytest.raises(UserError, match=message):
            parse_spec({**document, **bad}, "model.json")


# ---------------------------------------------------------------- calibration, per label

def test_a_per_label_fit_finds_each_labels_temperature():
    from imgcls.evaluation.calibration import fit_multilabel_scaling, multilabel_calibration_metrics

    gen = torch.Generator().manual_seed(0)
    true_temperature = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    logits = torch.randn(20_000, 4, generator=gen, dtype=torch.float64) * 3
    targets = (torch.rand(20_000, 4, generator=gen, dtype=torch.float64) < (logits / true_temperature).sigmoid())
    scaling = fit_multilabel_scaling(logits, targets.double(), "temperature")
    assert [1 / s for s in scaling.scale] == pytest.approx(true_temperature.tolist(), rel=0.08)
    assert scaling.bias == [0.0] * 4 and scaling.temperature is None
    shifted = fit_multilabel_scaling(logits + 1.5, targets.double(), "platt")  # Platt also removes an offset
    assert [b / s for s, b in zip(shifted.scale, shifted.bias, strict=True)] == pytest.approx([-1.5] * 4, abs=0.2)
    before = multilabel_calibration_metrics(logits.sigmoid(), targets)
    after = multilabel_calibration_metrics(scaling.apply(logits).sigmoid(), targets)
    assert after["nll"] < before["nll"] and after["ece"] < before["ece"] / 2 and len(after["per_class_ece"]) == 4
    # the per-label ECE is scikit-learn-free but checkable by hand: a label scored 0.9 that holds 60% of the time
    probs, truth = torch.full((10, 1), 0.9, dtype=torch.float64), torch.tensor([[1.0]] * 6 + [[0.0]] * 4)
    assert multilabel_calibration_metrics(probs, truth)["ece"] == pytest.approx(0.3)


def test_a_per_label_fit_refuses_labels_it_cannot_fit():
    from imgcls.evaluation.calibration import check_multilabel_calibration_data

    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(100, 2, generator=gen)
    targets = torch.zeros(100, 2)
    targets[:30, 0], targets[:5, 1] = 1, 1
    with pytest.raises(UserError, match="5 images with 'b' and 95 without"):
        check_multilabel_calibration_data(logits, targets, ["a", "b"], "temperature")
    targets[:30, 1] = 1
    logits[:, 1] = targets[:, 1] * 10 - 5  # b's positives all score above its negatives
    with pytest.raises(UserError, match="separates every validation image with 'b'"):
        check_multilabel_calibration_data(logits, targets, ["a", "b"], "temperature")
    with pytest.raises(UserError, match="30 images with 'a' and 10 without"):  # Platt needs 20 of each
        check_multilabel_calibration_data(logits[:40], targets[:40], ["a", "b"], "platt")


def test_calibrating_a_multilabel_run_moves_probabilities_not_labels(multilabel_run, mosaics, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(multilabel_run, run)
    test = [r for r in csv.DictReader(mosaics.open()) if r["split"] == "test"][:40]
    paths = [str(mosaics.parent / r["path"]) for r in test]

    def predicted(name):
        out = tmp_path / f"{name}.jsonl"
        assert main(["predict", str(run), *paths, "--out", str(out), "--topk", "10", "--quiet"]) == 0
        return [json.loads(line) for line in out.read_text().splitlines()]

    before = predicted("before")
    assert main(["calibrate", str(run)]) == 0
    assert "a temperature per label" in capsys.readouterr().out
    report = json.loads((run / "calibration.json").read_text())
    assert report["task"] == "multilabel" and len(report["scaling"]["scale"]) == 10
    assert report["scaling"]["temperature"] is None and "risk_coverage" not in report
    val = report["splits"]["val"]
    assert val["after"]["nll"] <= val["before"]["nll"] + 1e-9  # fitted there: it cannot be worse
    assert len(val["after"]["per_class_ece"]) == 10 and "test" in report["splits"]
    after = predicted("after")  # the same labels, listed by their calibrated probabilities
    assert [sorted(r["labels"]) for r in after] == [sorted(r["labels"]) for r in before]
    assert any(a["top"] != b["top"] for a, b in zip(after, before, strict=True))
    ev = tmp_path / "ev.json"
    assert main(["eval", str(run), "--out", str(ev)]) == 0
    scored = json.loads(ev.read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert scored["map"] == pytest.approx(summary["test_map"], abs=1e-6)  # the ranking is each label's own
    assert scored["macro_f1"] == pytest.approx(summary["test_macro_f1"], abs=1e-6)  # the decisions did not move
    assert scored["scaling"]["method"] == "temperature"
    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    from imgcls.inference.exported import open_engine

    exported = open_engine(str(export / "model.onnx"))
    assert exported.scaling.scale == pytest.approx(report["scaling"]["scale"])
    out = tmp_path / "onnx.jsonl"
    assert main(["predict", str(export / "model.onnx"), *paths, "--out", str(out), "--topk", "10", "--quiet"]) == 0
    assert [json.loads(line)["labels"] for line in out.read_text().splitlines()] == [r["labels"] for r in after]
    # a calibration.json that is not a multi-label run's is refused in one line
    edited = {**report, "scaling": {"method": "temperature", "temperature": 1.5, "scale": [1 / 1.5],
                                    "bias": [0.0] * 10}}
    from imgcls import rundir

    rundir.write_sealed_json(run / "calibration.json", edited)
    assert main(["eval", str(run), "--out", str(ev)]) == 2
    assert "another method or number of classes" in capsys.readouterr().err


def test_eval_tta_on_a_multilabel_run_compares_map_and_calibration(multilabel_run, tmp_path, capsys):
    out = tmp_path / "ev.json"
    assert main(["eval", str(multilabel_run), "--tta", "flip", "--out", str(out)]) == 0
    tta = json.loads(out.read_text())["tta"]
    assert tta["mode"] == "flip" and set(tta["with"]) >= {"map", "macro_f1", "ece", "nll"}
    assert tta["with"]["map"] != tta["without"]["map"]
    assert "test-time augmentation (flip)" in capsys.readouterr().out


# ---------------------------------------------------------------- compare: mAP with a paired bootstrap

def test_the_bootstraps_map_is_scikit_learns_and_its_interval_finds_a_known_gap():
    from imgcls.evaluation.significance import compare_to_first, mean_average_precision

    rng = np.random.default_rng(0)
    truth = (rng.random((300, 6)) < 0.3).astype(np.int64)
    truth[:, 5] = 0  # a label without a positive is left out, as mean_ap leaves it
    coarse = np.round(rng.random((300, 6)) + truth * 0.4, 1).astype(np.float32)  # many ties
    expected = np.mean([sklearn_metrics.average_precision_score(truth[:, k], coarse[:, k]) for k in range(5)])
    assert mean_average_precision(coarse, truth) == pytest.approx(expected, abs=1e-9)
    assert mean_average_precision(coarse, truth) == pytest.approx(
        mean_ap(torch.from_numpy(coarse).double(), torch.from_numpy(truth).double()), abs=1e-9)
    weak = {s: (truth, (rng.random((300, 6)) + truth * 0.3).astype(np.float32)) for s in (0, 1)}
    strong = {s: (truth, (rng.random((300, 6)) + truth * 0.9).astype(np.float32)) for s in (0, 1)}
    twin = {s: (truth, (rng.random((300, 6)) + truth * 0.3).astype(np.float32)) for s in (0, 1)}
    found = compare_to_first({"weak": weak, "strong": strong, "twin": twin})
    gap = np.mean([mean_average_precision(strong[s][1], truth) - mean_average_precision(weak[s][1], truth)
                   for s in (0, 1)])
    assert found["strong"]["metric"] == "map" and found["strong"]["map_diff"] == pytest.approx(gap)
    assert 0 < found["strong"]["ci_low"] < gap < found["strong"]["ci_high"] and found["strong"]["significant"]
    assert found["twin"]["ci_low"] < 0 < found["twin"]["ci_high"] and not found["twin"]["significant"]
    assert found["strong"]["mcnemar_p"] is None


def test_compare_on_a_multilabel_set_gives_map_mean_std_and_its_interval(mosaics, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--data", str(mosaics), "--models", "fastnet_cifar_small,vit_cifar_tiny", "--epochs", "1",
            "--seeds", "0,1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "test mAP %" in printed and "Δ vs first [95% CI]" in printed
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == 4 and all(r["test"]["map"] == pytest.approx(r["summary"]["test_map"], abs=1e-3)
                                  for r in runs)
    vs = runs[2]["vs_first"]
    assert vs["metric"] == "map" and vs["seeds"] == [0, 1] and vs["ci_low"] <= vs["map_diff"] <= vs["ci_high"]
    table = (out / "results.md").read_text()
    assert "test mAP % (val-selected)" in table and "Δ mAP vs fastnet_cifar_small [95% CI]" in table
    assert " ± " in table and "McNemar" not in table.split("\n\n")[0]
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"test_map", "test_map_std", "map_diff", "map_diff_ci_low"} <= set(header) and "acc_diff" not in header
    with np.load(out / "fastnet_cifar_small" / "seed-0" / "test_predictions.npz") as stored:
        assert stored["labels"].shape == stored["probs"].shape == (200, 10)  # multi-hot, one sigmoid per class


# ---------------------------------------------------------------- report

def test_a_multilabel_report_has_ap_pr_curves_label_errors_calibration_and_cams_per_label(multilabel_run, tmp_path,
                                                                                            capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(multilabel_run, run)
    assert main(["report", str(run)]) == 0
    a = json.loads((run / "report" / "analysis.json").read_text())
    ev = tmp_path / "ev.json"
    assert main(["eval", str(run), "--out", str(ev)]) == 0
    scored = json.loads(ev.read_text())
    assert a["task"] == "multilabel" and a["map"] == pytest.approx(scored["map"], abs=1e-9)
    # the report fitted a temperature per label on val; the decisions stay those eval makes uncalibrated
    assert a["calibration"]["where"].startswith("a temperature per label")
    assert a["macro_f1"] == pytest.approx(scored["macro_f1"], abs=1e-9)
    assert a["calibration"]["after"]["nll"] != a["calibration"]["before"]["nll"]
    for label in a["per_class"]:  # the misses the pair tables come from agree with each label's recall
        errors = next(r for r in a["label_errors"]["per_class"] if r["class"] == label["class"])
        assert errors["missed"] == round(label["support"] * (1 - label["recall"]))
        curve = a["pr_curves"][label["class"]]
        assert curve["recall"][-1] == pytest.approx(1.0) and len(curve["recall"]) <= 101
    pairs = a["label_errors"]["confused"]
    assert pairs and all(p["true"] != p["predicted"] and p["count"] > 0 for p in pairs)
    assert [p["count"] for p in pairs] == sorted((p["count"] for p in pairs), reverse=True)
    items = a["cam"]["per_label"]
    arrays = np.load(run / "report" / "analysis.npz")
    assert len(items) == len(arrays["cam_images"]) == 4
    assert len(arrays["cams"]) == sum(len(i["labels"]) for i in items) >= 4
    assert max(len(i["labels"]) for i in items) >= 2  # several labels explained on one image
    assert a["tta"]["mode"] == "flip" and "map" in a["tta"]["with"]
    page = (run / "report" / "report.html").read_text()
    for heading in ("Precision-recall curves", "Labels confused and missed", "Calibration per label",
                    "Grad-CAM per predicted label", "Top losses", "(multi-label)"):
        assert heading in page
    assert page.count("<img") >= 5


# ---------------------------------------------------------------- audit and fingerprint of a manifest

def _noise_image(path: Path, seed: int) -> None:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def test_audit_of_a_manifest_counts_labels_and_finds_copies_with_other_labels(tmp_path):
    import shutil

    from imgcls.data.audit import audit

    for i in range(6):
        _noise_image(tmp_path / f"{i}.png", i)
    shutil.copy(tmp_path / "0.png", tmp_path / "copy.png")
    rows = [f"{i}.png,{'a;b' if i == 0 else 'a'},train" for i in range(6)] + ["copy.png,b,test"]
    (tmp_path / "m.csv").write_text("path,labels,split\n" + "\n".join(rows) + "\n")
    report = audit(str(tmp_path / "m.csv"), progress=False).report
    assert report["task"] == "multilabel" and report["counts"] == {"train": {"a": 6, "b": 1}, "test": {"a": 0, "b": 1}}
    pair = report["exact_duplicates"]["pairs"][0]
    assert pair["cross_split"] and not pair["same_label"] and {pair["a"]["class"], pair["b"]["class"]} == {"a;b", "b"}
    assert report["imbalance_ratio"] == 6.0 and report["suggested_command"].endswith("--pos-weight auto")
    assert any("different labels" in w for w in report["warnings"])


def test_a_manifests_fingerprint_changes_with_its_labels_and_its_pixels(tmp_path):
    for i in range(4):
        _noise_image(tmp_path / f"{i}.png", i)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,labels\n0.png,a;b\n1.png,a\n2.png,b\n3.png,\n")
    first = load_dataset(str(manifest), img_size=16, val_fraction=0.0).fingerprint
    assert load_dataset(str(manifest), img_size=16, val_fraction=0.0).fingerprint == first
    manifest.write_text("path,labels\n0.png,a\n1.png,a\n2.png,b\n3.png,\n")  # one label dropped
    relabelled = load_dataset(str(manifest), img_size=16, val_fraction=0.0).fingerprint
    assert relabelled["labels_sha256"] != first["labels_sha256"] and relabelled["task"] == "multilabel"
    _noise_image(tmp_path / "1.png", 99)  # another picture under the same name
    assert load_dataset(str(manifest), img_size=16, val_fraction=0.0).fingerprint["content_sha256"] != \
        relabelled["content_sha256"]
