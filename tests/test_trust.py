"""Nothing silent, nothing half-written: the four failure classes of a hostile pass, each with a test over
the whole class (every metadata field, every write path, every numeric option)."""

import ast
import copy
import csv
import errno
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from PIL import Image

import imgcls
from imgcls import rundir
from imgcls.cli import build_parser, main
from imgcls.config import FIELDS, TYPES, build_config
from imgcls.errors import UserError
from imgcls.inference.exported import onnx_engine, read_export_spec
from imgcls.inference.metadata import ONNX_KEY, parse_spec
from imgcls.inference.reject import choose_threshold, curve_problem
from imgcls.inference.run import load_run
from imgcls.training.imbalance import class_weights

PACKAGE = Path(imgcls.__file__).parent


@pytest.fixture
def run(one_epoch_run):
    return one_epoch_run


@pytest.fixture
def export(one_epoch_export):
    return one_epoch_export


# ---------------------------------------------------------------- 1. an export is input, validated


def _one_line(fn) -> str:
    with pytest.raises(UserError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message
    return message


def _damage(document: dict, path: tuple, value):
    damaged = copy.deepcopy(document)
    target = damaged
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return damaged


# (path into the document, a damaged value, the field the one line must name)
DAMAGES = [
    (("format",), "imgcls-export-0", "format"), (("model",), "", "model"), (("head",), "huge", "head"),
    (("classes",), ["cat"], "classes"), (("classes",), ["a", "a", "b"], "classes"), (("classes",), "ab", "classes"),
    (("classes",), ["cat\ndog 0.99", "b", "c"], "classes"), (("classes",), ["a\x00", "b", "c"], "classes"),
    (("classes",), ["\u202etac", "b", "c"], "classes"),
    (("preprocessing", "img_size"), 60000, "img_size"), (("preprocessing", "img_size"), 16000, "img_size"),
    (("preprocessing", "img_size"), "32", "img_size"), (("preprocessing", "img_size"), True, "img_size"),
    (("preprocessing", "crop_pct"), 0, "crop_pct"), (("preprocessing", "crop_pct"), 1.5, "crop_pct"),
    (("preprocessing", "crop_pct"), float("nan"), "crop_pct"), (("preprocessing", "mean"), [0.5], "mean"),
    (("preprocessing", "mean"), [0.5, 0.5, float("inf")], "mean"), (("preprocessing", "std"), [0, 1, 1], "std"),
    # a hostile pass: numbers finite in float64 that are zero or infinite in the float32 normalisation
    (("preprocessing", "std"), [0.2, 1e-50, 0.2], "std"), (("preprocessing", "mean"), [1e39, 0.4, 0.4], "mean"),
    (("preprocessing", "crop_pct"), 1e-300, "crop_pct"),
    (("preprocessing", "resize"), "nearest", "resize"), (("preprocessing",), "x", "preprocessing"),
    (("recipe", "aug"), "mystery", "recipe.aug"), (("recipe", "crop_padding"), -1, "recipe.crop_padding"),
    (("recipe", "crop_fill"), "edge", "recipe.crop_fill"), (("scaling",), {"method": "temperature"}, "scaling"),
    (("scaling",), {"method": "temperature", "scale": [1e9], "bias": [0.0] * 3}, "scaling"),
    (("reject_rule",), {"threshold": 7}, "reject_rule"), (("weights",), 3, "weights"),
    (("risk_coverage",), {"threshold": [0.5], "coverage": [0.3], "accuracy": [0.9]}, "risk_coverage"),
    (("risk_coverage",), {"threshold": ["x"], "coverage": [1.0], "accuracy": [0.9]}, "risk_coverage"),
    # a third hostile pass: a border as wide as the image (every random view pure padding), names that print
    # alike or as nothing or as a rejection, loosely typed identity fields
    (("recipe", "crop_padding"), 1024, "recipe.crop_padding"), (("classes",), ["unknown", "b", "c"], "classes"),
    (("classes",), [" ", "b", "c"], "classes"), (("classes",), ["caf\u00e9", "cafe\u0301", "c"], "classes"),
    (("weights",), "x", "weights"), (("fingerprint",), {"content_sha256": [1, 2]}, "fingerprint"),
    (("risk_coverage",), {"n": 10**30, "threshold": [0.5], "coverage": [1.0], "accuracy": [0.9]}, "risk_coverage"),
]


@pytest.mark.parametrize("path, value, field", DAMAGES, ids=[f"{'.'.join(d[0])}={d[1]!r}"[:40] for d in DAMAGES])
def test_every_export_field_is_checked_on_read(export, path, value, field):
    document = json.loads((export / "model.json").read_text())
    parse_spec(document, "model.json")  # the real document reads
    message = _one_line(lambda: parse_spec(_damage(document, path, value), "model.json"))
    assert "model.json" in message and field.split(".")[-1] in message


def test_a_damaged_model_json_is_refused_before_any_image_is_read(export, tmp_path, tiny_folder):
    """img_size 60000 ran predict until killed at 13 GB; crop_pct 0 gave an error row per image and exit 0."""
    for field, value in (("img_size", 60000), ("crop_pct", 0)):
        damaged = tmp_path / f"export-{field}"
        damaged.mkdir()
        (damaged / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes())
        document = json.loads((export / "model.json").read_text())
        document["preprocessing"][field] = value
        (damaged / "model.json").write_text(json.dumps(document))
        assert main(["predict", str(damaged), str(tiny_folder / "test")]) == 2
        with pytest.raises(UserError, match=f"model.json: preprocessing.{field} is"):
            read_export_spec(damaged)


@pytest.mark.parametrize("name", [b"cat\ndog", b"tab\there", b"\xffnot-utf8", "\u202etac".encode(), b"bell\x07"])
def test_a_class_folder_whose_name_would_forge_output_is_refused(tmp_path, name):
    """A newline in a label forged lines in the summary and the server's metrics; bytes that are not UTF-8 broke
    the JSON and HTML written after training."""
    from PIL import Image

    from imgcls.data.folder import scan

    for cls in (name, b"plain"):
        folder = Path(os.fsdecode(bytes(tmp_path) + b"/" + cls))
        folder.mkdir()
        Image.new("RGB", (8, 8)).save(folder / "0.png")
    message = _one_line(lambda: scan(tmp_path))
    assert "class name" in message and "rename the folder" in message


def test_an_onnx_file_whose_metadata_disagrees_with_its_graph_is_refused(export, tmp_path):
    """One class name deleted: 2 names for a 3-output graph shifted every label onto another class."""
    model = onnx.load(str(export / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    document = json.loads(props[ONNX_KEY])
    others = {k: v for k, v in props.items() if k != ONNX_KEY}
    short = document["classes"][:-1]
    cases = {"one-class-short": {**others, "imgcls.classes": json.dumps(short),
                                 ONNX_KEY: json.dumps({**document, "classes": short})},
             "not-json": {**others, ONNX_KEY: "{not json"}, "absent": others}
    for name, metadata in cases.items():
        damaged = tmp_path / f"{name}.onnx"
        del model.metadata_props[:]
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, str(damaged))
        assert str(damaged) in _one_line(lambda path=damaged: onnx_engine(path)), name
    assert "outputs" in _one_line(lambda: onnx_engine(tmp_path / "one-class-short.onnx"))


def test_an_onnx_graph_without_its_documents_digest_is_refused(export, tmp_path):
    """Class names swapped in the document and the flat key, the graph's digest of the document cleared: the
    check was skipped as for an older export, and every label was inverted."""
    model = onnx.load(str(export / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    document = json.loads(props[ONNX_KEY])
    swapped = document["classes"][::-1]
    del model.metadata_props[:]
    for key, value in {**props, "imgcls.classes": json.dumps(swapped),
                       ONNX_KEY: json.dumps({**document, "classes": swapped})}.items():
        model.metadata_props.add(key=key, value=value)
    for description, words in (("", "carries no digest of its imgcls.export metadata"),
                               (model.graph.doc_string, "is not the document this graph was exported with")):
        model.graph.doc_string = description
        onnx.save(model, str(tmp_path / "swapped.onnx"))
        assert words in _one_line(lambda: onnx_engine(tmp_path / "swapped.onnx")), description


def test_an_onnx_graph_with_other_weights_spliced_in_is_refused(export, tmp_path):
    """Another run's convolution weights copied into the graph kept its metadata and passed every check: predict
    answered with the other model, and serve published this export's parity and card for it."""
    from onnx import numpy_helper

    model = onnx.load(str(export / "model.onnx"))
    weight = next(i for i in model.graph.initializer if "." in i.name and len(numpy_helper.to_array(i).shape) == 4)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save(model, str(tmp_path / "spliced.onnx"))
    assert "its graph is not the one exported with this metadata" in _one_line(
        lambda: onnx_engine(tmp_path / "spliced.onnx"))
    model = onnx.load(str(export / "model.onnx"))  # a property no other check reads (int8's note) is pinned too
    model.metadata_props.add(key="imgcls.quantization", value='{"method": "forged"}')
    onnx.save(model, str(tmp_path / "noted.onnx"))
    assert "or a property were changed since" in _one_line(lambda: onnx_engine(tmp_path / "noted.onnx"))
    model = onnx.load(str(export / "model.onnx"))  # the file as export wrote it, saved again, still reads
    onnx.save(model, str(tmp_path / "resaved.onnx"))
    assert onnx_engine(tmp_path / "resaved.onnx").classes == json.loads(
        {p.key: p.value for p in model.metadata_props}["imgcls.classes"])


def test_weights_of_another_export_beside_a_model_json_are_refused(export, tmp_path):
    """Same architecture, same names, other numbers: only the digest in model.json tells them apart."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    swapped = tmp_path / "swapped"
    swapped.mkdir()
    (swapped / "model.json").write_text((export / "model.json").read_text())
    state = load_file(export / "model.safetensors")
    with safe_open(export / "model.safetensors", "pt") as f:
        header = f.metadata()  # the pin of model.json kept: only the numbers differ
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, swapped / "model.safetensors",
              metadata=header)
    assert "sha256" in _one_line(lambda: read_export_spec(swapped) and imgcls.load_model(swapped))
    assert main(["predict", str(swapped), str(export)]) == 2
    # removing the digests switches nothing off: neither file without its pin of the other is loaded
    document = json.loads((export / "model.json").read_text())
    del document["weights_file_sha256"]
    (swapped / "model.json").write_text(json.dumps(document))
    (swapped / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes())
    assert "model.json carries no digest of model.safetensors" in _one_line(lambda: imgcls.load_model(swapped))
    (swapped / "model.json").write_text((export / "model.json").read_text())
    save_file(state, swapped / "model.safetensors")  # the same tensors, the header's pin gone
    assert "model.safetensors carries no digest of model.json" in _one_line(lambda: imgcls.load_model(swapped))


def test_a_model_json_edited_within_bounds_is_refused_by_the_digest_in_the_tensors(export, tmp_path):
    """Swapped class names, other mean/std, another img_size: each reads as a valid document, and a safetensors
    folder answered with it silently (every label swapped, every image 'frog'); the tensors' header pins it."""
    document = json.loads((export / "model.json").read_text())
    edits = {"classes": lambda d: d["classes"].reverse(),
             "mean": lambda d: d["preprocessing"].update(mean=[0.0] * 3, std=[1.0] * 3),
             "img_size": lambda d: d["preprocessing"].update(img_size=16)}
    for name, edit in edits.items():
        edited = copy.deepcopy(document)
        edit(edited)
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes())
        (folder / "model.json").write_text(json.dumps(edited))
        assert "is not the document" in _one_line(lambda f=folder: imgcls.load_model(f)), name
    (tmp_path / "same").mkdir()  # the document as written, respaced, still loads
    (tmp_path / "same" / "model.safetensors").write_bytes((export / "model.safetensors").read_bytes())
    (tmp_path / "same" / "model.json").write_text(json.dumps(document, indent=4))
    assert imgcls.load_model(tmp_path / "same")[0].imgcls["classes"] == document["classes"]


def test_an_onnx_document_whose_calibration_is_not_the_graphs_is_refused(export, tmp_path):
    """imgcls applies the document's scaling to `logits`; other readers take the graph's `probabilities`:
    an edited temperature (or none where the graph has one) made the two answer differently."""
    model = onnx.load(str(export / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    document = json.loads(props[ONNX_KEY])
    classes = len(document["classes"])
    assert document["scaling"] is None  # this export is uncalibrated: its graph applies no scaling
    document["scaling"] = {"method": "temperature", "temperature": 5.0, "scale": [0.2], "bias": [0.0] * classes}
    del model.metadata_props[:]
    for k, value in {**props, ONNX_KEY: json.dumps(document)}.items():
        model.metadata_props.add(key=k, value=value)
    onnx.save(model, str(tmp_path / "scaled.onnx"))
    assert "is not the one in the graph" in _one_line(lambda: onnx_engine(tmp_path / "scaled.onnx"))


# Each flat key edited to a value that reads but disagrees with the document: the keys readers without imgcls use.
FLAT_EDITS = {"imgcls.classes": lambda v: json.dumps(json.loads(v)[:-1]), "imgcls.img_size": lambda v: str(int(v) * 2),
              "imgcls.crop_pct": lambda v: "0.5" if v != "0.5" else "0.75", "imgcls.resize": lambda v: "nearest",
              "imgcls.input": lambda v: "NCHW float32", "imgcls.model": lambda v: v + "_x",
              "imgcls.mean": lambda v: "[0.1, 0.1, 0.1]", "imgcls.std": lambda v: "[0.9, 0.9, 0.9]",
              "imgcls.task": lambda v: "multilabel" if v == "multiclass" else "multiclass"}


def test_every_flat_onnx_key_must_agree_with_the_document(export, tmp_path):
    """A reader without imgcls trusts the flat keys: an edited one would preprocess or label differently from
    imgcls on the same file, so the file is refused, naming the key."""
    model = onnx.load(str(export / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert set(FLAT_EDITS) == set(props) - {ONNX_KEY}  # a new flat key needs an edit here
    for key, edit in FLAT_EDITS.items():
        damaged = tmp_path / f"{key}.onnx"
        del model.metadata_props[:]
        for k, value in {**props, key: edit(props[key])}.items():
            model.metadata_props.add(key=k, value=value)
        onnx.save(model, str(damaged))
        assert key in _one_line(lambda path=damaged: onnx_engine(path)), key
    respaced = tmp_path / "respaced.onnx"  # the same values spelled differently: an edit still, which the pin finds
    del model.metadata_props[:]
    for k, value in {**props, "imgcls.classes": json.dumps(json.loads(props["imgcls.classes"]), indent=1)}.items():
        model.metadata_props.add(key=k, value=value)
    onnx.save(model, str(respaced))
    assert "or a property were changed since" in _one_line(lambda: onnx_engine(respaced))


# ---------------------------------------------------------------- 2. derived files record their source


def test_eval_on_other_data_never_writes_into_the_run(run, tiny_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = (run / "eval-val.json").exists()
    assert main(["eval", str(run), "--data", str(tiny_folder), "--split", "val", "--device", "cpu"]) == 0
    assert (run / "eval-val.json").exists() == before  # the run's own file is untouched
    written = tmp_path / f"eval-{tiny_folder.name}-val.json"
    assert written.is_file() and json.loads(written.read_text())["data"] == str(tiny_folder)
    assert main(["eval", str(run), "--data", str(tiny_folder), "--out", str(run / "eval-x.json")]) == 2


def test_a_calibration_fitted_on_another_checkpoint_is_refused(run, tiny_folder, tmp_path):
    trained = load_run(run)
    stored = {"method": "temperature", "scaling": {"method": "temperature", "scale": [0.8], "bias": [0.0] * 3},
              "weights": "0" * 64, "splits": {}}
    rundir.write_sealed_json(run / rundir.CALIBRATION, stored)
    try:
        for argv in (["eval", str(run)], ["predict", str(run), str(tiny_folder / "test")],
                     ["export", str(run), "--out", str(tmp_path / "e")]):
            assert main(argv) == 2, argv
        with pytest.raises(UserError, match="fitted on another checkpoint than best.pt.*imgcls calibrate"):
            load_run(run)
        rundir.write_sealed_json(run / rundir.CALIBRATION, {**stored, "weights": trained.digest})  # this one's
        assert load_run(run).scaling.temperature == pytest.approx(1.25)
        assert load_run(run, calibrated=False).scaling is None  # what calibrate reads: it fits a new one
    finally:
        (run / rundir.CALIBRATION).unlink()


def test_a_run_being_trained_is_refused_and_one_killed_before_an_epoch_says_how_to_go_on(run, tmp_path, capsys):
    lock = rundir.RunLock(run)
    lock.acquire()
    try:
        for command in ("eval", "calibrate", "export", "report"):
            assert main([command, str(run)]) == 2
            assert f"is being trained (process {__import__('os').getpid()}" in capsys.readouterr().err
    finally:
        lock.release()
    early = tmp_path / "early"
    early.mkdir()
    for name in (rundir.CONFIG, rundir.DATASET):
        (early / name).write_bytes((run / name).read_bytes())
    message = _one_line(lambda: load_run(early))
    assert "has not finished an epoch" in message and f"imgcls train --resume {early}" in message


def test_a_stored_curve_is_checked_and_coverage_beyond_it_is_no_crash():
    assert curve_problem({"threshold": [0.9, 0.5], "coverage": [0.5, 1.0], "accuracy": [1.0, 0.8]}) is None
    assert curve_problem({"threshold": [0.5, 0.9], "coverage": [0.5, 1.0], "accuracy": [1.0, 0.8]})  # unordered
    assert curve_problem([1, 2]) and curve_problem({"threshold": [0.9], "coverage": [0.6], "accuracy": [0.9]})
    rule = choose_threshold({"threshold": [0.9], "coverage": [0.6], "accuracy": [0.9]}, coverage=0.8)
    assert rule["coverage"] == 0.6  # the most the curve accepts


# ---------------------------------------------------------------- 3. outputs land whole


WRITERS = ("write_text", "write_bytes", "savefig", "savez", "savez_compressed", "save_file", "save")
# Where a file is written without rundir.atomic_path, and why that is safe.
DIRECT_WRITES = {
    "imgcls.rundir": "the atomic writer itself",
    "imgcls.export.onnx_export": "into the export's staging folder, renamed into place whole",
    "imgcls.export.safetensors_export": "into the export's staging folder, renamed into place whole",
    "imgcls.export.quantize": "into the export's staging folder, renamed into place whole",
    "imgcls.export": "the model card, into the staging folder",
    "imgcls.models.checkpoint": "torch.save into a buffer, then rundir.atomic_write_bytes",
    "imgcls.evaluation.significance": "np.savez into a buffer, then rundir.atomic_write_bytes",
    "imgcls.reporting.audit_report": "a PNG into a buffer for an inline image",
    "imgcls.serving.service": "the Grad-CAM overlay, a PNG into a buffer for the JSON answer",
    "imgcls.reporting.predictions": "rows streamed into the temporary path write_rows' atomic_path gives",
    "imgcls.evaluation.analysis": "np.savez_compressed into the temporary path of rundir.atomic_path",
    "imgcls.plotting": "fig.savefig into the temporary path of rundir.atomic_path",
    "imgcls.data.shards": "a PNG into a buffer for a tar member; the tars into a staging folder, renamed whole",
}


def test_every_write_goes_through_the_atomic_writer():
    """A new module that writes a file without rundir.atomic_path (or a staged folder) fails here."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            writes = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in WRITERS
            opens = isinstance(node, ast.Call) and getattr(node.func, "id", None) == "open" and any(
                isinstance(a, ast.Constant) and isinstance(a.value, str) and set(a.value) & set("wax")
                for a in node.args[1:2] + [k.value for k in node.keywords if k.arg == "mode"])
            if writes or opens:
                found.setdefault(module, []).append(node.lineno)
    assert set(found) <= set(DIRECT_WRITES), {m: found[m] for m in set(found) - set(DIRECT_WRITES)}


def test_two_predicts_into_one_file_leave_one_whole_result(run, tiny_folder, tmp_path):
    out = tmp_path / "same.csv"
    cmd = [sys.executable, "-m", "imgcls", "predict", str(run), str(tiny_folder / "test"), "--out", str(out),
           "--quiet", "--workers", "0"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    lines = out.read_text().splitlines()
    assert len(lines) == 31 and all(line.count(",") == lines[0].count(",") for line in lines)
    assert not list(tmp_path.glob(".same.csv*"))  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_threads_never_splice(tmp_path):
    target = tmp_path / "keep.json"
    rundir.write_json(target, {"old": True})
    with pytest.raises(RuntimeError), rundir.atomic_file(target) as f:
        f.write('{"new": ')
        raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"old": True} and len(list(tmp_path.iterdir())) == 1

    def write(k: int):
        for _ in range(20):
            rundir.write_json(target, {"writer": k, "rows": list(range(2000))})

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert json.loads(target.read_text())["rows"] == list(range(2000))


def test_a_write_through_a_link_replaces_its_target_and_keeps_the_link(run, tiny_folder, tmp_path, capsys):
    """--out at a symbolic link replaced the link with a file, leaving the file it named stale, while the
    summary said the existing file was replaced."""
    real, link = tmp_path / "real.csv", tmp_path / "link.csv"
    real.write_text("old\n")
    link.symlink_to(real)
    capsys.readouterr()
    assert main(["predict", str(run), str(tiny_folder / "test"), "--out", str(link), "--quiet"]) == 0
    assert link.is_symlink() and len(real.read_text().splitlines()) == 31
    assert f"replaced the existing {real} through the link link.csv" in capsys.readouterr().out
    for bad in (tmp_path, tmp_path / "absent" / "x.csv"):  # a folder, a missing folder: one line each
        assert "cannot write" in _one_line(lambda bad=bad: rundir.write_json(bad, {}))


def test_writes_never_replace_a_device_fifo_or_link_loop_and_say_a_read_only_place_in_one_line(tmp_path,
                                                                                                monkeypatch):
    """A link to a device node or a FIFO had the node replaced by a regular file (as root, a link to
    /dev/null would have replaced /dev/null); a link loop replaced the user's link."""
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    (tmp_path / "to-fifo.csv").symlink_to(fifo)
    (tmp_path / "loop1.csv").symlink_to(tmp_path / "loop2.csv")
    (tmp_path / "loop2.csv").symlink_to(tmp_path / "loop1.csv")
    for target, words in ((fifo, "not a regular file"), (tmp_path / "to-fifo.csv", "not a regular file"),
                          (tmp_path / "loop1.csv", "symbolic-link loop")):
        assert words in _one_line(lambda t=target: rundir.write_json(t, {}))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and (tmp_path / "loop1.csv").is_symlink()

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(src))

    monkeypatch.setattr(rundir.os, "replace", read_only)
    message = _one_line(lambda: rundir.write_json(tmp_path / "out.json", {}))
    assert message == f"cannot write {tmp_path / 'out.json'} (Read-only file system); the previous out.json, if " \
                      "any, is intact: choose another --out"
    assert not list(tmp_path.glob(".out.json*"))


def test_what_a_killed_writer_left_is_removed_by_the_next_write(tmp_path):
    dead = 2**22 + 17  # above the kernel's default pid_max: no process has it
    left = [tmp_path / f".preds.csv{rundir.TMP_MARK}{dead}-1", tmp_path / f".export{rundir.TMP_MARK}{dead}"]
    left[0].write_text("half a file")
    left[1].mkdir()
    (left[1] / "model.onnx").write_bytes(b"half")
    alive = tmp_path / f".preds.csv{rundir.TMP_MARK}{os.getpid()}-99"  # another writer still at work: kept
    alive.write_text("in progress")
    rundir.atomic_write_bytes(tmp_path / "preds.csv", b"whole\n")
    rundir.remove_stale_temps(tmp_path / "export")
    assert not left[0].exists() and not left[1].exists() and alive.exists()


def test_a_users_output_never_lands_on_a_file_the_run_owns(run, tiny_folder, capsys):
    """predict --out RUN/metrics.jsonl and audit --out RUN/summary.json replaced the run's own records."""
    before = {name: (run / name).read_bytes() for name in (rundir.METRICS, rundir.SUMMARY)}
    assert main(["predict", str(run), str(tiny_folder / "test"), "--out", str(run / rundir.METRICS)]) == 2
    assert f"is {rundir.METRICS} of the run" in capsys.readouterr().err
    assert main(["audit", str(tiny_folder), "--out", str(run / rundir.SUMMARY)]) == 2
    assert f"is {rundir.SUMMARY} of the run" in capsys.readouterr().err
    assert {name: (run / name).read_bytes() for name in before} == before


def test_no_output_lands_on_another_runs_files_an_exports_or_the_commands_own_input(run, export, tiny_folder,
                                                                                     tmp_path, capsys):
    """eval --out OTHER_RUN/summary.json (or calibration.json, or an export's model.json) replaced it, and audit
    --out EXPORT/model.json killed the export; predict --list L --out L replaced the user's list."""
    other = tmp_path / "other"
    shutil.copytree(run, other)
    kept = {p: p.read_bytes() for p in [*other.iterdir(), *export.iterdir()] if p.is_file()}
    attempts = [(["eval", str(run), "--out", str(other / rundir.SUMMARY)], "of the run"),
                (["eval", str(run), "--out", str(other / rundir.CALIBRATION)], "of the run"),
                (["eval", str(run), "--out", str(export / "model.json")], "of the export"),
                (["audit", str(tiny_folder), "--out", str(export / "model.json")], "of the export"),
                (["eval", str(run), "--out", str(export / "parity.json")], "of the export")]
    listed = tmp_path / "list.csv"
    listed.write_text(f"{next((tiny_folder / 'test' / 'bird').iterdir())}\n")
    attempts.append((["predict", str(run), "--list", str(listed), "--out", str(listed)],
                     "one of this command's inputs"))
    for argv, words in attempts:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, (argv, err)
    assert {p: p.read_bytes() for p in kept} == kept and listed.read_text().count("\n") == 1
    assert {f.name for f in export.iterdir()} <= rundir.EXPORT_FILES  # the names the guard knows are the export's
    from imgcls.export import CARD, PARITY
    from imgcls.export.onnx_export import ONNX_FILE
    from imgcls.export.quantize import INT8_FILE
    from imgcls.inference.exported import SPEC, WEIGHTS
    assert {CARD, PARITY, ONNX_FILE, INT8_FILE, SPEC, WEIGHTS} == rundir.EXPORT_FILES


def test_no_output_lands_in_the_data_a_command_reads_or_in_the_cache(tiny_folder, tmp_path, capsys, monkeypatch):
    """augment-preview and lr-find --out DATA/train/cat/x.png replaced a training image with a plot; compare --out
    DATA left a stray folder that made the data unusable; audit --out CACHE/kernels.json replaced the cache."""
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    image = next((data / "train").rglob("*.png"))
    kept = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kernels.json").write_text("{}")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text(json.dumps({"data": str(data), "train": {"model": "fastnet_cifar_small", "epochs": 1},
                                      "variants": {"a": {}}}))
    attempts = [["augment-preview", "--data", str(data), "--img-size", "32", "--out", str(image)],
                ["lr-find", "--data", str(data), "--model", "fastnet_cifar_small", "--img-size", "32", "--out",
                 str(data / "train" / "lr.png")],
                ["compare", str(experiment), "--out", str(data / "cmp")],
                ["audit", str(data), "--out", str(tmp_path / "cache" / "kernels.json")]]
    for argv in attempts:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "lies inside" in err and "which this command reads" in err and "\n" not in err, (argv, err)
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == kept
    assert (tmp_path / "cache" / "kernels.json").read_text() == "{}"


def test_cam_never_writes_over_its_own_input_or_into_the_runs_training_images(run, tiny_folder, tmp_path, capsys):
    """An input named x-cam.png in --out was replaced by another image's overlay; cam --out into the run's own
    training folder added a PNG there, and the next eval refused the changed data."""
    photo = next((tiny_folder / "test").rglob("*.png"))
    out = tmp_path / "out"
    out.mkdir()
    mine = out / "x-cam.png"
    shutil.copy(photo, mine)
    other = tmp_path / "x.png"
    shutil.copy(photo, other)
    kept = mine.read_bytes()
    train_folder = next(p for p in (tiny_folder / "train").iterdir() if p.is_dir())
    cfg = yaml.safe_load((run / rundir.CONFIG).read_text())
    assert Path(cfg["data"]).resolve() == tiny_folder.resolve()  # the run was trained on this folder
    for argv, words in ((["cam", str(run), str(mine), str(other), "--out", str(out)], "one of this command's inputs"),
                        (["cam", str(run), str(photo), "--out", str(train_folder)], "lies inside")):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert words in capsys.readouterr().err
    assert mine.read_bytes() == kept and not list(train_folder.glob("*-cam.png"))


def test_augment_preview_checks_the_crop_padding_as_train_does(tiny_folder, tmp_path, capsys):
    """--crop-padding 100 on 32 px images drew a preview of padding alone, where train refuses it."""
    argv = ["augment-preview", "--data", str(tiny_folder), "--img-size", "32", "--crop-padding", "100", "--out",
            str(tmp_path / "p.png")]
    assert main(argv) == 2
    assert "--crop-padding 100 needs a border narrower than the 32px image; give at most 31" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_lr_finds_rates_are_checked_in_float32(tiny_folder, tmp_path, capsys):
    """--start-lr 1e-300 --end-lr 1e-299 (every rate 0 in float32) swept and plotted with exit 0; 1e39 is inf."""
    base = ["lr-find", "--data", str(tiny_folder), "--model", "fastnet_cifar_small", "--img-size", "32", "--out",
            str(tmp_path / "lr.png")]
    for rates, words in ((["1e-300", "1e-299"], "--start-lr 1e-300 is 0 in float32"),
                         (["1e-3", "1e39"], "--end-lr 1e+39 is beyond float32's range")):
        capsys.readouterr()
        assert main([*base, "--start-lr", rates[0], "--end-lr", rates[1]]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "lr.png").exists()


def test_stale_or_forged_test_predictions_are_computed_again(run, capsys):
    """A forged npz (every test image right) made compare report +66.67 points, significant, beside the row's
    own 33% accuracy; one of another checkpoint was used as it was."""
    from imgcls.evaluation.significance import run_test_predictions, write_test_predictions

    labels, probs = run_test_predictions(run)
    perfect = np.eye(probs.shape[1], dtype=np.float32)[labels]
    out_of_range = labels.copy()
    out_of_range[0] = 99
    with np.load(run / rundir.TEST_PREDICTIONS) as stored:
        weights, seal = str(stored["weights"]), str(stored["sha256"])
    # columns swapped (accuracy unchanged when classes are balanced; the intervals change), the seal left as it was
    forged = {"another checkpoint": (labels, perfect, "0" * 64, None),
              "out of range": (out_of_range, probs, None, None),
              "columns swapped": (labels, probs[:, ::-1].copy(), weights, seal)}
    for why, (lab, pr, weights, sealed) in forged.items():
        buffer = io.BytesIO()
        np.savez(buffer, labels=lab, probs=pr, **({"weights": np.array(weights)} if weights else {}),
                 **({"sha256": np.array(sealed)} if sealed else {}))
        (run / rundir.TEST_PREDICTIONS).write_bytes(buffer.getvalue())
        again = run_test_predictions(run)
        assert np.array_equal(again[0], labels) and np.allclose(again[1], probs, atol=1e-6), why
        assert "is not usable" in capsys.readouterr().err, why
    write_test_predictions(run, labels, probs)


def test_a_hand_edited_dataset_json_is_refused_against_the_plan(run, tmp_path, tiny_folder):
    """mean 0 / std 1 in dataset.json made every image 'frog' at 33% accuracy; img_size 16 ran a 32-px model
    at 16 px; config.yaml still said imagenet at 32."""
    for field, value in (("mean", [0.0, 0.0, 0.0]), ("img_size", 16), ("crop_pct", 0.5)):  # crop: a 2x zoom
        copy_ = tmp_path / field
        shutil.copytree(run, copy_)
        info = json.loads((copy_ / rundir.DATASET).read_text())
        info[field] = value
        (copy_ / rundir.DATASET).write_text(json.dumps(info))
        assert main(["predict", str(copy_), str(tiny_folder / "test")]) == 2


def test_a_report_refuses_metrics_that_are_not_the_epochs_the_summary_counts(run, tmp_path):
    from imgcls.evaluation.analysis import training_record

    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    line = (copy_ / rundir.METRICS).read_text().splitlines()[0]
    (copy_ / rundir.METRICS).write_text(f"{line}\n{line}\n")  # epoch 1 twice, for a run of one epoch
    assert "does not hold epochs 1 to 1 in order" in _one_line(lambda: training_record(copy_))


def test_list_files_drop_a_byte_order_mark_and_name_a_folder(run, tiny_folder, tmp_path, capsys):
    image = next((tiny_folder / "test").rglob("*.png"))
    listed = tmp_path / "list.txt"
    listed.write_bytes(b"\xef\xbb\xbf" + str(image).encode() + b"\r\n" + str(tiny_folder).encode() + b"\n")
    out = tmp_path / "rows.csv"
    assert main(["predict", str(run), "--list", str(listed), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["error"] == ""
    assert rows[1]["error"] == f"IsADirectoryError: {tiny_folder} is a folder, not an image file"
    assert main(["predict", str(run), "--list", str(tiny_folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["predict", str(run), str(image), "--batch-size", "99999999999999999999"]) == 2
    assert "--batch-size 99999999999999999999 is out of range" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["unknown", "Unknown ", "   "])
def test_a_class_folder_named_like_a_rejection_or_blank_is_refused(tmp_path, name):
    from imgcls.data.folder import scan

    for cls in (name, "cat"):
        (tmp_path / cls).mkdir()
    assert "class name" in _one_line(lambda: scan(tmp_path))


def test_two_class_folders_that_are_one_name_in_unicode_are_refused(tmp_path):
    from imgcls.data.folder import scan

    for cls in ("caf\u00e9", "cafe\u0301"):
        (tmp_path / cls).mkdir()
    assert "two Unicode spellings" in _one_line(lambda: scan(tmp_path))


@pytest.mark.parametrize("other, phrase", [("cat\u200b", "invisible character U+200B"),
                                           ("c\u00adat", "invisible character U+00AD"),
                                           ("cat\u2060", "invisible character U+2060"),
                                           ("cat ", "begins or ends with white space"),
                                           ("Cat", "differ only in case")])
def test_two_class_folders_that_print_alike_are_refused(tmp_path, other, phrase):
    from imgcls.data.folder import scan

    for cls in ("cat", other):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "0.png")
    assert phrase in _one_line(lambda: scan(tmp_path))


def test_crop_padding_as_wide_as_the_image_is_refused(tiny_folder, tmp_path, capsys):
    argv = ["train", "--data", str(tiny_folder), "--model", "fastnet_cifar_small", "--epochs", "1", "--img-size",
            "32", "--crop-padding", "32", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 2
    assert "--crop-padding 32 needs a border narrower than the 32px image" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 4. numbers checked as they are used


FLOAT_OPTIONS = [name for name, kind in TYPES.items() if kind in (float, float | None)]


@pytest.mark.parametrize("name", FLOAT_OPTIONS)
def test_every_float_option_is_checked_in_float32(name):
    """1e-50 is 0 in float32 and 1e39 infinite: either would be used silently as something else."""
    meta = FIELDS[name].metadata
    extra = {"ema": {}, "whiten_bias_epochs": {}}.get(name, {})
    for value in (1e-50, 1e39):
        high = meta["high"]
        if high is not None and value > high:
            continue  # already out of bounds
        low = meta["low"]
        if low is not None and value < low:
            continue
        with pytest.raises(UserError, match="float32"):
            build_config(**{name: value}, **extra, **_needs(name))


@pytest.mark.parametrize("name, value", [("ema", 0.999999999999), ("label_smoothing", 0.99999999999),
                                         ("momentum", 0.999999999999), ("plateau_factor", 0.999999999999)])
def test_a_bound_is_checked_on_the_float32_value(name, value):
    """Each is < 1 in float64 and exactly 1.0 in float32: an EMA that never moves, all-smoothed targets."""
    with pytest.raises(UserError, match="which is 1.0 in float32") as e:
        build_config(**{name: value}, **_needs(name))
    assert repr(value) in str(e.value)


def _needs(name: str) -> dict:
    """What an option needs beside it to be accepted at all."""
    return {"focal_gamma": {"loss": "focal"}, "final_lr_factor": {"schedule": "linear"},
            "layer_decay": {"pretrained": "w.safetensors"}, "clip_grad": {}}.get(name, {})


@pytest.mark.parametrize("spec, phrase", [("1e-50,1e-50,1e-50", "float32"), ("1e39,1,1", "float32"),
                                          ("1e-46,1,1", "float32"), ("1,0,1", "positive"),
                                          ("-1,2,3", "positive"), ("1e-40,1,1", "normal range")])
def test_class_weights_are_checked_after_conversion(spec, phrase):
    labels = torch.tensor([0, 1, 2, 0])
    with pytest.raises(UserError, match=phrase):
        class_weights(spec, labels, ["a", "b", "c"])
    assert torch.allclose(class_weights("1,2,3", labels, ["a", "b", "c"]), torch.tensor([4 / 7, 8 / 7, 12 / 7]))


def test_a_weights_file_refuses_a_zero_weight(tmp_path):
    """A weight of 0 silently drops its class from the loss: the class is never learned."""
    path = tmp_path / "w.json"
    path.write_text('{"a": 1, "b": 0}')
    assert "positive" in _one_line(lambda: class_weights(str(path), torch.tensor([0, 1]), ["a", "b"]))
    path.write_text('{"a": 1, "b": 1' + "0" * 400 + "}")  # an integer no float holds: named, not an OverflowError
    assert "the weight of 'b' is '1000" in _one_line(lambda: class_weights(str(path), torch.tensor([0, 1]), ["a", "b"]))


def test_a_weights_file_with_duplicate_keys_or_deep_nesting_is_one_line(tmp_path):
    labels = torch.tensor([0, 1])
    twice = tmp_path / "twice.json"
    twice.write_text('{"a": 1, "b": 2, "a": 3}')
    assert "given twice" in _one_line(lambda: class_weights(str(twice), labels, ["a", "b"]))
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert "nested too deeply" in _one_line(lambda: class_weights(str(deep), labels, ["a", "b"]))


# ---------------------------------------------------------------- the review's findings, kept


def test_every_command_help_renders():
    """A bare % in a help text made train, lr-find and export --help crash in argparse."""
    commands = build_parser()._subparsers._group_actions[0].choices
    for command in commands:
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0, command
    assert len(commands) >= 12


def test_eval_on_other_data_from_inside_the_run_never_writes_into_it(run, tiny_folder, monkeypatch, capsys):
    """A hostile pass: `cd RUN && imgcls eval . --data OTHER` wrote eval-OTHER-val.json into the run, and an
    --out in a folder that does not exist was a bare FileNotFoundError."""
    monkeypatch.chdir(run)
    before = sorted(p.name for p in run.iterdir())
    assert main(["eval", ".", "--data", str(tiny_folder), "--split", "val", "--device", "cpu"]) == 2
    assert "inside the run" in capsys.readouterr().err
    assert main(["eval", ".", "--data", str(tiny_folder), "--out", "sub/x.json"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", ".", "--data", str(tiny_folder), "--split", "val", "--out", "eval-val.json"]) == 2
    assert sorted(p.name for p in run.iterdir()) == before


# ---------------------------------------------------------------- the fourth hostile pass, by class


def test_a_temperature_scaling_is_one_scale_no_bias_and_its_own_temperature():
    """A bias of -50 in calibration.json's temperature scaling turned 3 airplanes into automobile and frog
    (eval 71.67% -> 57.50%); its temperature field was never read (19, NaN, 1e309 or none: no effect)."""
    from imgcls.inference.scaling import parse_scaling

    good = {"method": "temperature", "temperature": 1.25, "scale": [0.8], "bias": [0.0, 0.0, 0.0]}
    assert parse_scaling(good, 3, "calibration.json", "fix").temperature == pytest.approx(1.25)
    assert parse_scaling({**good, "temperature": None}, 3, "c.json", "fix").temperature == pytest.approx(1.25)
    damages = {"a bias": {"bias": [-50.0, 0.0, 0.0]}, "another temperature": {"temperature": 19.0},
               "a NaN temperature": {"temperature": float("nan")}, "a text temperature": {"temperature": "1.25"}}
    for why, change in damages.items():
        message = _one_line(lambda change=change: parse_scaling({**good, **change}, 3, "calibration.json", "fix"))
        assert message.startswith("the scaling in calibration.json ") and "temperature" in message, why
    vector = {"method": "vector", "temperature": 2.0, "scale": [1.0] * 3, "bias": [0.0] * 3}
    assert "vector scaling with one temperature" in _one_line(lambda: parse_scaling(vector, 3, "c.json", "fix"))
    assert parse_scaling({**vector, "temperature": None}, 3, "c.json", "fix").method == "vector"
    # a multi-label run's: a temperature per label (no bias, no one temperature) or Platt; never the softmax kinds
    per_label = {"method": "temperature", "temperature": None, "scale": [0.8, 1.0, 2.0], "bias": [0.0] * 3}
    assert parse_scaling(per_label, 3, "c.json", "fix", multilabel=True).scale == [0.8, 1.0, 2.0]
    for bad, message in (({"bias": [0.0, 0.5, 0.0]}, "non-zero bias"), ({"temperature": 1.25}, "one temperature"),
                         ({"scale": [0.8]}, "another method or number of classes"),
                         ({"method": "vector", "bias": [0.1] * 3}, "another method")):
        assert message in _one_line(lambda bad=bad: parse_scaling({**per_label, **bad}, 3, "c.json", "fix",
                                                                   multilabel=True)), bad
    platt = {"method": "platt", "scale": [1.0] * 3, "bias": [0.3] * 3}
    assert parse_scaling(platt, 3, "c.json", "fix", multilabel=True).bias == [0.3] * 3
    assert "another method" in _one_line(lambda: parse_scaling(platt, 3, "c.json", "fix"))


@pytest.mark.parametrize("change, field", [
    ({"best_val_acc": 7.5}, "best_val_acc"), ({"train_time_s": -3.0}, "train_time_s"),
    ({"best_epoch": 99}, "best_epoch"), ({"epochs_run": 4.5}, "epochs_run"), ({"params": float("inf")}, "params"),
])
def test_a_summary_out_of_range_is_refused_by_report_and_export(run, tmp_path, change, field):
    """summary.json's best_val_acc 7.5 became 'val accuracy 750.00%' in the card and the report; epochs_run
    4.5 was a TypeError."""
    from imgcls.evaluation.analysis import training_record

    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    summary = json.loads((copy_ / rundir.SUMMARY).read_text())
    (copy_ / rundir.SUMMARY).write_text(json.dumps({**summary, **change}))
    assert "was edited after imgcls wrote it" in _one_line(lambda: training_record(copy_))
    rundir.write_sealed_json(copy_ / rundir.SUMMARY, {**summary, **change})  # past the seal: the bounds behind it
    message = _one_line(lambda: training_record(copy_))
    assert f"{rundir.SUMMARY} is damaged" in message and field in message


def test_a_summary_edited_in_range_must_still_tell_the_epochs_and_the_checkpoints_story(run, tmp_path, capsys):
    """best_val_acc 0.95 (every bound holds) reached MODEL_CARD.md and the report of a run whose best epoch scored
    less; the same edit made in metrics.jsonl too is still found, as best.pt records its epoch and accuracy."""
    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    summary = json.loads((copy_ / rundir.SUMMARY).read_text())
    lines = [json.loads(line) for line in (copy_ / rundir.METRICS).read_text().splitlines()]
    assert summary["best_val_acc"] != 0.95
    forged = {**summary, "best_val_acc": 0.95, "final_val_acc": 0.95}
    for metrics in (lines, [{**m, "val_acc": 0.95} for m in lines]):  # the summary alone, then both files
        (copy_ / rundir.METRICS).write_text("".join(rundir.sealed_line(m) for m in metrics))  # past those seals too
        forged["metrics_sha256"] = rundir.file_digest(copy_ / rundir.METRICS)  # and the digest of the new lines
        rundir.write_sealed_json(copy_ / rundir.SUMMARY, forged)  # past the seal: the cross-checks behind it
        against = rundir.METRICS if metrics is lines else rundir.BEST
        for argv in (["report", str(copy_), "--tta", "none"], ["export", str(copy_), "--format", "safetensors",
                                                                "--out", str(tmp_path / "e")]):
            capsys.readouterr()
            assert main(argv) == 2, argv
            err = capsys.readouterr().err.strip()
            assert "\n" not in err and f"{rundir.SUMMARY} does not agree with {against}" in err, err
    assert not (tmp_path / "e").exists() and not (copy_ / "report").exists()


def test_a_config_edited_in_bounds_is_refused_against_the_checkpoint(run, tmp_path, capsys):
    """lr 0.3, epochs 300 and optimizer sgd written into a finished run's config.yaml (every value valid) were
    printed in MODEL_CARD.md as the run's recipe, beside 'best epoch 1 of 1'."""
    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    cfg = yaml.safe_load((copy_ / rundir.CONFIG).read_text())
    (copy_ / rundir.CONFIG).write_text(yaml.safe_dump({**cfg, "lr": 0.3, "epochs": 300, "optimizer": "sgd"},
                                                      sort_keys=False))
    assert main(["export", str(copy_), "--format", "safetensors", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert f"{rundir.CONFIG} is not what best.pt was trained with (epochs 300 against 1)" in err, err
    moved = {**cfg, "out": str(tmp_path / "elsewhere"), "workers": 1}  # where it is and the machine: no edit
    (copy_ / rundir.CONFIG).write_text(yaml.safe_dump(moved, sort_keys=False))
    assert load_run(copy_).config.workers == 1


def test_any_edit_of_a_summary_is_refused_by_its_seal(run, tmp_path, capsys):
    """train_time_s 0.5, params 5, device cuda and precision fp16 (each in range) reached the card and the report
    of a CPU fp32 run; test_ece 0.01 and 999999 inference img/s reached a comparison's table."""
    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    summary = json.loads((copy_ / rundir.SUMMARY).read_text())
    for change in ({"train_time_s": 0.5}, {"params": 5}, {"device": "cuda", "precision": "fp16"},
                   {"test_ece": 0.01}, {"inference_images_per_s": 999999.0}):
        (copy_ / rundir.SUMMARY).write_text(json.dumps({**summary, **change}, indent=2))
        for argv in (["report", str(copy_), "--tta", "none"], ["export", str(copy_), "--format", "safetensors",
                                                                "--out", str(tmp_path / "e")]):
            capsys.readouterr()
            assert main(argv) == 2, (change, argv)
            assert f"{rundir.SUMMARY} was edited after imgcls wrote it" in capsys.readouterr().err, change


@pytest.mark.parametrize("edit", ['"val_acc": 1e309', '"train_loss": NaN', '"val_acc": 1.5', '"train_loss": -1'])
def test_metrics_that_are_not_finite_or_in_range_are_refused(run, tmp_path, edit):
    """An edited line is refused by its seal; one sealed anew (as no imgcls writes it) by the range checks."""
    from imgcls.evaluation.analysis import training_record

    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    record = json.loads((copy_ / rundir.METRICS).read_text().splitlines()[0])
    key = edit.split('"')[1]
    text = json.dumps({**record, key: 0.0}).replace(f'"{key}": 0.0', edit)
    (copy_ / rundir.METRICS).write_text(text + "\n")
    assert "metrics.jsonl line 1 was edited after imgcls wrote it" in _one_line(lambda: training_record(copy_))
    forged = {k: v for k, v in json.loads(text).items() if k != rundir.SEAL}
    (copy_ / rundir.METRICS).write_text(rundir.sealed_line(forged))
    assert "is damaged (line 1 lacks one of" in _one_line(lambda: training_record(copy_))


def test_an_edited_eval_file_never_reaches_the_model_card(run, tmp_path, capsys):
    """accuracy 5.0 and macro-F1 NaN in eval-test.json were printed in MODEL_CARD.md as 500.00% and nan."""
    from imgcls.evaluation.evaluate import eval_problem

    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    assert main(["eval", str(copy_)]) == 0
    ev = json.loads((copy_ / "eval-test.json").read_text())
    classes = ev["classes"]
    assert eval_problem(ev, classes) is None
    for change in ({"accuracy": 5.0}, {"macro_f1": float("nan")}, {"loss": -1.0}, {"n": 0},
                   {"per_class": ev["per_class"][::-1]}, {"most_confused": [{"true": "x", "predicted": "y"}]}):
        assert eval_problem({**ev, **change}, classes) is not None, change
    # out of range, and in range (0.97: the seal finds what no bound can), never reach the card
    for i, forged in enumerate(({**ev, "accuracy": 5.0}, {**ev, "accuracy": 0.97, "macro_f1": 0.97})):
        (copy_ / "eval-test.json").write_text(json.dumps(forged))
        assert main(["export", str(copy_), "--format", "safetensors", "--out", str(tmp_path / f"exp{i}")]) == 0
        card = (tmp_path / f"exp{i}" / "MODEL_CARD.md").read_text()
        assert "500.00%" not in card and "97.00%" not in card and f"- accuracy: {100 * ev['accuracy']:.2f}%" in card


def test_results_on_changed_data_never_stand_for_the_run(run, tmp_path, capsys):
    """eval --allow-data-change on a folder whose test images had changed wrote RUN/eval-test.json with the
    run's own fingerprint; once the data was restored, export printed those numbers in the card."""
    from imgcls.evaluation.evaluate import evaluation

    assert evaluation(run)["fingerprint"] == load_run(run).dataset["fingerprint"]
    assert evaluation(run, allow_data_change=True)["fingerprint"] is None  # it may be other data's
    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    assert main(["eval", str(copy_), "--allow-data-change"]) == 0
    stored = json.loads((copy_ / "eval-test.json").read_text())
    rundir.write_sealed_json(copy_ / "eval-test.json", {**stored, "accuracy": 0.0123})  # as if on other images
    assert main(["export", str(copy_), "--format", "safetensors", "--out", str(tmp_path / "exp")]) == 0
    assert "1.23%" not in (tmp_path / "exp" / "MODEL_CARD.md").read_text()  # computed again on the run's data


def test_a_consistent_edit_of_onnx_metadata_is_refused_by_the_graphs_own_digest(export, tmp_path):
    """Swapped class names in both imgcls.classes and the imgcls.export document labelled every airplane
    'frog' with exit 0; the safetensors export already refused the same edit."""
    model = onnx.load(str(export / "model.onnx"))
    props = {p.key: p for p in model.metadata_props}
    document = json.loads(props[ONNX_KEY].value)
    classes = document["classes"][::-1]
    props[ONNX_KEY].value = json.dumps({**document, "classes": classes})
    props["imgcls.classes"].value = json.dumps(classes)
    edited = tmp_path / "edited.onnx"
    onnx.save(model, str(edited))
    assert "is not the document this graph was exported with" in _one_line(lambda: onnx_engine(edited))
    assert onnx_engine(export / "model.onnx").classes == document["classes"]  # the export as written opens


def test_a_model_json_that_gives_a_key_twice_is_refused(export, tmp_path):
    """{"classes": [swapped], ..., "classes": [real]}: json keeps the last, another reader the first."""
    folder = tmp_path / "exp"
    shutil.copytree(export, folder)
    text = (folder / "model.json").read_text()
    document = json.loads(text)
    swapped = json.dumps(document["classes"][::-1])
    (folder / "model.json").write_text('{"classes": ' + swapped + ", " + text.lstrip()[1:])
    assert "the key 'classes' is given twice" in _one_line(lambda: read_export_spec(folder))


def test_a_stored_ood_result_is_shown_only_for_its_own_checkpoint_and_checked(tmp_path):
    """eval --checkpoint last --ood wrote eval-test.json; the report of best.pt showed last's OOD table, and
    an AUROC of 7.0 as 7.0000 (or a text AUROC as a ValueError after the whole analysis)."""
    from imgcls.evaluation.rejection import stored_ood

    ood = {"folder": "ood", "split": "test", "n_in": 30, "n_ood": 20, "weights": "a" * 64,
           "msp": {"auroc": 0.61, "fpr_at_95tpr": 0.9}, "energy": {"auroc": 0.63, "fpr_at_95tpr": 0.88},
           "reject_auto": None}
    path = tmp_path / "eval-test.json"
    rundir.write_sealed_json(path, {"weights": "a" * 64, "ood": ood})  # the checks behind the seal
    assert stored_ood(tmp_path, "test", "a" * 64) == ood
    assert "another checkpoint" in stored_ood(tmp_path, "test", "b" * 64)["stale"]
    for damage in ({"msp": {"auroc": 7.0, "fpr_at_95tpr": 0.9}}, {"msp": {"auroc": "x", "fpr_at_95tpr": 0.9}},
                   {"n_ood": 0}, {"reject_auto": [1]}):
        rundir.write_sealed_json(path, {"weights": "a" * 64, "ood": {**ood, **damage}})
        assert "its ood section" in _one_line(lambda: stored_ood(tmp_path, "test", "a" * 64)), damage
    rundir.write_sealed_json(path, {"weights": "a" * 64, "ood": [1]})
    assert "its ood section" in _one_line(lambda: stored_ood(tmp_path, "test", "a" * 64))
    path.write_text(json.dumps({"weights": "a" * 64, "ood": ood}))  # unsealed: edited, or an older imgcls's
    assert "was edited after imgcls wrote it" in _one_line(lambda: stored_ood(tmp_path, "test", "a" * 64))


@pytest.mark.parametrize("edit", ["crop_padding: -40", "eval_batch_size: 99999999999999999999",
                                  "memory_format: .nan", "lr: 1.0e-50"])
def test_a_hand_edited_config_is_checked_as_train_checks_it_by_every_reader(run, tmp_path, tiny_folder, capsys,
                                                                         edit):
    """crop_padding -40 was a RuntimeError in eval --tta 3; an eval batch of 1e20, a memory format .nan and an
    lr of 0 in float32 were accepted by eval and predict."""
    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    key = edit.split(":")[0]
    lines = [edit if line.startswith(f"{key}:") else line for line in (copy_ / rundir.CONFIG).read_text().splitlines()]
    assert edit in lines
    (copy_ / rundir.CONFIG).write_text("\n".join(lines) + "\n")
    assert main(["predict", str(copy_), str(tiny_folder / "test")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{rundir.CONFIG} was edited" in err


def test_predicts_shares_are_checked_in_float32_too():
    curve = {"n": 1000, "threshold": [0.9, 0.5], "coverage": [0.5, 1.0], "accuracy": [0.99, 0.8]}
    for kw in ({"target_accuracy": 1e-320}, {"coverage": 1e-50}, {"coverage": -0.0}, {"target_accuracy": 1.5}):
        assert "is not a share" in _one_line(lambda kw=kw: choose_threshold(curve, **kw)), kw


def test_every_serve_number_is_bounded_and_finite():
    """--max-wait-ms 1e309 (infinite) was accepted, and then every request waited forever."""
    from imgcls.serving.settings import ServeSettings

    for field in ("max_wait_ms", "body_timeout_s", "header_timeout_s", "drift_psi"):
        for value in (float("inf"), float("nan"), -1.0, 1e9, 1e-46):
            assert "is out of range" in _one_line(lambda f=field, v=value: ServeSettings(**{f: v})), (field, value)
    for field in ("port", "max_batch", "max_queue", "max_bytes", "max_connections", "topk", "drift_window",
                  "drift_min_images", "drain_timeout_s", "batch_size"):
        for value in (10**20, -1, True):
            assert "is out of range" in _one_line(lambda f=field, v=value: ServeSettings(**{f: v})), (field, value)



def test_report_says_when_it_replaces_a_report(run, tmp_path, capsys):
    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    assert main(["report", str(copy_)]) == 0
    assert "replaced" not in capsys.readouterr().out
    (copy_ / rundir.REPORT_DIR / rundir.REPORT_HTML).write_text("my notes")
    assert main(["report", str(copy_)]) == 0
    assert "(replaced the existing report.html)" in capsys.readouterr().out.splitlines()[-1]


def test_a_risk_coverage_curve_must_be_counts_of_its_images(run, tmp_path):
    """accuracy = [1.0] * 120 in calibration.json's curve let --reject auto promise 0.9 on a 58% model."""
    from imgcls.evaluation.rejection import risk_coverage

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(120, 3, generator=gen, dtype=torch.float64) * 2, 1)
    labels = torch.randint(0, 3, (120,), generator=gen)
    curve = risk_coverage(probs, labels)
    assert curve_problem(curve) is None
    dropped = {**curve, "accuracy": curve["accuracy"][:-1] + [0.0]}  # every image wrong once all are accepted
    assert "counts of right images that fall" in curve_problem(dropped)
    forged = {**curve, "accuracy": [1.0] * len(curve["accuracy"])}  # consistent in itself: caught below
    assert "not counts of its n" in curve_problem({**curve, "accuracy": [a * 0.999 for a in curve["accuracy"]]})
    # and the curve must end at the val accuracy the same calibration.json reports
    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    rundir.write_sealed_json(copy_ / rundir.CALIBRATION, {"risk_coverage": forged, "splits": {"val": {"after": {
        "accuracy": 0.25}}}})  # sealed as imgcls would: the checks behind the seal hold on their own
    trained = load_run(copy_, calibrated=False)
    assert "ends at accuracy 1.0000, but the file's val accuracy is 0.2500" in _one_line(lambda: trained.risk_coverage)


def test_export_leaves_the_runs_eval_file_as_eval_wrote_it(run, tmp_path, capsys):
    """export recomputed the card's metrics into RUN/eval-test.json, dropping the TTA table eval had put there."""
    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    assert main(["eval", str(copy_), "--tta", "flip"]) == 0
    before = (copy_ / "eval-test.json").read_bytes()
    assert main(["export", str(copy_), "--format", "safetensors", "--out", str(tmp_path / "exp")]) == 0
    assert (copy_ / "eval-test.json").read_bytes() == before


def test_a_checkpoint_pins_the_pixels_it_was_trained_on(run, tmp_path, tiny_folder):
    """normalize cifar in config.yaml and the cifar mean/std in dataset.json, edited together, changed every
    answer (eval 66.67% -> 58.33%) with exit 0: the checkpoint now says what it was trained to see."""
    from imgcls.config import NORMALIZATIONS

    copy_ = tmp_path / "run"
    shutil.copytree(run, copy_)
    config = (copy_ / rundir.CONFIG).read_text()
    normalize = next(line for line in config.splitlines() if line.startswith("normalize:")).split(":")[1].strip()
    other = next(name for name in NORMALIZATIONS if name != normalize)
    (copy_ / rundir.CONFIG).write_text(config.replace(f"normalize: {normalize}", f"normalize: {other}"))
    info = json.loads((copy_ / rundir.DATASET).read_text())
    mean, std = NORMALIZATIONS[other]
    (copy_ / rundir.DATASET).write_text(json.dumps({**info, "mean": list(mean), "std": list(std)}))
    assert "best.pt was trained with" in _one_line(lambda: load_run(copy_))
    # the recipe's pixel stage too: crop_padding 12 and reflect fill (in bounds) changed eval --tta N and were
    # written into the export's recipe, which predict and serve redraw
    shutil.copy(run / rundir.CONFIG, copy_ / rundir.CONFIG)
    shutil.copy(run / rundir.DATASET, copy_ / rundir.DATASET)
    assert load_run(copy_).recipe == load_run(run).recipe
    cfg = yaml.safe_load((copy_ / rundir.CONFIG).read_text())
    (copy_ / rundir.CONFIG).write_text(yaml.safe_dump({**cfg, "crop_padding": 12, "crop_fill": "reflect"}))
    message = _one_line(lambda: load_run(copy_))
    assert message.startswith(f"{rundir.CONFIG} says recipe") and "best.pt was trained with" in message


def test_list_files_skip_comments_and_a_device_is_named_as_one(run, tiny_folder, tmp_path):
    from imgcls.inference.files import collect_paths

    image = next((tiny_folder / "test").rglob("*.png"))
    listed = tmp_path / "list.txt"
    listed.write_text(f"# photos to check\n\n{image}\n")
    assert collect_paths([], str(listed)) == [image]
    assert "is not a regular file" in _one_line(lambda: collect_paths([], "/dev/zero"))
