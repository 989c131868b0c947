"""CIFAR-10 in its canonical python-batch layout, read without trusting pickle."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from imgcls.errors import UserError

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
META_FILE = "batches.meta"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _BatchUnpickler(pickle.Unpickler):
    """Admits only what real CIFAR batches hold: dicts, lists, bytes, ints and numpy arrays.

    A pickle can name any importable callable and run it on load; refusing every global except
    numpy's array reconstruction closes that door.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 writes an array's raw bytes this way at protocol 2
    }

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise UserError(
                f"{self.path} refers to {module}.{name}, which a CIFAR-10 batch never holds; "
                "refusing to load it (replace it with the original file)"
            )
        return super().find_class(module, name)


def read_batch(path: Path) -> dict:
    """Load one batch file with the restricted unpickler; keys come back as str."""
    try:
        with open(path, "rb") as f:
            raw = _BatchUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as e:  # a damaged pickle fails in many ways: UnpicklingError, EOFError, TypeError...
        raise UserError(f"{path} is not a readable CIFAR-10 batch ({type(e).__name__}: {e}); replace the file") from e
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a CIFAR-10 batch (expected a dict); replace the file")
    return {(k.decode("utf-8", "replace") if isinstance(k, bytes) else k): v for k, v in raw.items()}


def default_root() -> Path:
    """$IMGCLS_DATA/cifar10, else ~/.cache/imgcls/cifar10 (the folder holding the batches)."""
    base = os.environ.get("IMGCLS_DATA")
    if base:
        return Path(base) / "cifar10"
    return Path.home() / ".cache" / "imgcls" / "cifar10"


def _missing(folder: Path) -> list[str]:
    return [n for n in [*TRAIN_FILES, *TEST_FILES, META_FILE] if not (folder / n).is_file()]


def ensure_downloaded(root: Path, download: bool) -> Path:
    """Return the batch folder, downloading the official archive when allowed and needed."""
    folder = root / BASE_FOLDER
    missing = _missing(folder)
    if not missing:
        return folder
    if not _missing(root):  # a common slip: --data-dir names the batch folder itself
        raise UserError(f"--data-dir {root} is the {BASE_FOLDER} folder itself; pass the folder that holds it: "
                        f"--data-dir {root.parent}")
    where = f"put {', '.join(missing)} into {folder}/ (or pass --data-dir to the folder that holds {BASE_FOLDER}/)"
    if not download or os.environ.get("IMGCLS_OFFLINE") == "1":
        raise UserError(f"CIFAR-10 not found: {where}")
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        download_and_extract_archive(URL, download_root=str(root), md5=ARCHIVE_MD5)
    except Exception as e:  # network errors come in many types; all mean the same to the user
        raise UserError(f"CIFAR-10 not found and the download failed ({type(e).__name__}): {where}") from e
    if _missing(folder):
        raise UserError(f"the CIFAR-10 archive did not hold the expected files: {where}")
    return folder


def _checked(batch: dict, path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 N x 3072, labels int64 N) of one batch; anything else is refused, since a
    label list one short would shift every label after the gap and train on them without a sign."""
    fix = "replace it with the file from the original CIFAR-10 archive"
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise UserError(f"{path} has no {' or '.join(repr(k) for k in missing)} entry; {fix}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        what = f"a {data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path} holds its images as {what}, expected a uint8 array of shape (N, 3072); {fix}")
    if len(data) == 0:
        raise UserError(f"{path} holds no images; {fix}")
    labels = batch["labels"]
    labels = np.asarray(labels) if isinstance(labels, list | tuple | np.ndarray) else np.asarray(None)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise UserError(f"{path} holds its labels as {type(batch['labels']).__name__} of {labels.dtype}, "
                        f"expected a list of integers; {fix}")
    if len(labels) != len(data):
        raise UserError(f"{path} holds {len(data)} images but {len(labels)} labels; {fix}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise UserError(f"{path} has labels from {low} to {high}, outside 0..{num_classes - 1}; {fix}")
    return data, labels.astype(np.int64)


def _to_tensors(batches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.concatenate([d for d, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _class_names(path: Path) -> list[str]:
    names = read_batch(path).get("label_names", CLASSES)
    if not isinstance(names, list | tuple) or len(names) < 2 or not all(isinstance(n, bytes | str) for n in names):
        raise UserError(f"{path} has no list of class names under 'label_names'; replace it with the original file")
    names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # two labels would share a name, and evaluation by name would merge them
        raise UserError(f"{path} names the class {repeated[0]!r} twice under 'label_names'; "
                        "replace it with the original file")
    return names


def load_cifar10(root: Path, download: bool = True):
    """(train_images, train_labels, test_images, test_labels, classes); images uint8 N x 3 x 32 x 32."""
    folder = ensure_downloaded(Path(root), download)
    classes = _class_names(folder / META_FILE)
    train = _to_tensors([_checked(read_batch(folder / n), folder / n, len(classes)) for n in TRAIN_FILES])
    test = _to_tensors([_checked(read_batch(folder / n), folder / n, len(classes)) for n in TEST_FILES])
    return (*train, *test, classes)
