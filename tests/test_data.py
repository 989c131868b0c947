import builtins
import io
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import rundir
from imgcls.config import build_config
from imgcls.data import folder, load_dataset, normalize
from imgcls.data.augment import random_crop, random_hflip
from imgcls.data.cifar import load_cifar10, read_batch
from imgcls.data.presets import BatchAugment, PixelRecipe
from imgcls.errors import UserError
from imgcls.evaluation.analysis import analyze_run
from imgcls.inference.run import load_run
from imgcls.training.train import fit
from tests.conftest import shared_path


def test_mini_is_balanced_and_split_without_overlap(mini):
    assert mini.classes[0] == "airplane" and mini.num_classes == 10
    assert mini.train.images.dtype == torch.uint8 and mini.train.images.shape[1:] == (3, 32, 32)
    for split, per_class in ((mini.train, 450), (mini.val, 50), (mini.test, 100)):
        assert torch.bincount(split.labels, minlength=10).tolist() == [per_class] * 10
    # val is carved from train: no image appears in both
    train_rows = {bytes(x.numpy()) for x in mini.train.images[:500]}
    assert not any(bytes(x.numpy()) in train_rows for x in mini.val.images)


def test_split_is_deterministic_and_depends_on_split_seed():
    a, b = load_dataset("cifar10-mini"), load_dataset("cifar10-mini")
    assert torch.equal(a.val.images, b.val.images)
    c = load_dataset("cifar10-mini", split_seed=1)
    assert not torch.equal(a.val.images, c.val.images)
    assert a.fingerprint != c.fingerprint


def test_full_cifar10_loads():
    root = shared_path("cifar10")
    ds = load_dataset("cifar10", data_dir=str(root))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (45000, 5000, 10000)
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10
    assert ds.classes[-1] == "truck"


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/imgcls-pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    evil = tmp_path / "data_batch_1"
    evil.write_bytes(pickle.dumps({b"data": _RunsCode()}, protocol=2))
    Path("/tmp/imgcls-pwned").unlink(missing_ok=True)
    with pytest.raises(UserError, match="posix.system|os.system"):
        read_batch(evil)
    assert not Path("/tmp/imgcls-pwned").exists()


def test_restricted_unpickler_reads_a_real_style_batch(tmp_path):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": data, b"labels": [3, 7], b"filenames": [b"a", b"b"]}, protocol=2))
    batch = read_batch(path)
    assert np.array_equal(batch["data"], data) and batch["labels"] == [3, 7]


def test_missing_cifar_files_say_what_to_put_where(tmp_path):
    with pytest.raises(UserError) as e:
        load_cifar10(tmp_path, download=False)
    msg = str(e.value)
    assert "data_batch_1" in msg and "test_batch" in msg and str(tmp_path / "cifar-10-batches-py") in msg


def test_image_folder_with_splits(tiny_folder):
    ds = load_dataset(str(tiny_folder), img_size=24)
    assert ds.classes == ["airplane", "automobile", "bird"]
    assert ds.train.images.shape[1:] == (3, 24, 24)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (108, 12, 30)  # val carved 10% per class
    assert torch.bincount(ds.val.labels).tolist() == [4, 4, 4]


def test_class_folders_alone_get_a_stratified_split(tmp_path, tiny_folder):
    flat = tmp_path / "flat"
    for cls in ("airplane", "bird"):
        (flat / cls).mkdir(parents=True)
        for f in sorted((tiny_folder / "train" / cls).iterdir())[:20]:
            (flat / cls / f.name).write_bytes(f.read_bytes())
    ds = load_dataset(str(flat), img_size=32, val_fraction=0.25)
    assert ds.test is None
    assert torch.bincount(ds.val.labels).tolist() == [5, 5]
    assert torch.bincount(ds.train.labels).tolist() == [15, 15]


