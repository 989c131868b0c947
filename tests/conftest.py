import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls import rundir
from imgcls.config import build_config
from imgcls.data import load_dataset

SHARED = os.environ.get("IMGCLS_DATA")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers, one per core: one thread each, so
    import torch  # that they do not contend for the two cores with two threads apiece

    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and the commands a test starts, so they compute as it does
TIMING = ("epoch_time", "data_time", "compute_time", "images_per_s")  # differ between identical runs
# A small CNN on the tiny folder (108 training images at batch 32: 4 steps an epoch); fp32, so that
# runs compare exactly on CPUs with and without native bf16; the layout given, so that two runs compared
# for equality cannot time their way to different kernels on a busy machine (tests/test_kernels.py covers
# the measured choice).
TINY_RUN = dict(model="fastnet_cifar_small", epochs=2, batch_size=32, img_size=32, quiet=True, precision="fp32",
                memory_format="channels_last")


def tiny_config(data, out, **kw):
    return build_config(**{**TINY_RUN, "data": str(data), "out": str(out), **kw})


def run_metrics(run) -> list[dict]:
    """A run's metrics.jsonl without the timings: what two equal runs must share exactly."""
    return [{k: v for k, v in m.items() if k not in TIMING} for m in rundir.read_metrics(run)]


def shared_path(name: str) -> Path:
    """A dataset under $IMGCLS_DATA, or skip: the full copies are not part of the repository."""
    if not SHARED or not (Path(SHARED) / name).exists():
        pytest.skip(f"set IMGCLS_DATA to the folder holding {name}/ to run this test")
    return Path(SHARED) / name


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """imgcls.kernels caches its measurements in a folder of the session, never in the user's ~/.cache."""
    before = os.environ.get("IMGCLS_CACHE_DIR")
    os.environ["IMGCLS_CACHE_DIR"] = str(tmp_path_factory.mktemp("kernel-cache"))
    yield Path(os.environ["IMGCLS_CACHE_DIR"])
    if before is None:
        os.environ.pop("IMGCLS_CACHE_DIR", None)
    else:
        os.environ["IMGCLS_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def mini():
    return load_dataset("cifar10-mini")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, mini) -> Path:
    """A small ImageFolder (train/ and test/, 3 classes) written as real PNG and JPEG files."""
    root = tmp_path_factory.mktemp("tiny")
    for split, source, per_class in (("train", mini.train, 40), ("test", mini.test, 10)):
        for cls in range(3):
            folder = root / split / mini.classes[cls]
            folder.mkdir(parents=True)
            idx = np.flatnonzero(source.labels.numpy() == cls)[:per_class]
            for n, i in enumerate(idx):
                ext = "png" if n % 2 else "jpg"
                Image.fromarray(source.images[i].permute(1, 2, 0).numpy()).save(folder / f"{n:03d}.{ext}")
    return root


@pytest.fixture(scope="session")
def one_epoch_run(tiny_folder, tmp_path_factory) -> Path:
    """One epoch of TINY_RUN on the tiny folder, shared by the modules that only read it (or restore it)."""
    from imgcls.training.train import fit

    return fit(tiny_config(tiny_folder, tmp_path_factory.mktemp("one-epoch") / "run", epochs=1))


@pytest.fixture(scope="session")
def one_epoch_export(one_epoch_run, tmp_path_factory) -> Path:
    """`imgcls export` of one_epoch_run (ONNX and safetensors, with its parity proof)."""
    from imgcls.cli import main

    out = tmp_path_factory.mktemp("one-epoch-export") / "export"
    assert main(["export", str(one_epoch_run), "--out", str(out)]) == 0
    return out
