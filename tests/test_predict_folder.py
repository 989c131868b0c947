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
from imgcls.data.preprocessing import normalize
from imgcls.data.presets import tta_views
from imgcls.inference.files import collect_paths, load_images, predict_rows
from imgcls.inference.run import load_run, run_engine
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
    with open(out) as f:
        header = next(csv.reader(f))
    assert header == ["path", "label", "confidence", "rejected", "energy", "top1", "top1_prob", "top2", "top2_prob",
                      "top3", "top3_prob", "error"]
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


def _bare_probs(trained, images_nhwc):
    """The bare model's softmax over uint8 N x H x W x 3 images: no engine, no batching, no DataLoader."""
    x = normalize(images_nhwc.permute(0, 3, 1, 2), trained.dataset["mean"], trained.dataset["std"])
    with torch.inference_mode():
        return trained.model(x).double().softmax(1)


def test_rows_match_the_runs_own_predict(run, tiny_folder):
    """The folder path (decoded in batches of 4 by the DataLoader) and the per-file path (each file decoded
    alone and scored by the bare model) give the same probabilities: one preprocessing."""
    files = sorted((tiny_folder / "test" / "automobile").iterdir())
    trained = load_run(run)
    engine = run_engine(trained, batch_size=4)
    rows = list(predict_rows(engine, files, topk=3, workers=0))
    assert len(rows) == len(files) == 10 and [r["path"] for r in rows] == list(map(str, files))
    for row, file in zip(rows, files, strict=True):
        expected = _bare_probs(trained, load_images([file], trained.preprocessing))[0]
        order = expected.argsort(descending=True)[:3]
        assert [t["class"] for t in row["top"]] == [trained.classes[i] for i in order]
        assert np.allclose([t["probability"] for t in row["top"]], expected[order].numpy(), atol=1e-5)
        assert row["label"] == row["top"][0]["class"] and row["rejected"] is False


def test_a_row_carries_the_energy_of_the_plain_views_logits(run, tiny_folder):
    files = sorted((tiny_folder / "test" / "bird").iterdir())[:3]
    trained = load_run(run)
    x = normalize(load_images(files, trained.preprocessing).permute(0, 3, 1, 2), trained.dataset["mean"],
                  trained.dataset["std"])
    with torch.inference_mode():
        energy = torch.logsumexp(trained.model(x).double(), dim=1)  # the unmirrored view only
    engine = run_engine(trained)
    plain = list(predict_rows(engine, files, workers=0))
    for tta in ("flip", 4):  # --tta 4's views are all random: the energy was a random crop's
        rows = list(predict_rows(engine, files, tta=tta, workers=0))
        assert [r["energy"] for r in rows] == pytest.approx(energy.tolist(), abs=1e-4), tta
    assert list(rows[0]) == ["path", "label", "confidence", "rejected", "energy", "top", "error"]
    assert [r["top"] for r in rows] != [r["top"] for r in plain]  # the 4 views still make the probabilities


def test_files_folders_globs_and_a_list_mix(tiny_folder, tmp_path):
    test = tiny_folder / "test"
    one = sorted((test / "bird").iterdir())[0]
    listed = tmp_path / "list.txt"
    listed.write_text(f"{one}\n\n{sorted((test / 'airplane').iterdir())[1]}\n")
    paths = collect_paths([str(one), str(test / "automobile"), str(test / "airplane" / "*.png")], str(listed))
    assert paths[0] == one and len(paths) == 1 + 10 + 5 + 2
    assert paths[1:11] == sorted((test / "automobile").iterdir())


def test_a_listed_file_that_is_missing_is_an_error_row(run, tiny_folder, tmp_path):
    # changed: a path in --list that does not exist is no longer refused; it becomes a row with an error
    good = sorted((tiny_folder / "test" / "bird").iterdir())[0]
    missing = tmp_path / "gone.png"
    listed = tmp_path / "list.txt"
    listed.write_text(f"{good}\n{missing}\n")
    assert collect_paths([], str(listed)) == [good, missing]
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run), "--list", str(listed), "--out", str(out), "--quiet"]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [r["path"] for r in rows] == [str(good), str(missing)]
    assert rows[0]["error"] == "" and rows[0]["label"] in {"airplane", "automobile", "bird"}
    assert "does not exist" in rows[1]["error"] and rows[1]["label"] == "" and rows[1]["energy"] == ""


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