def test_corrupt_and_truncated_images_are_skipped_and_counted(tmp_path, tiny_folder, capsys):
    root = tmp_path / "broken"
    for cls in ("airplane", "bird"):
        (root / cls).mkdir(parents=True)
        for f in sorted((tiny_folder / "train" / cls).iterdir())[:10]:
            (root / cls / f.name).write_bytes(f.read_bytes())
    (root / "bird" / "garbage.jpg").write_bytes(b"not an image at all")
    good = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(good, "JPEG")
    (root / "airplane" / "cut.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    ds = load_dataset(str(root), img_size=32)
    err = capsys.readouterr().err
    assert "garbage.jpg" in err and "cut.jpg" in err and "skipped 2 unreadable image(s) of 22" in err
    assert len(ds.train) + len(ds.val) == 20


def test_streaming_gives_the_same_pixels_as_memory(tiny_folder):
    mem = load_dataset(str(tiny_folder), img_size=32, mode="memory")
    stream = load_dataset(str(tiny_folder), img_size=32, mode="stream", workers=0)
    assert stream.train.images is None
    order = torch.arange(len(mem.train))
    x_mem, y_mem = next(mem.train.batches(order, 16))
    x_str, y_str = next(stream.train.batches(order, 16))
    assert torch.equal(x_mem, x_str) and torch.equal(y_mem, y_str)


@pytest.mark.parametrize(
    "make, fix",
    [
        (lambda p: p / "nope", "does not exist"),
        (lambda p: (p / "only" / "cat").mkdir(parents=True) or p / "only", "only one class folder"),
        # test/ alone was read as a class named test: "only one class folder (test)" named the wrong problem
        (lambda p: [(p / "t" / "test" / c).mkdir(parents=True) for c in ("cat", "dog")] and p / "t",
         "has test/ but no train/"),
    ],
)
def test_bad_folders_are_one_line_errors(tmp_path, make, fix):
    with pytest.raises(UserError, match=fix):
        load_dataset(str(make(tmp_path)))


def test_cats_vs_dogs_loads():
    ds = load_dataset(str(shared_path("cats-vs-dogs")), img_size=32)
    assert ds.classes == ["cat", "dog"]
    assert (len(ds.train), len(ds.val)) == (2000, 500) and ds.test is None


def test_basic_augmentation_keeps_shape_dtype_and_is_seeded(mini):
    x = mini.train.images[:256]
    aug = BatchAugment(PixelRecipe("basic"), 32)
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(1)))


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    out = random_crop(x, 2, torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # each output equals exactly one window at an offset within [0, 4]
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert len(hits) == 1


def test_flip_rate_is_about_half():
    x = torch.arange(4).float().view(1, 1, 1, 4).expand(4000, 1, 1, 4)
    flipped = random_hflip(x, torch.Generator().manual_seed(0))
    rate = (flipped[:, 0, 0, 0] == 3).float().mean().item()
    assert 0.46 < rate < 0.54


# --- CIFAR batches: anything but the real layout is refused, naming the file ------------------------

def _write_cifar(folder: Path, train_batch=None, meta=None):
    """A complete CIFAR-10 folder of tiny batches; `train_batch` replaces data_batch_3."""
    base = folder / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 3, 9, 5]}
        if name == "data_batch_3" and train_batch is not None:
            batch = train_batch
        (base / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = {b"label_names": [c.encode() for c in "abcdefghij"]} if meta is None else meta
    (base / "batches.meta").write_bytes(pickle.dumps(names, protocol=2))
    return base


def test_a_well_formed_cifar_folder_loads(tmp_path):
    _write_cifar(tmp_path)
    x, y, xt, yt, classes = load_cifar10(tmp_path, download=False)
    assert x.shape == (20, 3, 32, 32) and y.tolist()[:4] == [0, 3, 9, 5] and classes[9] == "j" and len(xt) == 4


GOOD = np.zeros((4, 3072), np.uint8)


@pytest.mark.parametrize("batch, problem", [
    ({b"data": GOOD, b"labels": [0, 1, 2]}, "holds 4 images but 3 labels"),  # used to train on shifted labels
    ({b"data": GOOD, b"labels": [0, 1, 2, 10]}, r"labels from 0 to 10, outside 0\.\.9"),
    ({b"data": GOOD, b"labels": [0, -1, 2, 3]}, r"labels from -1 to 3"),
    ({b"data": GOOD, b"labels": [0, 1.5, 2, 3]}, "labels as list of float64"),
    ({b"data": GOOD.astype(np.int64), b"labels": [0, 1, 2, 3]}, "int64 array of shape"),
    ({b"data": np.zeros((4, 3, 32, 32), np.uint8), b"labels": [0, 1, 2, 3]}, r"shape \(4, 3, 32, 32\)"),
    ({b"data": [[0] * 3072] * 4, b"labels": [0, 1, 2, 3]}, "images as list"),
    ({b"labels": [0, 1, 2, 3]}, "no 'data' entry"),
    ({b"data": GOOD}, "no 'labels' entry"),
])
def test_malformed_cifar_batches_are_refused_naming_the_file(tmp_path, batch, problem):
    base = _write_cifar(tmp_path, train_batch=batch)
    with pytest.raises(UserError, match=problem) as e:
        load_cifar10(tmp_path, download=False)
    assert str(base / "data_batch_3") in str(e.value) and "\n" not in str(e.value)


def test_malformed_cifar_meta_is_refused(tmp_path):
    _write_cifar(tmp_path, meta={b"label_names": 7})
    with pytest.raises(UserError, match="batches.meta has no list of class names"):
        load_cifar10(tmp_path, download=False)


class _Reduces:
    """Pickles as a call of `fn(*args)`: what a hostile batch file does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("make", [
    lambda marker: _Reduces(os.system, f"touch {marker}"),
    lambda marker: _Reduces(eval, f"open({str(marker)!r}, 'w')"),
    lambda marker: _Reduces(subprocess.call, ["touch", str(marker)]),
    lambda marker: [1, {"inner": _Reduces(builtins.exec, f"open({str(marker)!r}, 'w')")}],  # nested
])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_hostile_pickles_are_refused_without_running_anything(tmp_path, make, protocol):
    marker = tmp_path / "ran"
    payload = pickle.dumps({b"data": make(marker), b"labels": [0]}, protocol=protocol)
    assert not marker.exists()
    _write_cifar(tmp_path / "c")
    path = tmp_path / "c" / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(payload)
    refused = r"refers to \w+\.(system|eval|exec|call), which a CIFAR-10 batch never holds; refusing"
    with pytest.raises(UserError, match=refused):
        load_cifar10(tmp_path / "c", download=False)
    assert not marker.exists()


def test_the_hostile_payload_does_run_when_unpickled_normally(tmp_path):
    """Proves the marker test above can fail: the same payload, trusted, creates the marker."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Reduces(subprocess.call, ["touch", str(marker)])))
    assert marker.exists()


# --- a streamed split in which a file became unreadable after scanning --------------------------------

def test_report_galleries_caption_their_own_pixels_when_a_streamed_file_breaks(tiny_folder, tmp_path, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(tiny_folder, root)
    run = fit(build_config(data=str(root), model="fastnet_cifar_small", img_size=32, epochs=1, data_mode="stream",
                           workers=0, aug="none", out=str(tmp_path / "run"), quiet=True))
    test_files, _ = folder.scan(root)[1]["test"]
    test_files[0].write_bytes(b"")  # unreadable now: every later image shifts by one in the stream
    trained = load_run(run)
    with pytest.raises(UserError, match="changed since it was trained"):  # the data is pinned ...
        analyze_run(run, tta="flip", gallery=8, device="cpu")
    out = analyze_run(run, tta="flip", gallery=8, device="cpu", allow_data_change=True)  # ... unless allowed
    result = json.loads((out / rundir.ANALYSIS_JSON).read_text())
    arrays = np.load(out / rundir.ANALYSIS_NPZ)
    temperature = result["calibration"]["temperature"]
    for entries, images in ((result["top_losses"], arrays["loss_images"]),
                            (result["cam"]["right"] + result["cam"]["wrong"], arrays["cam_images"])):
        assert len(entries) == len(images) > 0
        x = torch.from_numpy(images).permute(0, 3, 1, 2)
        with torch.inference_mode():
            probs = (trained.model(normalize(x, trained.dataset["mean"], trained.dataset["std"])) / temperature)
        probs = probs.softmax(1)
        for entry, image, p in zip(entries, images, probs, strict=True):
            file = test_files[entry["index"]]
            assert entry["index"] != 0 and file.parent.name == entry["true"]
            assert np.array_equal(image, folder.load_image(file, 32))  # the pixels are that file's
            assert trained.classes[p.argmax()] == entry["predicted"]  # and the caption is their prediction
            assert p.max().item() == pytest.approx(entry["probability"], abs=1e-4)
