import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data import load_dataset
from imgcls.data.augment import random_crop, random_hflip
from imgcls.data.cifar import load_cifar10, read_batch
from imgcls.data.presets import BatchAugment
from imgcls.errors import UserError
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
    aug = BatchAugment("basic", 32)
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
