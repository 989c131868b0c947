"""WebDataset shards: written whole and read back exactly, split over ranks and workers without overlap,
resumed at the sample, checked as they are read, and trained on as the folder they came from."""

import json
import math
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds

from imgcls import rundir
from imgcls.cli import main
from imgcls.data import load_dataset
from imgcls.data.shards import MANIFEST, chunk_batches, epoch_chunks, read_shards, write_shards
from imgcls.errors import UserError
from imgcls.training.train import Interrupted, fit
from tests.conftest import run_metrics, tiny_config


@pytest.fixture(scope="module")
def folder_data(tiny_folder):
    return load_dataset(str(tiny_folder), img_size=32)


@pytest.fixture(scope="module")
def shards(folder_data, tmp_path_factory):
    """The tiny folder (108 train, 12 val carved, 30 test) as shards of 25 samples."""
    out = tmp_path_factory.mktemp("shards") / "tiny"
    write_shards(folder_data, out, shard_size=25, seed=0)
    return out


def one_line(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_shards_hold_every_split_exactly_and_webdataset_reads_them(shards, folder_data):
    manifest, splits = read_shards(str(shards))
    assert {n: p["count"] for n, p in manifest["splits"].items()} == {"train": 108, "val": 12, "test": 30}
    assert [f.count for f in splits["train"].files] == [25, 25, 25, 25, 8]
    data = load_dataset(str(shards))
    for name in ("train", "val", "test"):
        theirs, ours = getattr(folder_data, name), getattr(data, name)
        order = torch.randperm(len(theirs), generator=torch.Generator().manual_seed(0))  # the order they were written
        images, labels = zip(*ours.batches(torch.arange(len(ours)), 10), strict=True)
        assert torch.equal(torch.cat(images), theirs.images[order])
        assert torch.equal(torch.cat(labels), theirs.labels[order])
    samples = list(wds.WebDataset(str(shards / "train-{000000..000004}.tar"), shardshuffle=False))
    assert len(samples) == 108 and samples[0]["__key__"] == "train-00000000"
    assert [int(s["cls"]) for s in samples] == data.train.labels.tolist()


def test_an_epoch_deals_each_rank_its_own_samples_in_one_order_whatever_the_workers(shards):
    _, splits = read_shards(str(shards))
    train, labels = splits["train"], splits["train"].labels
    index = torch.arange(108)  # labelled by their own index: the batches say which samples came
    seen = []
    for rank in (0, 1):
        chunks = epoch_chunks(train, seed=5, rank=rank, world=2, done=0)
        runs = [torch.cat([y for _, y in chunk_batches(train, chunks, index, 10, workers)]) for workers in (0, 2)]
        assert torch.equal(runs[0], runs[1])  # the order does not depend on the worker count
        seen.append(runs[0])
    assert [len(s) for s in seen] == [54, 54]
    assert len(set(torch.cat(seen).tolist())) == 108  # no sample twice across ranks
    other = torch.cat([y for _, y in chunk_batches(train, epoch_chunks(train, 6, 0, 2, 0), index, 10, 0)])
    assert not torch.equal(other, seen[0])  # another epoch, another order
    assert labels.shape == index.shape


def test_a_resumed_epoch_continues_at_the_sample(shards):
    _, splits = read_shards(str(shards))
    train = splits["train"]
    index = torch.arange(108)
    whole = torch.cat([y for _, y in chunk_batches(train, epoch_chunks(train, 3, 0, 1, 0), index, 12, 0)])
    for done in (0, 12, 24, 36, 60):  # within a shard and across its boundary
        rest = torch.cat([y for _, y in chunk_batches(train, epoch_chunks(train, 3, 0, 1, done), index, 12, 0)])
        assert torch.equal(rest, whole[done:])


def test_training_on_shards_resumes_exactly_and_learns_as_the_folder_does(shards, tiny_folder, tmp_path):
    straight = fit(tiny_config(shards, tmp_path / "straight", epochs=3))
    with pytest.raises(Interrupted):
        fit(tiny_config(shards, tmp_path / "resumed", epochs=3), stop_after_steps=6)  # inside epoch 2
    resumed = fit(resume=tmp_path / "resumed")
    assert run_metrics(resumed) == run_metrics(straight)
    learned = {data: fit(tiny_config(data, tmp_path / f"learn-{k}", epochs=8, lr=0.01))
               for k, data in enumerate((shards, tiny_folder))}  # a rate at which 108 images teach something
    accuracy = [json.loads((run / rundir.SUMMARY).read_text())["test_acc"] for run in learned.values()]
    assert min(accuracy) > 0.45 and abs(accuracy[0] - accuracy[1]) <= 0.2, accuracy  # 3 classes: chance is 1/3


def test_the_shard_command_writes_a_new_folder_whole(tiny_folder, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["shard", str(tiny_folder), "--out", str(out), "--img-size", "32", "--shard-size", "50",
                 "--quiet"]) == 0
    assert "train 108 in 3 shards" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "test-000000.tar", "train-000000.tar",
                                                     "train-000001.tar", "train-000002.tar", "val-000000.tar"]
    assert not list(tmp_path.glob(".s*"))  # no staging folder left
    assert "exists; shards are written into a new folder" in one_line(capsys, ["shard", str(tiny_folder), "--out",
                                                                               str(out), "--quiet"])
    assert "--shard-size must be from 1" in one_line(capsys, ["shard", str(tiny_folder), "--out", str(tmp_path / "t"),
                                                              "--shard-size", "0"])


