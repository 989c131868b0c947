"""The weak answers of a hostile pass (issue 27), each kept: a bare exception, a misleading message or a
silent skip became one line that names the problem and the fix, with a non-zero exit, or the right result."""

import errno
import hashlib
import json
import os
import shlex
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from imgcls import rundir
from imgcls.cli import main
from imgcls.data.audit import audit
from imgcls.data.folder import scan
from imgcls.errors import UserError
from imgcls.evaluation.significance import read_test_predictions
from imgcls.export.model_card import FEW_IMAGES
from imgcls.kernels import cache
from imgcls.models import create_model


@pytest.fixture
def run(one_epoch_run):
    return one_epoch_run


@pytest.fixture
def export(one_epoch_export):
    return one_epoch_export


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def _copy(export, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(export, folder)
    return folder


def test_weights_of_another_model_or_a_damaged_file_are_one_line(export, tiny_folder, tmp_path, capsys):
    """A multi-line `Error(s) in loading state_dict`, or a bare SafetensorError, before."""
    image = str(tiny_folder / "test" / "bird" / "000.jpg")
    other = _copy(export, tmp_path, "other-head")
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        header = f.metadata()  # model.json's pin kept
    save_file(create_model("fastnet_cifar_small", 5).state_dict(), str(other / "model.safetensors"), metadata=header)
    assert main(["predict", str(other), image]) == 2
    assert "sha256 differs" in _one_line_error(capsys)
    document = json.loads((other / "model.json").read_text())
    document["weights_file_sha256"] = hashlib.sha256((other / "model.safetensors").read_bytes()).hexdigest()
    (other / "model.json").write_text(json.dumps(document))  # digests made to agree: the tensors' shapes still tell
    assert main(["predict", str(other), image]) == 2
    assert "must hold fastnet_cifar_small with 3 classes" in _one_line_error(capsys)
    cut = _copy(export, tmp_path, "truncated")
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["predict", str(cut), image]) == 2
    assert "is damaged or not a safetensors file" in _one_line_error(capsys)


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", b"not an npz at all"])
def test_damaged_stored_test_predictions_are_one_line(tmp_path, content):
    """compare read test_predictions.npz and died with EOFError or BadZipFile."""
    (tmp_path / "test_predictions.npz").write_bytes(content)
    with pytest.raises(UserError, match="cannot read .*test_predictions.npz .*delete it and rerun") as e:
        read_test_predictions(tmp_path)
    assert "\n" not in str(e.value)


