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
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"{path} is not a readable CIFAR-10 batch ({e}); replace the file") from e
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a CIFAR-10 batch (expected a dict)")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


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


def _to_tensors(batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
    labels = np.concatenate([np.asarray(b["labels"], dtype=np.int64) for b in batches])
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"CIFAR-10 data has shape {data.shape}, expected (N, 3072); replace the files")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def load_cifar10(root: Path, download: bool = True):
    """(train_images, train_labels, test_images, test_labels, classes); images uint8 N x 3 x 32 x 32."""
    folder = ensure_downloaded(Path(root), download)
    train = _to_tensors([read_batch(folder / n) for n in TRAIN_FILES])
    test = _to_tensors([read_batch(folder / n) for n in TEST_FILES])
    meta = read_batch(folder / META_FILE)
    names = meta.get("label_names", CLASSES)
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return (*train, *test, classes)