def _copy(shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    return copy


def _patch_member(tar_path, member_name, value: bytes):
    """One member's content overwritten in place by as many bytes: the file keeps its size."""
    with tarfile.open(tar_path) as tar:
        member = tar.getmember(member_name)
    assert member.size == len(value)
    with open(tar_path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(value)


def test_damaged_shards_are_refused_in_one_line(shards, tmp_path, capsys):
    copy = _copy(shards, tmp_path)
    with open(copy / "train-000001.tar", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(UserError, match=r"train-000001.tar is damaged: it has 4096 bytes, the manifest \d+"):
        load_dataset(str(copy))

    copy = _copy(shards, tmp_path / "b")
    _, splits = read_shards(str(copy))
    label = int(splits["train"].labels[30])
    _patch_member(copy / "train-000001.tar", "train-00000030.cls", str((label + 1) % 3).encode())
    data = load_dataset(str(copy))  # the sizes agree: caught as the sample is read
    with pytest.raises(UserError, match="sample 30 has class"):
        list(data.train.batches(torch.arange(108), 50))

    copy = _copy(shards, tmp_path / "c")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["classes"] = manifest["classes"][::-1]  # a hand edit that would swap every label
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="was edited after imgcls wrote it"):
        load_dataset(str(copy))


def test_brace_patterns_name_whole_splits(shards, tmp_path, capsys):
    data = load_dataset(str(shards / "{train-{000000..000004},val-000000}.tar"))
    assert (len(data.train), len(data.val), data.test) == (108, 12, None)
    with pytest.raises(UserError, match="names part of the train shards"):
        load_dataset(str(shards / "train-{000000..000002}.tar"))
    with pytest.raises(UserError, match="no val shards"):
        load_dataset(str(shards / "train-{000000..000004}.tar"))
    assert len(load_dataset(str(shards / "train-{000000..000004}.tar"), val_fraction=0.0).train) == 108
    with pytest.raises(UserError, match="does not list"):
        load_dataset(str(shards / "{train-{000000..000004},other}.tar"))
    err = one_line(capsys, ["train", "--data", str(shards), "--model", "fastnet_cifar_small", "--sampler", "balanced",
                            "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet"])
    assert "--sampler chooses training images by index" in err
    err = one_line(capsys, ["train", "--data", str(shards), "--model", "fastnet_cifar_small", "--data-mode", "memory",
                            "--epochs", "1", "--out", str(tmp_path / "r"), "--quiet"])
    assert "--data-mode memory holds images decoded in memory" in err
    assert not (tmp_path / "r").exists()


def test_eval_predict_and_audit_read_shards_as_the_folder_they_came_from(shards, one_epoch_run, tiny_folder,
                                                                         tmp_path, capsys):
    run = str(one_epoch_run)
    results = {}
    for name, data in (("folder", tiny_folder), ("shards", shards)):
        out = tmp_path / f"eval-{name}.json"
        assert main(["eval", run, "--data", str(data), "--split", "test", "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    for target in (shards / MANIFEST, shards / "other.json"):  # never into the data it reads
        err = one_line(capsys, ["eval", run, "--data", str(shards), "--out", str(target)])
        assert f"lies inside {shards}" in err, err
    assert json.loads((shards / MANIFEST).read_text())["format"] == "imgcls-shards/1"
    for key in ("accuracy", "loss"):  # the same 30 images, in another order
        assert results["shards"][key] == pytest.approx(results["folder"][key], rel=1e-6)

    rows_path = tmp_path / "rows.jsonl"
    assert main(["predict", run, str(shards), "--out", str(rows_path), "--quiet"]) == 0
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert len(rows) == 150 and rows[0]["path"] == f"{shards / 'train-000000.tar'}#train-00000000"
    _, splits = read_shards(str(shards))
    classes = load_dataset(str(shards)).classes
    test_rows = [r for r in rows if "#test-" in r["path"]]
    truth = [classes[y] for y in splits["test"].labels.tolist()]
    nll = [-math.log(next(t["probability"] for t in r["top"] if t["class"] == c))  # top 3 of 3: every class
           for r, c in zip(test_rows, truth, strict=True)]
    assert sum(nll) / len(nll) == pytest.approx(results["folder"]["loss"], rel=1e-5)  # eval's loss, per image
    assert "predict one shard set at a time" in one_line(capsys, ["predict", run, str(shards), str(tiny_folder)])
    capsys.readouterr()
    assert main(["predict", run, str(shards / "test-{000000..000001}.tar"), "--json"]) == 0  # one split alone
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == [r["path"] for r in test_rows]

    leaky = tmp_path / "leaky"  # the folder with one training image copied into test
    shutil.copytree(tiny_folder, leaky)
    cls = sorted(p.name for p in (leaky / "train").iterdir())[0]
    shutil.copy(leaky / "train" / cls / "000.jpg", leaky / "test" / cls / "copy.jpg")
    assert main(["shard", str(leaky), "--out", str(tmp_path / "leaky-shards"), "--img-size", "32", "--quiet"]) == 0
    report = tmp_path / "audit.json"
    assert main(["audit", str(tmp_path / "leaky-shards"), "--out", str(report), "--html", "--quiet"]) == 0
    found = json.loads(report.read_text())
    assert found["counts"]["test"] == {c: 10 + (c == cls) for c in classes} and found["images"] == 151
    assert found["exact_duplicates"]["leakage"] == 1, found["exact_duplicates"]
    pair = found["exact_duplicates"]["pairs"][0]
    assert (pair["a"]["split"], pair["b"]["split"], pair["a"]["class"]) == ("train", "test", cls)
    assert report.with_suffix(".html").stat().st_size > 0
    assert "audit --labels the folder or manifest the shards were written from" in one_line(
        capsys, ["audit", str(tmp_path / "leaky-shards"), "--labels", "--out", str(tmp_path / "labels.json")])


def test_a_killed_shard_command_leaves_no_folder_and_the_next_one_clears_its_stage(tmp_path):
    out = tmp_path / "mini"
    cmd = [sys.executable, "-m", "imgcls", "shard", "cifar10-mini", "--out", str(out), "--shard-size", "200", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None and not list(tmp_path.glob(".mini*/train-000001.tar")):
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=60)
    if not list(tmp_path.glob(".mini*")):
        pytest.skip("the shards were written before the kill")
    assert not out.exists()  # the staged folder is never the result
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    assert [p.name for p in tmp_path.iterdir()] == ["mini"]  # the stale stage removed
    assert load_dataset(str(out), val_fraction=0.0).train.labels.shape == (4500,)


def test_jpeg_shards_hold_the_images_to_within_a_few_levels(tiny_folder, folder_data, tmp_path):
    out = tmp_path / "jpg"
    assert main(["shard", str(tiny_folder), "--out", str(out), "--img-size", "32", "--image-format", "jpg",
                 "--quiet"]) == 0
    data = load_dataset(str(out))
    assert json.loads((out / MANIFEST).read_text())["image_format"] == "jpg"
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    images = torch.cat([x for x, _ in data.test.batches(torch.arange(30), 8)])
    error = (images.float() - folder_data.test.images[order].float()).abs()
    assert 0 < error.mean() < 2.0 and torch.equal(data.test.labels, folder_data.test.labels[order])
    assert [s["__key__"] for s in wds.WebDataset(str(out / "test-000000.tar"), shardshuffle=False)
            if "jpg" in s][:2] == ["test-00000000", "test-00000001"]


def test_two_processes_train_on_shards_each_on_its_own_range(shards, tmp_path):
    from tests.test_distributed import torchrun

    out = tmp_path / "ddp"
    done = torchrun("--data", str(shards), "--out", str(out), "--model", "fastnet_cifar_small", "--epochs", "2",
                    "--batch-size", "24", "--precision", "fp32", "--quiet", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / rundir.SUMMARY).read_text())
    assert summary["processes"] == 2 and [m["epoch"] for m in rundir.read_metrics(out)] == [1, 2]
    assert all(math.isfinite(m["train_loss"]) for m in rundir.read_metrics(out))


def test_a_shard_damaged_anywhere_is_one_line_naming_it(tiny_folder, shards, tmp_path, capsys):
    def refused(copy: Path) -> str:
        return one_line(capsys, ["audit", str(copy), "--out", str(tmp_path / "a.json"), "--quiet"])

    copy = _copy(shards, tmp_path / "header")
    with open(copy / "train-000000.tar", "r+b") as f:  # the first member's header checksum no longer holds
        f.seek(100)
        f.write(b"7777")
    assert "train-000000.tar is damaged: it does not read as a tar file" in refused(copy)

    copy = _copy(shards, tmp_path / "cls")
    _patch_member(copy / "train-000000.tar", "train-00000003.cls", b"x")
    assert "train-000000.tar is damaged: sample 3 has class 'x'" in refused(copy)

    jpg = tmp_path / "jpg"  # JPEG decoders take a changed byte in the scan data: the digest does not
    assert main(["shard", str(tiny_folder), "--out", str(jpg), "--img-size", "32", "--image-format", "jpg",
                 "--quiet"]) == 0
    _flip_a_scan_byte(jpg / "test-000000.tar", "test-00000004.jpg")
    assert "test-000000.tar is damaged: its sha256 is not the manifest's" in refused(jpg)


def _flip_a_scan_byte(tar_path: Path, member_name: str) -> None:
    with tarfile.open(tar_path) as tar:
        member = tar.getmember(member_name)
    with open(tar_path, "r+b") as f:
        f.seek(member.offset_data + member.size - 40)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))


def test_a_rank_reading_part_of_a_changed_shard_refuses_it_in_one_line(tiny_folder, tmp_path):
    jpg = tmp_path / "jpg"
    assert main(["shard", str(tiny_folder), "--out", str(jpg), "--img-size", "32", "--shard-size", "25",
                 "--image-format", "jpg", "--quiet"]) == 0
    train = read_shards(str(jpg))[1]["train"]
    ranks = [epoch_chunks(train, seed=1, rank=rank, world=2, done=0) for rank in (0, 1)]
    shared = {c.shard for c in ranks[0]} & {c.shard for c in ranks[1]}  # the shard the cut between ranks falls in
    assert len(shared) == 1
    (k,) = shared
    _flip_a_scan_byte(jpg / f"train-{k:06d}.tar", f"train-{train.files[k].first:08d}.jpg")  # that shard alone
    for chunks in ranks:  # each rank reads a part of it
        with pytest.raises(UserError, match=f"train-{k:06d}.tar is damaged: its sha256 is not the manifest's") as e:
            list(chunk_batches(train, chunks, train.labels, 10, workers=2))  # in DataLoader workers
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value)


