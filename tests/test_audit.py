import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from imgcls.cli import main
from imgcls.data.audit import (
    NEAR_DISTANCE,
    audit,
    difference_hash,
    hamming,
    near_pairs,
    quick_audit,
    suggest_command,
)
from imgcls.data.datasets import Split, load_dataset


def _png(array: np.ndarray, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _hwc(split, i) -> np.ndarray:
    return split.images[i].permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def planted(tmp_path_factory, mini):
    """train/ and test/ of two classes from distinct cifar10-mini images, plus three copies of train
    images in test/: the same file, a JPEG re-encode at quality 70, a 40 px resize."""
    root = tmp_path_factory.mktemp("planted")
    for split, source, n in (("train", mini.train, 12), ("test", mini.test, 4)):
        for cls in (0, 1):
            idx = np.flatnonzero(source.labels.numpy() == cls)[:n]
            for k, i in enumerate(idx):
                _png(_hwc(source, i), root / split / mini.classes[cls] / f"{k:02d}.png")
    train_dir, test_dir = root / "train" / mini.classes[0], root / "test" / mini.classes[0]
    shutil.copy(train_dir / "00.png", test_dir / "copy.png")
    Image.open(train_dir / "01.png").save(test_dir / "reencoded.jpg", quality=70)
    Image.open(train_dir / "02.png").resize((40, 40), Image.Resampling.BICUBIC).save(test_dir / "resized.png")
    return root


def _names(pair) -> set[str]:
    """{'class/file', 'class/file'} of a pair."""
    return {"/".join(Path(pair[k]["file"]).parts[-2:]) for k in ("a", "b")}


def test_planted_duplicates_are_found_as_leakage_and_nothing_else(planted, mini):
    report = audit(str(planted), progress=False).report
    a = mini.classes[0]
    exact, near = report["exact_duplicates"], report["near_duplicates"]
    assert [_names(p) for p in exact["pairs"]] == [{f"{a}/00.png", f"{a}/copy.png"}]
    # the re-encoded and the resized copy, and no pair of the 32 distinct images (16 of each class)
    assert sorted(map(sorted, map(_names, near["pairs"]))) == [[f"{a}/01.png", f"{a}/reencoded.jpg"],
                                                               [f"{a}/02.png", f"{a}/resized.png"]]
    assert exact["leakage"] == 1 and near["leakage"] == 2
    assert all(p["cross_split"] and p["same_label"] for p in exact["pairs"] + near["pairs"])
    assert all(p["distance"] <= NEAR_DISTANCE for p in near["pairs"])
    assert report["counts"]["test"][a] == 7 and report["imbalance_ratio"] == 1.0
    assert any(w.startswith("leakage: 1 exact") for w in report["warnings"])


def _cmyk_jpeg(path):
    Image.new("CMYK", (40, 40), (10, 200, 30, 0)).save(path)


def _rotated_jpeg(path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path, exif=exif)


def test_file_findings(tmp_path, mini):
    for k in range(3):
        for cls in (0, 1):
            _png(_hwc(mini.train, 10 * k + cls), tmp_path / f"c{cls}" / f"ok{k}.png")
    odd = tmp_path / "c0"
    Image.fromarray(_hwc(mini.train, 40)[..., 0]).save(odd / "gray.png")
    Image.fromarray(np.dstack([_hwc(mini.train, 41), np.full((32, 32), 128, np.uint8)])).save(odd / "alpha.png")
    Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 20).astype(np.uint16)).save(odd / "deep.png")
    _cmyk_jpeg(odd / "cmyk.jpg")
    _rotated_jpeg(odd / "rotated.jpg")
    Image.fromarray(_hwc(mini.train, 42)[:8, :8]).save(odd / "tiny.png")
    Image.fromarray(np.zeros((20, 200, 3), np.uint8) + 90).save(odd / "wide.png")
    (odd / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    report = audit(str(tmp_path), img_size=32, progress=False).report
    files = report["files"]
    named = {k: {Path(f["file"]).name for f in v["files"]} for k, v in files.items() if isinstance(v, dict)
             and "files" in v}
    assert named["unreadable"] == {"broken.jpg"}
    assert named["small"] == {"tiny.png"}  # under half of --img-size 32
    assert named["extreme_aspect"] == {"wide.png"}
    assert named["exif_rotated"] == {"rotated.jpg"}
    kinds = {Path(f["file"]).name: f["kind"] for f in files["unusual_mode"]["files"]}
    assert kinds == {"gray.png": "grayscale", "alpha.png": "alpha (RGBA)", "deep.png": "16-bit or more",
                     "cmyk.jpg": "CMYK"}
    assert report["counts"]["train"] == {"c0": 10, "c1": 3}  # the broken file is not counted
    assert any("unreadable" in w for w in report["warnings"])


def test_difference_hash_bits_and_hamming():
    ramp = Image.fromarray((np.arange(36, dtype=np.uint8)[None, :, None] * 7).repeat(36, 0).repeat(3, 2))
    up, down = difference_hash(ramp), difference_hash(ramp.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    assert up == np.uint64(2**64 - 1) and down == 0  # brighter to the right: every bit set
    assert hamming(np.array([up]), np.array([down])).tolist() == [64]
    assert hamming(np.array([0b1011], np.uint64), np.array([0b0001], np.uint64)).tolist() == [2]
    # the first row's first pair is the highest bit: only that pair brighter to the right
    one = np.full((8, 9), 100, np.uint8)
    one[0, 1] = 200
    assert difference_hash(Image.fromarray(one)) == np.uint64(1 << 63)


def test_band_search_finds_every_close_pair_a_full_comparison_finds():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, 3000, dtype=np.int64).astype(np.uint64)
    for i in range(0, 300, 3):  # plant neighbours at 0..6 flipped bits
        flips = rng.choice(64, size=i % 7, replace=False)
        hashes[i + 1] = hashes[i] ^ np.uint64(sum(1 << int(b) for b in flips))
    pairs, distance = near_pairs(hashes, 4)
    i, j = np.triu_indices(len(hashes), 1)
    full = hamming(hashes[i], hashes[j])
    expected = {(a, b) for a, b, d in zip(i.tolist(), j.tolist(), full.tolist(), strict=True) if d <= 4}
    assert {tuple(p) for p in pairs.tolist()} == expected and len(expected) > 50
    assert distance.max() <= 4


def test_quick_audit_warns_on_leakage_and_imbalance(mini):
    assert quick_audit(mini) == []
    keep = torch.cat([torch.nonzero(mini.train.labels != 0).flatten(),
                      torch.nonzero(mini.train.labels == 0).flatten()[:50]])
    leaked = Split(torch.cat([mini.test.labels, mini.train.labels[:3]]),
                   images=torch.cat([mini.test.images, mini.train.images[:3]]))
    data = dataclasses.replace(mini, train=mini.train.subset(keep), test=leaked)
    warnings = quick_audit(data)
    assert len(warnings) == 2
    assert warnings[0].startswith("leakage: 3 image(s) of test also appear in train")
    assert warnings[1].startswith("imbalance:") and "(airplane)" in warnings[1]


def test_the_leakage_hint_names_the_data_as_a_command_can_find_it(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tmp_path / "my data" / split / cls).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        for cls in ("a", "b"):
            pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "my data" / "train" / cls / f"{i}.png")
            if i == 0:  # the copy that leaks
                Image.fromarray(pixels).save(tmp_path / "my data" / "test" / cls / "copy.png")
    warning = next(w for w in quick_audit(load_dataset(str(tmp_path / "my data"), img_size=16)) if "leakage" in w)
    assert f"run imgcls audit '{tmp_path / 'my data'}' to list them" in warning


