"""Broken, hostile and diverged files in a run: each ends in one specific line, nothing runs, nothing
wrong is printed."""

import json
import pickle
import re
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from imgcls import rundir
from imgcls.cli import main
from imgcls.errors import UserError
from imgcls.inference import files as inference_files
from imgcls.inference.files import predict_rows
from imgcls.inference.run import load_run, run_engine
from imgcls.models import create_model
from imgcls.models.checkpoint import load_checkpoint, save_checkpoint

GENERIC = re.compile(r"imgcls: error: [A-Za-z]+(Error|Exception):")  # the CLI's fallback for unforeseen errors


class OpensAFile:
    """Unpickling this creates a file: the marker that proves whether a pickle's code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["train", "--data", str(tiny_folder), "--model", "fastnet_cifar_small", "--epochs", "1",
                 "--img-size", "32", "--batch-size", "32", "--out", str(out), "--quiet"]) == 0
    return out


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("imgcls: error: ") and not GENERIC.match(err[0]), err[0]
    return err[0]


def _checkpoint(**payload):
    return {"model_name": "fastnet_cifar_small", "num_classes": 3,
            "model": create_model("fastnet_cifar_small", 3).state_dict(), **payload}


# --- load_checkpoint on files that are not what they claim ----------------------------------------

def _truncated(path):
    save_checkpoint(_checkpoint(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _zip_of_garbage(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02garbage\xff" * 50)
        z.writestr("archive/version", b"3\n")


def _nonfinite(value):
    def write(path):
        ckpt = _checkpoint()
        ckpt["model"]["group1.0.weight"][0, 0, 0, 0] = value
        save_checkpoint(ckpt, path)

    return write


@pytest.mark.parametrize("write, problem", [
    (_truncated, "damaged or truncated"),
    (_zip_of_garbage, "damaged or truncated"),
    (lambda p: p.write_bytes(b""), "damaged or truncated"),
    (lambda p: p.write_text("epoch,loss\n1,0.5\n"), "damaged or truncated"),
    (lambda p: torch.save({"model": _checkpoint()["model"]}, p), "is not an imgcls checkpoint"),
    (lambda p: torch.save([1, 2, 3], p), "is not an imgcls checkpoint"),
    (lambda p: save_checkpoint({"model_name": "fastnet_cifar_small", "num_classes": 3}, p), "is incomplete"),
    (_nonfinite(float("nan")), "holds non-finite weights"),
    (_nonfinite(float("inf")), "holds non-finite weights"),
    (lambda p: save_checkpoint(_checkpoint(model_name="resnet18_cifar"), p), "holds resnet18_cifar with 3 classes"),
    (lambda p: save_checkpoint(_checkpoint(num_classes=5), p), "holds fastnet_cifar_small with 5 classes"),
], ids=["truncated", "zip-garbage", "empty", "text", "no-format-key", "not-a-dict", "no-weights", "nan", "inf",
        "other-model", "other-class-count"])
def test_broken_checkpoints_are_refused_in_one_line(tmp_path, write, problem):
    path = tmp_path / "best.pt"
    write(path)
    with pytest.raises(UserError) as info:
        load_checkpoint(path, "fastnet_cifar_small", 3)
    assert problem in str(info.value) and "\n" not in str(info.value)


def test_diverged_checkpoint_names_the_cause(tmp_path):
    path = tmp_path / "best.pt"
    _nonfinite(float("nan"))(path)
    with pytest.raises(UserError, match=r"non-finite weights .*group1\.0\.weight.*the run diverged"):
        load_checkpoint(path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("save", ["torch.save", "pickle"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, save):
    marker = tmp_path / "code-ran"
    path = tmp_path / "best.pt"
    payload = {"format": "imgcls-checkpoint-1", "model_name": "fastnet_cifar_small", "num_classes": 3,
               "model": {}, "extra": OpensAFile(marker)}
    if save == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(UserError) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value)
    if save == "torch.save":
        assert "could run code" in str(info.value)
    assert not marker.exists()
    # the control: an unrestricted load of the same file does run its code
    pickle.loads(path.read_bytes()) if save == "pickle" else torch.load(path, weights_only=False)
    assert marker.exists()


# --- the CLI on damaged runs: a specific line, never the generic "<ExceptionType>: ..." ---------------

def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("calibration.json", "eval-*.json"))
    return tmp_path / "run"


def _calibration(scaling):
    return lambda run: rundir.write_sealed_json(run / rundir.CALIBRATION, {"scaling": scaling})  # past the seal


def _dataset_without(key):
    def mutate(run):
        info = json.loads((run / rundir.DATASET).read_text())
        del info[key]
        (run / rundir.DATASET).write_text(json.dumps(info))

    return mutate


def _best(ckpt):
    return lambda run: save_checkpoint(ckpt, run / rundir.BEST)


def _tensors_that_do_not_fit(run):
    ckpt = _checkpoint(model=create_model("fastnet_cifar", 3).state_dict())  # wider layers, same name claimed
    save_checkpoint(ckpt, run / rundir.BEST)


def _image(tiny_folder):
    return str(next((tiny_folder / "test" / "bird").iterdir()))


CASES = [
    ("checkpoint-is-a-folder", None, ["eval", "{run}", "--checkpoint", "{tmp}"], "is a folder"),
    ("calibration-not-json", lambda r: (r / rundir.CALIBRATION).write_text('{"scaling": '), ["eval", "{run}"],
     "calibration.json"),
    ("calibration-without-scaling", lambda r: rundir.write_sealed_json(r / rundir.CALIBRATION, {}), ["eval", "{run}"],
     "holds no valid scaling"),
    ("calibration-absurd-temperature", _calibration({"method": "temperature", "scale": [1 / 164328], "bias": [0] * 3}),
     ["eval", "{run}"], "temperature of 1.643e+05"),
    ("calibration-other-classes", _calibration({"method": "temperature", "scale": [1.0], "bias": [0] * 5}),
     ["predict", "{run}", "{image}"], "number of classes"),
    ("dataset-json-missing-mean", _dataset_without("mean"), ["eval", "{run}"], "lacks mean"),
    ("dataset-json-missing-classes", _dataset_without("classes"), ["predict", "{run}", "{image}"], "lacks classes"),
    ("cam-unknown-class", None, ["cam", "{run}", "{image}", "--class", "dog", "--out", "{tmp}/cam"],
     "unknown class 'dog'"),
    ("tta-too-many-views", None, ["eval", "{run}", "--tta", "65"], "more than 64 views"),
    ("best-pt-other-tensors", _tensors_that_do_not_fit, ["eval", "{run}"],
     "(fastnet_cifar_small, 3 classes) does not fit the model: 'group1.0.weight' has shape (64, 24, 3, 3)"),
    ("best-pt-empty", lambda r: (r / rundir.BEST).write_bytes(b""), ["eval", "{run}"], "damaged or truncated"),
    ("best-pt-incomplete", _best({"model_name": "fastnet_cifar_small", "num_classes": 3}), ["eval", "{run}"],
     "is incomplete"),
    ("best-pt-nan", lambda r: _nonfinite(float("nan"))(r / rundir.BEST),
     ["predict", "{run}", "{image}", "--json"], "the run diverged"),
]


@pytest.mark.parametrize("mutate, argv, problem", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damaged_runs_fail_with_one_specific_line(run, tiny_folder, tmp_path, capsys, mutate, argv, problem):
    copy = _copy(run, tmp_path)
    if mutate is not None:
        mutate(copy)
    capsys.readouterr()
    values = {"run": str(copy), "tmp": str(tmp_path), "image": _image(tiny_folder)}
    assert main([a.format(**values) for a in argv]) == 2
    assert problem in _one_error_line(capsys)


def test_predict_json_never_prints_nan_for_a_diverged_run(run, tiny_folder, tmp_path, capsys):
    copy = _copy(run, tmp_path)
    ckpt = torch.load(copy / rundir.BEST, weights_only=True)
    ckpt["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                     for k, v in ckpt["model"].items()}
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, copy / rundir.BEST)
    capsys.readouterr()
    assert main(["predict", str(copy), _image(tiny_folder), "--json"]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # no JSON at all rather than JSON with NaN in it
    assert len(out.err.strip().splitlines()) == 1
    assert "holds non-finite weights" in out.err and "the run diverged" in out.err


def test_non_finite_outputs_of_finite_weights_are_refused_before_printing(run, tiny_folder):
    trained = load_run(run)
    with torch.no_grad():
        trained.model.head.bias.fill_(float("inf"))  # inf - inf in the softmax: NaN probabilities
    engine = run_engine(trained)
    with pytest.raises(UserError, match="model outputs are not finite .* checkpoint is damaged or the run diverged"):
        list(predict_rows(engine, [Path(_image(tiny_folder))]))


def test_json_predictions_refuse_nan_rather_than_print_invalid_json(run, tiny_folder, monkeypatch, capsys):
    """Whatever reaches `predict --json`, it prints valid JSON or nothing: NaN is not JSON."""
    def rows(probability):
        def predict(engine, paths, *args, **kwargs):
            for p in paths:
                yield {"path": str(p), "label": "cat", "confidence": probability, "rejected": False, "energy": 1.0,
                       "top": [{"class": "cat", "probability": probability}], "error": None}
        return predict

    monkeypatch.setattr(inference_files, "predict_rows", rows(float("nan")))
    capsys.readouterr()
    assert main(["predict", str(run), _image(tiny_folder), "--json"]) != 0
    out = capsys.readouterr()
    assert out.out == ""  # no JSON at all rather than JSON with NaN in it
    assert len(out.err.strip().splitlines()) == 1 and out.err.startswith("imgcls: error: ")
    monkeypatch.setattr(inference_files, "predict_rows", rows(0.5))
    assert main(["predict", str(run), _image(tiny_folder), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["probability"] == 0.5


def test_folder_predict_refuses_outputs_that_overflow_from_finite_weights(run, tiny_folder, tmp_path, capsys):
    """Finite weights (so the load accepts them) whose logits overflow to inf: the folder path, the one the
    CLI takes for runs and ONNX files alike, must refuse rather than write NaN rows."""
    copy = _copy(run, tmp_path)
    ckpt = torch.load(copy / rundir.BEST, weights_only=True)
    ckpt["model"]["head.weight"] = torch.full_like(ckpt["model"]["head.weight"], 3e38)
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, copy / rundir.BEST)
    capsys.readouterr()
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(copy), _image(tiny_folder), "--out", str(out), "--quiet"]) == 2
    assert "model outputs are not finite" in _one_error_line(capsys)
    assert not out.exists() or "NaN" not in out.read_text()