def test_reject_off_accepts_everything(run, tiny_folder, tmp_path):
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(run), str(tiny_folder / "test"), "--reject", "off", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 30 and not any(r["rejected"] for r in rows) and "unknown" not in {r["label"] for r in rows}
    assert main(["predict", str(run), str(tiny_folder / "test"), "--reject", "1", "--out", str(out), "--quiet"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["rejected"] and r["label"] == "unknown" for r in rows)  # nothing reaches probability 1


def test_tta_flip_averages_the_image_and_its_mirror(run, tiny_folder):
    files = sorted((tiny_folder / "test" / "bird").iterdir())[:4]
    trained = load_run(run)
    engine = run_engine(trained)
    rows = list(predict_rows(engine, files, topk=3, tta="flip", workers=0))
    images = load_images(files, trained.preprocessing).permute(0, 3, 1, 2)  # uint8 N x 3 x H x W
    views = torch.cat(tta_views(images, "flip", trained.recipe, torch.Generator()))
    expected = _bare_probs(trained, views.permute(0, 2, 3, 1)).view(2, 4, -1).mean(0)
    for row, probs in zip(rows, expected, strict=True):
        assert row["top"][0]["probability"] == pytest.approx(probs.max().item(), abs=1e-5)
    plain = list(predict_rows(engine, files, topk=3, workers=0))
    gaps = [abs(a["top"][0]["probability"] - b["top"][0]["probability"]) for a, b in zip(rows, plain, strict=True)]
    assert max(gaps) > 1e-6  # the mirror changed something


def test_predict_streams_a_batch_at_a_time(run, tiny_folder, tmp_path):
    """Files are read only when their batch comes: files deleted after the first batch become error rows."""
    folder = tmp_path / "many"
    shutil.copytree(tiny_folder / "test" / "bird", folder)
    files = sorted(folder.iterdir())
    engine = run_engine(load_run(run), batch_size=4)
    assert engine.batch_size == 4
    rows = predict_rows(engine, files, workers=0)
    first = [next(rows) for _ in range(4)]
    for f in files[4:]:
        f.unlink()
    rest = list(rows)
    assert all(r["error"] is None for r in first)
    assert len(rest) == 6 and all(r["error"] for r in rest)


def test_an_existing_out_file_is_replaced_whole_or_left_as_it_was(run, tiny_folder, tmp_path, capsys):
    from imgcls.reporting.predictions import write_rows

    out = tmp_path / "preds.csv"
    images = str(tiny_folder / "test" / "bird")
    assert main(["predict", str(run), images, "--out", str(out), "--quiet"]) == 0
    assert "replaced" not in capsys.readouterr().out
    before = out.read_bytes()
    assert main(["predict", str(run), images, "--out", str(out), "--quiet"]) == 0
    assert "(replaced the existing preds.csv)" in capsys.readouterr().out and out.read_bytes() == before

    def broken_rows():  # the writer dies after one row: the file it replaces must not be cut
        yield {"path": "a.png", "label": "bird", "confidence": 0.9, "rejected": False, "energy": 1.0,
               "top": [{"class": "bird", "probability": 0.9}], "error": None}
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        write_rows(broken_rows(), out, topk=1)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["preds.csv"]
    rows = [{"path": "a.png", "label": None, "confidence": None, "rejected": None, "energy": None, "top": [],
             "error": "FileNotFoundError: a.png does not exist"}]
    counts = write_rows(iter(rows), tmp_path / "new.jsonl", topk=1)
    assert counts == {"images": 1, "errors": 1, "rejected": 0, "replaced": False}


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


def test_predict_runs_at_the_plans_inference_precision(run, tiny_folder):
    """Changed: a run's inference precision is its plan's eval_precision (auto: as training), no longer fp32
    whatever the training precision. A bf16-trained run planned to infer in fp32 gives its export's rows; one
    planned to infer in bf16 does not."""
    files = sorted((tiny_folder / "test" / "bird").iterdir())[:6]
    trained = load_run(run)
    fp32 = list(predict_rows(run_engine(trained, precision="fp32"), files, workers=0))
    bf16 = list(predict_rows(run_engine(trained, precision="bf16"), files, workers=0))
    assert [r["top"] for r in fp32] != [r["top"] for r in bf16]
    trained.config = dataclasses.replace(trained.config, precision="bf16", eval_precision="fp32")
    engine = run_engine(trained)
    assert engine.precision == "fp32"
    assert [r["top"] for r in predict_rows(engine, files, workers=0)] == [r["top"] for r in fp32]
    trained.config = dataclasses.replace(trained.config, precision="bf16", eval_precision="bf16")
    engine = run_engine(trained)
    assert engine.precision == "bf16"
    assert [r["top"] for r in predict_rows(engine, files, workers=0)] == [r["top"] for r in bf16]


def test_predict_never_writes_into_a_folder_it_reads_nor_through_a_link_onto_an_image(tiny_folder, tmp_path,
                                                                                      one_epoch_run, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_folder / "test", data)
    image = sorted(data.rglob("*.png"))[0]
    before = image.read_bytes()
    assert main(["predict", str(one_epoch_run), str(data), "--out", str(data / "airplane" / "rows.csv")]) == 2
    assert "lies inside" in capsys.readouterr().err and not (data / "airplane" / "rows.csv").exists()
    (tmp_path / "l.csv").symlink_to(image)
    other = sorted(data.rglob("*.png"))[1]  # predict one image, the link names another
    assert main(["predict", str(one_epoch_run), str(other), "--out", str(tmp_path / "l.csv")]) == 2
    assert "a link to" in capsys.readouterr().err and image.read_bytes() == before
