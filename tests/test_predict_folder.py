"""imgcls predict at folder scale: files, folders, globs and lists; broken files as rows; streaming."""

import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.cli import main
from imgcls.config import build_config
from imgcls.data.presets import tta_views
from imgcls.evaluation.batch_predict import collect_paths, predict_paths, run_predictor
from imgcls.evaluation.evaluate import predict_files
from imgcls.evaluation.predict import forward_batch, load_images, load_run
from imgcls.training.train import fit


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "run"
    return fit(build_config(data=str(tiny_folder), model="fastnet_cifar_small", epochs=1, batch_size=32, img_size=32,
                            out=str(out), quiet=True, precision="fp32"))


@pytest.fixture
def messy(tiny_folder, tmp_path):
    """Nested good images, a truncated JPEG, a zero-byte PNG, a text file and a hidden file."""
    root = tmp_path / "messy"
    shutil.copytree(tiny_folder / "test" / "bird", root / "a")
    shutil.copytree(tiny_folder / "test" / "airplane", root / "b" / "deeper")
    good = sorted((root / "a").iterdir())[0].read_bytes()
    (root / "b" / "truncated.jpg").write_bytes(good[: len(good) // 3] if good[:2] == b"\xff\xd8" else b"\xff\xd8\xff")
    (root / "b" / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"junk")
    return root


def test_a_messy_folder_gives_one_row_per_file_with_an_error_column(run, messy, tmp_path):
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(messy), "--out", str(out), "--quiet", "--batch-size", "4"]) == 0
    rows = list(csv.DictReader(open(out)))
    files = [p for p in messy.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert sorted(r["path"] for r in rows) == sorted(map(str, files)) and len(rows) == 23
    broken = {r["path"].rsplit("/", 1)[-1]: r for r in rows if r["error"]}
    assert sorted(broken) == ["empty.png", "notes.txt", "truncated.jpg"]
    assert all(r["label"] == "" and r["top1"] == "" for r in broken.values())
    good = [r for r in rows if not r["error"]]
    classes = {"airplane", "automobile", "bird"}
    assert all(r["label"] in classes and 0 < float(r["top1_prob"]) <= 1 for r in good)
    assert all(float(r["top1_prob"]) >= float(r["top2_prob"]) >= float(r["top3_prob"]) for r in good)


def test_rows_match_the_runs_own_predict(run, tiny_folder):
    """The folder path and the old per-file path give the same probabilities: one preprocessing."""
    files = sorted((tiny_folder / "test" / "automobile").iterdir())
    trained = load_run(run)
    rows = list(predict_paths(run_predictor(trained), files, topk=3, batch_size=4, workers=0))
    expected = predict_files(trained, list(map(str, files)), topk=3)
    for row, exp in zip(rows, expected, strict=True):
        assert [t["class"] for t in row["top"]] == [t["class"] for t in exp["top"]]
        assert np.allclose([t["probability"] for t in row["top"]], [t["probability"] for t in exp["top"]], atol=1e-5)


def test_files_folders_globs_and_a_list_mix(tiny_folder, tmp_path):
    test = tiny_folder / "test"
    one = sorted((test / "bird").iterdir())[0]
    listed = tmp_path / "list.txt"
    listed.write_text(f"{one}\n\n{sorted((test / 'airplane').iterdir())[1]}\n")
    paths = collect_paths([str(one), str(test / "automobile"), str(test / "airplane" / "*.png")], str(listed))
    assert paths[0] == one and len(paths) == 1 + 10 + 5 + 2
    assert paths[1:11] == sorted((test / "automobile").iterdir())


@pytest.mark.parametrize("argv, problem", [
    (["/no/such/dir"], "matches no file or folder"),
    (["--list", "/no/such/list.txt"], "--list /no/such/list.txt does not exist"),
    ([], "no files to predict"),
    (["{test}", "--out", "x.xlsx"], "unknown format"),
    (["{test}", "--reject", "often"], "neither auto nor a probability"),
    (["{test}", "--reject", "auto"], "run imgcls calibrate"),
])
def test_bad_predict_arguments_are_one_line(run, tiny_folder, argv, problem, capsys):
    argv = [a.replace("{test}", str(tiny_folder / "test")) for a in argv]
    assert main(["predict", str(run), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and problem in err[0]


def test_jsonl_and_parquet_hold_the_same_rows(run, messy, tmp_path):
    assert main(["predict", str(run), str(messy), "--out", str(tmp_path / "p.jsonl"), "--quiet", "--topk", "2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 23 and sum(r["error"] is not None for r in rows) == 3
    assert all(len(r["top"]) == 2 for r in rows if r["error"] is None)
    pq = pytest.importorskip("pyarrow.parquet")
    assert main(["predict", str(run), str(messy), "--out", str(tmp_path / "p.parquet"), "--quiet", "--topk", "2"]) == 0
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert [r["path"] for r in table] == [r["path"] for r in rows]
    assert [r["top1"] for r in table] == [r["top"][0]["class"] if r["top"] else None for r in rows]


def test_tta_flip_averages_the_image_and_its_mirror(run, tiny_folder):
    files = sorted((tiny_folder / "test" / "bird").iterdir())[:4]
    trained = load_run(run)
    rows = list(predict_paths(run_predictor(trained), files, topk=3, tta="flip", workers=0))
    images = load_images(files, 32)
    views = torch.cat(tta_views(images, "flip", "basic", torch.Generator()))
    with torch.inference_mode():
        logits = forward_batch(trained.model, views, trained.dataset["mean"], trained.dataset["std"], "cpu", "fp32")
    expected = logits.softmax(1).view(2, 4, -1).mean(0)
    for row, probs in zip(rows, expected, strict=True):
        assert row["top"][0]["probability"] == pytest.approx(probs.max().item(), abs=1e-5)
    plain = list(predict_paths(run_predictor(trained), files, topk=3, workers=0))
    gaps = [abs(a["top"][0]["probability"] - b["top"][0]["probability"]) for a, b in zip(rows, plain, strict=True)]
    assert max(gaps) > 1e-6  # the mirror changed something


def test_predict_streams_a_batch_at_a_time(run, tiny_folder, tmp_path):
    """Files are read only when their batch comes: files deleted after the first batch become error rows."""
    folder = tmp_path / "many"
    shutil.copytree(tiny_folder / "test" / "bird", folder)
    files = sorted(folder.iterdir())
    rows = predict_paths(run_predictor(load_run(run)), files, batch_size=4, workers=0)
    first = [next(rows) for _ in range(4)]
    for f in files[4:]:
        f.unlink()
    rest = list(rows)
    assert all(r["error"] is None for r in first)
    assert len(rest) == 6 and all(r["error"] for r in rest)


def test_console_output_without_out(run, tiny_folder, capsys):
    images = sorted((tiny_folder / "test" / "bird").iterdir())[:2]
    assert main(["predict", str(run), *map(str, images), "--topk", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == list(map(str, images))
    assert all(len(line.split(": ")[1].split(", ")) == 2 for line in lines)


def test_a_grayscale_image_predicts(run, tmp_path, capsys):
    Image.fromarray(np.full((40, 50), 128, dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    assert main(["predict", str(run), str(tmp_path / "gray.png"), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["error"] is None and row["image"] == str(tmp_path / "gray.png")


def test_a_bf16_run_predicts_in_fp32_on_the_cpu_like_its_export(run, tiny_folder):
    """A run trained with bf16 autocast still predicts in fp32 on the CPU, so its rows equal its ONNX file's."""
    files = sorted((tiny_folder / "test" / "bird").iterdir())[:6]
    trained = load_run(run)
    trained.config = dataclasses.replace(trained.config, precision="bf16")
    rows = list(predict_paths(run_predictor(trained), files, workers=0))
    fp32 = list(predict_paths(run_predictor(trained, precision="fp32"), files, workers=0))
    bf16 = list(predict_paths(run_predictor(trained, precision="bf16"), files, workers=0))
    assert [r["top"] for r in rows] == [r["top"] for r in fp32]
    assert [r["top"] for r in rows] != [r["top"] for r in bf16]