def test_a_pattern_or_a_count_the_files_cannot_back_is_refused_before_reading(shards, tmp_path):
    with pytest.raises(UserError, match="has a range of over 100000 names"):
        load_dataset(str(shards / "train-{000000..999999999}.tar"))  # braceexpand would make it a list first
    with pytest.raises(UserError, match="names train-000005.tar, which .* does not list"):
        load_dataset(str(shards / "train-{000000..099999}.tar"))  # refused at the first unknown name
    with pytest.raises(UserError, match="expands to over 100000 names"):
        load_dataset(str(shards / ("train-000000" + "{,}" * 17 + ".tar")))
    copy = _copy(shards, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    part = manifest["splits"]["test"]
    part["shards"][0]["count"] = 10**6  # counts that add up, and a seal made again
    part["labels"] = [0] * sum(e["count"] for e in part["shards"])
    rundir.write_sealed_json(copy / MANIFEST, manifest)
    with pytest.raises(UserError, match=r"bytes cannot hold the 1000000 samples its manifest says"):
        load_dataset(str(copy))


def test_shards_train_at_their_own_size_unless_told_otherwise(tiny_folder, tmp_path, capsys):
    data = tmp_path / "s40"
    assert main(["shard", str(tiny_folder), "--out", str(data), "--img-size", "40", "--quiet"]) == 0
    run = fit(tiny_config(data, tmp_path / "r", epochs=1, img_size=None))
    assert rundir.read_json(run / "dataset.json")["img_size"] == 40
    err = one_line(capsys, ["train", "--data", str(data), "--img-size", "32", "--out", str(tmp_path / "r32"),
                            "--quiet"])
    assert "holds 40 px images, not 32 px: train at 40 px (--img-size 40)" in err and not (tmp_path / "r32").exists()


def test_two_shard_commands_into_one_out_leave_the_first_and_say_so(folder_data, tmp_path, capsys):
    out = tmp_path / "same"

    def another_writer(line):  # while this one writes, another finishes first
        if not out.exists():
            write_shards(folder_data, out, shard_size=50)

    with pytest.raises(UserError, match="was written meanwhile by another process"):
        write_shards(folder_data, out, shard_size=25, say=another_writer)
    assert [f.count for f in read_shards(str(out))[1]["train"].files] == [50, 50, 8]  # the first, whole
    assert [p.name for p in tmp_path.iterdir()] == ["same"]  # no stage left
    assert "--split-seed must be >= 0" in one_line(capsys, ["shard", "cifar10-mini", "--out", str(tmp_path / "x"),
                                                           "--split-seed", "-5"])
