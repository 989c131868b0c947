"""imgcls export: ONNX and safetensors with a parity proof, metadata, load_model, the model card."""

import csv
import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

import imgcls  # noqa: E402
from imgcls import rundir  # noqa: E402
from imgcls.cli import main  # noqa: E402
from imgcls.config import build_config  # noqa: E402
from imgcls.data.preprocessing import INPUT_LAYOUT, RESIZE_RULE  # noqa: E402
from imgcls.export import export_run  # noqa: E402
from imgcls.inference.run import load_run  # noqa: E402
from imgcls.models import create_model  # noqa: E402
from imgcls.models.checkpoint import save_checkpoint  # noqa: E402
from imgcls.training.train import fit  # noqa: E402

FAMILIES = ["resnet18_cifar", "vit_cifar", "vit_ti16", "convnext_cifar", "fastnet_cifar", "fastnet_cifar_small",
            "efficientnet_lite0", "timm/resnet10t"]


@pytest.fixture(scope="module")
def base_run(tiny_folder, tmp_path_factory):
    """A real run, calibrated: six short epochs (one leaves it too uniform to calibrate), val_fraction 0.3
    (calibration needs 10+ val images per class)."""
    out = tmp_path_factory.mktemp("export") / "run"
    run = fit(build_config(data=str(tiny_folder), model="fastnet_cifar_small", epochs=6, lr=3e-3, batch_size=32,
                           img_size=32, val_fraction=0.3, out=str(out), quiet=True, precision="fp32"))
    assert main(["calibrate", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def exported(base_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "export"
    assert main(["export", str(base_run), "--out", str(out)]) == 0
    return out


def _run_of(base_run, tmp_path, model: str):
    """A run folder of `model` with fresh weights, on the base run's data: cheap, and a real run to load."""
    run = tmp_path / model.replace("/", "_")
    shutil.copytree(base_run, run, ignore=shutil.ignore_patterns("export", "*.pt", rundir.CALIBRATION, "eval-*"))
    cfg = yaml.safe_load((run / rundir.CONFIG).read_text())
    cfg.update(model=model, out=str(run))
    (run / rundir.CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.manual_seed(0)
    net = create_model(model, 3)
    summary = json.loads((run / rundir.SUMMARY).read_text())  # the run's story, which best.pt must tell too
    summary = {k: v for k, v in summary.items() if k != rundir.SEAL}
    rundir.write_sealed_json(run / rundir.SUMMARY, {**summary, "model": model})  # a summary names its model
    save_checkpoint({"model_name": model, "num_classes": 3, "model": net.state_dict(), "epoch": summary["best_epoch"],
                     "val_acc": summary["best_val_acc"]}, run / rundir.BEST)
    return run


@pytest.mark.parametrize("model", FAMILIES)
def test_every_family_exports_to_onnx_with_parity(model, base_run, tmp_path):
    run = _run_of(base_run, tmp_path, model)
    result = export_run(run, "onnx", tmp_path / "out", timing=(2, 1))  # few timed calls: a fast test
    parity = result["parity"]["onnx"]
    assert parity["passed"] and parity["images"] == 36
    assert parity["top1_agreement"] >= 0.999 and parity["max_abs_prob_diff"] <= 1e-3
    stored = json.loads((tmp_path / "out" / "parity.json").read_text())["results"]["onnx"]
    assert stored["top1_agreement"] == parity["top1_agreement"]
    for backend in ("pytorch", "onnxruntime"):
        assert all(stored["latency_ms_per_image"][backend][b] > 0 for b in ("batch1", "batch64"))


def test_export_writes_no_pickle_and_a_uint8_nhwc_graph_with_dynamic_batch(exported, base_run):
    assert sorted(p.name for p in exported.iterdir()) == ["MODEL_CARD.md", "model.json", "model.onnx",
                                                          "model.safetensors", "parity.json"]
    graph = onnx.load(exported / "model.onnx").graph
    (inp,) = graph.input
    dims = inp.type.tensor_type.shape.dim
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert [o.name for o in graph.output] == ["logits", "probabilities"]


def test_onnx_metadata_carries_the_runs_preprocessing_and_calibration(exported, base_run):
    meta = {p.key: p.value for p in onnx.load(exported / "model.onnx").metadata_props}
    info = json.loads((base_run / rundir.DATASET).read_text())
    calibration = json.loads((base_run / rundir.CALIBRATION).read_text())
    trained = load_run(base_run)
    # flat keys, for readers without imgcls
    assert json.loads(meta["imgcls.classes"]) == info["classes"]
    assert int(meta["imgcls.img_size"]) == info["img_size"] and float(meta["imgcls.crop_pct"]) == info["crop_pct"]
    assert json.loads(meta["imgcls.mean"]) == list(info["mean"]) and json.loads(meta["imgcls.std"]) == list(info["std"])
    assert meta["imgcls.model"] == "fastnet_cifar_small"
    assert meta["imgcls.resize"] == RESIZE_RULE and meta["imgcls.input"] == INPUT_LAYOUT
    # the whole export document, the same one model.json holds
    document = json.loads(meta["imgcls.export"])
    spec_file = json.loads((exported / "model.json").read_text())
    assert document == {k: v for k, v in spec_file.items() if k != "weights_file_sha256"}  # + its tensors' digest
    assert document["format"] == "imgcls-export-2" and document["classes"] == info["classes"]
    assert document["scaling"]["temperature"] == calibration["scaling"]["temperature"]
    assert document["fingerprint"] == info["fingerprint"]
    assert document["risk_coverage"] == calibration["risk_coverage"]
    assert document["weights"] == trained.digest  # provenance: the checkpoint exported
    assert document["recipe"] == trained.recipe.as_dict()
    assert document["preprocessing"] == trained.preprocessing.as_dict()
    # what moved into the document is no longer duplicated as flat keys
    assert not {"imgcls.temperature", "imgcls.scaling", "imgcls.fingerprint", "imgcls.risk_coverage",
                "imgcls.aug"} & set(meta)


def test_onnx_probabilities_include_the_temperature(exported, base_run):
    """The graph's probabilities are softmax(logits / T), not the raw softmax."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(exported / "model.onnx"))
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    logits, probs = session.run(None, {"images": x})
    t = json.loads((base_run / rundir.CALIBRATION).read_text())["scaling"]["temperature"]
    assert np.allclose(probs, torch.from_numpy(logits / t).softmax(1).numpy(), atol=1e-6)
    assert not np.allclose(probs, torch.from_numpy(logits).softmax(1).numpy(), atol=1e-4)


def test_onnx_file_alone_predicts_the_same_rows_as_the_run(exported, base_run, tiny_folder, tmp_path):
    images = tiny_folder / "test"
    assert main(["predict", str(base_run), str(images), "--out", str(tmp_path / "run.csv"), "--quiet"]) == 0
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(exported / "model.onnx", alone / "model.onnx")
    moved = tmp_path / "moved-run"
    shutil.move(base_run, moved)  # the run folder is gone while the ONNX file predicts
    try:
        assert main(["predict", str(alone / "model.onnx"), str(images), "--out", str(tmp_path / "onnx.csv"),
                     "--quiet"]) == 0
    finally:
        shutil.move(moved, base_run)
    run_rows = list(csv.DictReader(open(tmp_path / "run.csv")))
    onnx_rows = list(csv.DictReader(open(tmp_path / "onnx.csv")))
    assert len(run_rows) == 30
    assert [(r["path"], r["label"]) for r in run_rows] == [(r["path"], r["label"]) for r in onnx_rows]
    diffs = [abs(float(a["top1_prob"]) - float(b["top1_prob"])) for a, b in zip(run_rows, onnx_rows, strict=True)]
    assert max(diffs) < 1e-4


def test_load_model_rebuilds_the_run_without_its_folder(exported, base_run, tiny_folder):
    model, prep = imgcls.load_model(exported)
    image = sorted((tiny_folder / "test" / "bird").iterdir())[0]
    logits = model(prep(image)[None])
    trained = load_run(base_run)
    with torch.inference_mode():
        expected = trained.model.float()(prep(image)[None])
    assert torch.allclose(logits, expected, atol=1e-5)
    assert model.imgcls["classes"] == trained.classes and prep.img_size == 32
    assert trained.scaling is not None and model.imgcls["scaling"] == trained.scaling
    assert model.imgcls["risk_coverage"] == trained.risk_coverage and model.imgcls["recipe"] == trained.recipe


def test_the_safetensors_folder_predicts_like_the_run(exported, base_run, tiny_folder, capsys):
    images = [str(p) for p in sorted((tiny_folder / "test" / "automobile").iterdir())[:3]]
    assert main(["predict", str(base_run), *images, "--json"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["predict", str(exported), *images, "--json"]) == 0
    from_export = json.loads(capsys.readouterr().out)
    for a, b in zip(from_run, from_export, strict=True):
        assert a["label"] == b["label"] and a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)


def test_an_engine_opens_each_source_with_its_batch(exported, base_run):
    from imgcls.inference.exported import EXPORT_BATCH, open_engine

    config = yaml.safe_load((base_run / rundir.CONFIG).read_text())
    assert open_engine(base_run).batch_size == config["eval_batch_size"]  # the run's measured batch
    assert EXPORT_BATCH == 64
    for source in (exported, exported / "model.onnx", exported / "model.safetensors"):
        engine = open_engine(source)
        assert engine.batch_size == EXPORT_BATCH and engine.classes == load_run(base_run).classes
        assert open_engine(source, batch_size=5).batch_size == 5
        assert engine.identity["weights"] == load_run(base_run).digest[:16]


def test_cam_explains_a_safetensors_export_and_refuses_an_onnx_file(exported, base_run, tiny_folder, tmp_path,
                                                                   capsys):
    image = str(sorted((tiny_folder / "test" / "bird").iterdir())[0])
    assert main(["cam", str(exported), image, "--out", str(tmp_path / "cams")]) == 0
    assert [p.name for p in (tmp_path / "cams").iterdir()] == [f"{image.rsplit('/', 1)[-1].rsplit('.', 1)[0]}-cam.png"]
    capsys.readouterr()
    assert main(["cam", str(exported / "model.onnx"), image, "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Grad-CAM needs the model's gradients" in err[0]


def _card_value(card: str, label: str) -> str:
    match = re.search(rf"{re.escape(label)}:? ([0-9.]+%?)", card)
    assert match, label
    return match.group(1)


def test_model_card_numbers_are_the_runs(exported, base_run):
    card = (exported / "MODEL_CARD.md").read_text()
    from imgcls.evaluation.evaluate import evaluation

    ev = evaluation(base_run, "test", device="cpu")  # what the card must show (export writes no eval file)
    calibration = json.loads((base_run / rundir.CALIBRATION).read_text())
    assert _card_value(card, "- accuracy") == f"{100 * ev['accuracy']:.2f}%"
    assert _card_value(card, "- macro F1") == f"{ev['macro_f1']:.4f}"
    for row in ev["per_class"]:
        assert f"| {row['class']} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | " \
               f"{row['support']} |" in card
    assert f"temperature {calibration['scaling']['temperature']:.4f}" in card
    test_ece = calibration["splits"]["test"]
    assert f"| test | ece | {test_ece['before']['ece']:.4f} | {test_ece['after']['ece']:.4f} |" in card
    for size, count in json.loads((base_run / rundir.DATASET).read_text())["fingerprint"]["sizes"].items():
        assert f"{size} {count}" in card
    parity = json.loads((exported / "parity.json").read_text())["results"]["onnx"]
    assert f"| onnxruntime | {parity['images']} | {100 * parity['top1_agreement']:.2f}% |" in card
    mean_recall = sum(r["recall"] for r in ev["per_class"]) / len(ev["per_class"])
    assert f"under the mean recall {mean_recall:.4f}" in card


def test_a_disagreeing_export_fails_in_one_line_and_leaves_nothing(base_run, tmp_path, monkeypatch, capsys):
    import imgcls.export as export

    real = export.onnx_engine

    def perturbed(path, *args, **kwargs):
        engine = real(path, *args, **kwargs)
        backend = engine.backend

        class Rolled:  # the ONNX file's scores, moved onto the wrong classes
            session = backend.session

            def __call__(self, images):
                return backend(images).roll(1, dims=1)

        engine.backend = Rolled()
        return engine

    monkeypatch.setattr(export, "onnx_engine", perturbed)
    assert main(["export", str(base_run), "--format", "onnx", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disagrees with the run" in err[0] and "agreement" in err[0]
    assert "nothing was written" in err[0]
    # the export was staged beside --out and is gone: no --out, no staging folder
    assert not (tmp_path / "bad").exists() and list(tmp_path.iterdir()) == []


def test_a_model_that_cannot_export_says_so_in_one_line(base_run, tmp_path, monkeypatch, capsys):
    def fails(*args, **kwargs):
        raise torch.onnx.errors.UnsupportedOperatorError("aten::weird_op", 18, 18)

    monkeypatch.setattr(torch.onnx, "export", fails)
    assert main(["export", str(base_run), "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fastnet_cifar_small cannot be exported to ONNX" in err[0]
    assert "--format safetensors" in err[0]


def test_export_refuses_a_non_empty_folder(exported, base_run, capsys):
    assert main(["export", str(base_run), "--out", str(exported)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err


def test_onnx_export_without_the_extra_is_one_line(monkeypatch):
    import builtins

    from imgcls.errors import UserError
    from imgcls.export import check_opset

    real_import = builtins.__import__

    def no_onnxscript(name, *args, **kwargs):
        if name == "onnxscript":
            raise ImportError(name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxscript)
    with pytest.raises(UserError, match=r"onnxscript is missing\): pip install 'imgcls\[export\]'"):
        check_opset(18)