def test_a_validation_split_of_only_unreadable_files_is_one_line(tiny_folder, tmp_path, capsys):
    """torch.cat(): expected a non-empty list, before."""
    data = tmp_path / "data"
    shutil.copytree(tiny_folder / "train", data / "train")
    for cls in ("airplane", "automobile", "bird"):
        (data / "val" / cls).mkdir(parents=True)
        (data / "val" / cls / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    code = main(["train", "--data", str(data), "--model", "fastnet_cifar_small", "--epochs", "1", "--img-size",
                 "32", "--precision", "fp32", "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 2
    assert "val" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()  # nothing half-made left behind


def test_an_empty_ood_folder_is_refused_before_the_evaluation(run, tmp_path, capsys):
    """eval --ood EMPTY ran the whole test evaluation, then answered with predict's text."""
    (tmp_path / "empty").mkdir()
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    assert main(["eval", str(run), "--ood", str(tmp_path / "empty")]) == 2
    assert "out-of-distribution" in _one_line_error(capsys)
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before  # nothing evaluated, nothing written


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_in_predict_and_export_names_the_path_and_leaves_nothing(run, tiny_folder, tmp_path, capsys,
                                                                               monkeypatch):
    """A bare `OSError: [Errno 28]` without the path, before."""
    keep = tmp_path / "keep.csv"
    keep.write_text("old rows\n")
    monkeypatch.setattr(os, "fsync", _disk_full)
    assert main(["predict", str(run), str(tiny_folder / "test"), "--out", str(keep), "--quiet"]) == 2
    err = _one_line_error(capsys)
    assert str(keep) in err or keep.name in err
    assert keep.read_text() == "old rows\n" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv"]
    monkeypatch.setattr(rundir, "write_json", _disk_full)
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 2
    assert str(tmp_path) in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv"]  # no export, no staging folder


def test_a_hand_edited_kernel_cache_cannot_set_the_batch_or_fill_the_plan(tmp_path, monkeypatch):
    """An eval batch of 10**9 read from the cache was accepted and recorded; 1 MB of cached timings was
    copied into summary.json."""
    assert not cache.valid("eval_batch_size", 10**9) and cache.valid("eval_batch_size", 256)
    assert not cache.valid("eval_batch_size", True) and not cache.valid("precision_eval", "fp16", "cpu")
    assert cache.timings({"timings": {"32": 1.5, "64": None}}) == {"32": 1.5, "64": None}
    for hostile in ({str(i): 1.0 for i in range(100_000)}, {"32": float("nan")}, {"32": -1.0}, {"32": "fast"},
                    ["32"], {"x" * 1000: 1.0}):
        assert cache.timings({"timings": hostile}) == {}


def test_the_suggested_command_is_shell_quoted(tiny_folder, tmp_path):
    """A folder named `$(touch X)` ended up live in the command audit suggests."""
    hostile = tmp_path / "$(touch X); rm -rf ~"
    shutil.copytree(tiny_folder, hostile)
    command = audit(str(hostile), progress=False).report["suggested_command"]
    words = shlex.split(command)
    assert words[:2] == ["imgcls", "train"] and words[words.index("--data") + 1] == str(hostile)


def test_an_export_is_world_readable_and_its_card_says_what_the_proof_is_worth(export):
    """model.safetensors was written 0600 while the other files were 0644; parity on a few images was
    printed as 100% without a caveat."""
    modes = {p.name: p.stat().st_mode & 0o777 for p in export.iterdir()}
    assert len(set(modes.values())) == 1, modes
    parity = json.loads((export / "parity.json").read_text())["results"]
    images = parity["onnx"]["images"]
    assert images < FEW_IMAGES  # the tiny folder's validation split
    assert f"Only {images} val images" in (export / "MODEL_CARD.md").read_text()


def test_the_card_of_an_unfinished_run_says_so(run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / rundir.SUMMARY).unlink()
    assert main(["export", str(unfinished), "--out", str(tmp_path / "export")]) == 0
    assert "**Training did not finish**" in (tmp_path / "export" / "MODEL_CARD.md").read_text()


def test_a_checkpoint_trained_on_other_class_names_is_refused(run, tmp_path, capsys):
    other = tmp_path / "renamed"
    shutil.copytree(run, other)
    info = json.loads((other / rundir.DATASET).read_text())
    info["classes"] = ["x", "y", "z"]
    (other / rundir.DATASET).write_text(json.dumps(info))
    assert main(["eval", str(other)]) == 2
    assert "was trained on the classes airplane, automobile, bird, not this run's x, y, z" in _one_line_error(capsys)


def test_jfif_files_are_images_everywhere(tmp_path):
    """Predict read .jfif, training folders and audit skipped it silently."""
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            pixels = np.random.default_rng(i).integers(0, 255, (24, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / cls / f"{i}.jfif", format="JPEG")
    classes, found = scan(tmp_path)
    assert classes == ["a", "b"] and sum(len(files) for files, _ in found.values()) == 6
    assert sum(audit(str(tmp_path), progress=False).report["counts"]["train"].values()) == 6


def test_a_class_named_like_math_text_draws(tmp_path):
    """A class folder named `$\\foo$` made matplotlib's mathtext raise while drawing the report's figures."""
    from imgcls.reporting.figures import confusion_heatmaps

    path = confusion_heatmaps([[3, 1], [0, 4]], ["$\\foo$", "b_$x"], tmp_path / "confusion.png")
    assert path.is_file() and path.stat().st_size > 0


def test_tensorboard_writes_each_epoch_scalar_once(tmp_path):
    """`epoch/epoch` was written twice at every epoch's step."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from imgcls.training.tensorboard import TensorBoardLog

    log = TensorBoardLog(tmp_path, {})
    log.epoch(3, {"epoch": 3, "train_loss": 0.5, "val_acc": 0.75}, global_step=12)
    log.writer.close()
    events = EventAccumulator(str(log.logdir), size_guidance={"scalars": 0})
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["epoch/epoch", "epoch/train_loss", "epoch/val_acc"]
    assert [(e.step, e.value) for e in events.Scalars("epoch/epoch")] == [(12, 3.0)]