def test_suggestion_follows_the_imbalance():
    assert suggest_command("d", None, 2.0) == "imgcls train --data d"
    assert "--class-weights auto" in suggest_command("d", None, 4.0)
    s = suggest_command("d", None, 20.0)
    assert "--sampler balanced" in s and "--class-weights" not in s


def test_cli_writes_json_and_html(planted, tmp_path, capsys):
    out = tmp_path / "a.json"
    assert main(["audit", str(planted), "--out", str(out), "--html", "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["exact_duplicates"]["count"] == 1
    page = (tmp_path / "a.html").read_text()
    assert page.count("data:image/png;base64") == 2 * 3  # a thumbnail for each image of the 3 pairs
    assert "suggested: imgcls train --data" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["audit", "{tmp}/missing"], "does not exist"),
    (["audit", "cifar10-mini", "--img-size", "3"], "--img-size"),
    (["audit", "cifar10-mini", "--out", "{tmp}/report.txt"], "should end in .json"),
    (["audit", "cifar10-mini", "--out", "{tmp}/no/such/dir/a.json"], "does not exist"),
    (["audit", "cifar10-mini", "--max-distance", "40"], "--max-distance"),
    (["audit", "{tmp}", "--data-dir", "x"], "--data-dir is for"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgcls: error:") and message in err and err.count("\n") == 1


def test_an_html_out_with_html_is_refused_before_the_audit_runs(tmp_path, capsys):
    assert main(["audit", "cifar10-mini", "--out", str(tmp_path / "report.html"), "--html", "--quiet"]) == 2
    out, err = capsys.readouterr()
    assert "should end in .json" in err and out == ""  # no audit printed: refused before the work


def test_copies_of_real_photos_are_found_and_distinct_photos_are_not_paired(tmp_path):
    """The 32 x 32 thumbnail's area hash missed 3 of 40 JPEG re-encodes of real photos at the default 4 bits,
    where imagehash's dHash found all (bench/near_duplicates.py): a hash of the decoded image finds them all."""
    data = os.environ.get("IMGCLS_DATA")
    photos = sorted(Path(data, "cats-vs-dogs", "train").rglob("*.jpg")) if data else []
    if len(photos) < 200:
        pytest.skip("needs IMGCLS_DATA with the Cats-vs-Dogs folder")
    photos = photos[:: len(photos) // 100][:100]
    planted = set()
    for i, photo in enumerate(photos):
        original = tmp_path / ("a" if i % 2 else "b") / f"{i:03d}.png"
        original.parent.mkdir(exist_ok=True)
        img = Image.open(photo).convert("RGB")
        img.save(original)
        copy = original.with_name(f"{i:03d}-copy" + (".jpg", ".png", ".png")[i % 3])
        if i % 3 == 0:
            img.save(copy, quality=70)
        elif i % 3 == 1:
            ImageEnhance.Brightness(img).enhance(1.15).save(copy)
        else:
            img.resize((round(img.width * 0.8), round(img.height * 0.8)), Image.Resampling.BICUBIC).save(copy)
        planted.add(frozenset((original.name, copy.name)))
    found = {frozenset(Path(p[k]["file"]).name for k in ("a", "b"))
             for p in audit(str(tmp_path), progress=False).report["near_duplicates"]["pairs"]}
    assert found == planted
