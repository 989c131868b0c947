"""One entry point, `load_dataset`, for every data source; splits are batched as uint8 tensors.

Small data lives in memory as a uint8 tensor and is sliced a batch at a time (no workers, no
per-image Python). Large image folders stream through a DataLoader instead. Either way a split
yields (uint8 N x 3 x H x W, int64 N) batches in the order it is given, so the training loop,
augmentation and resumption are the same for both.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgcls.config import FIELDS, MAX_IMG_SIZE, NORMALIZATIONS, data_location
from imgcls.data import cifar, folder
from imgcls.data.exclusions import Exclusion, builtin_names, folder_names, split_names
from imgcls.data.manifest import is_manifest, read_manifest
from imgcls.data.shards import ShardSplit, is_shards, read_shards
from imgcls.errors import UserError

MEMORY_LIMIT_BYTES = 4 * 2**30  # folders that decode to more than this stream from disk
BUILTIN_DATA = ("cifar10", "cifar10-mini")  # by name; anything else is a folder
MIN_IMG_SIZE = FIELDS["img_size"].metadata["low"]  # the bounds train checks, for callers that skip the config


@dataclass
class Split:
    labels: torch.Tensor
    images: torch.Tensor | None = None  # uint8 N x 3 x H x W, in memory
    stream: folder.StreamingImages | None = None  # or decoded on demand
    workers: int = 0
    shards: ShardSplit | None = None  # or read from WebDataset shards (data/shards.py)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def img_size(self) -> int:
        if self.shards is not None:
            return self.shards.size
        return self.images.shape[-1] if self.images is not None else self.stream.size

    def batches(self, order: torch.Tensor, batch_size: int, seed: int = 0, first: int = 0):
        """Yield (images, labels) batches visiting the indices in `order`.

        When streaming, each image's augmentation is seeded by `seed` and its position in the epoch
        (`first` + its place in `order`; `order` may be the rest of an epoch), not by which worker
        decodes it, so a run resumed mid-epoch augments every image as an uninterrupted one did."""
        if self.images is not None:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                yield self.images[idx], self.labels[idx]
            return
        if self.shards is not None:  # in shard order (training takes shards.chunk_batches instead)
            at = 0
            for images in self.shards.in_order(self.shards.ids(order), batch_size):
                yield images, self.labels[order[at : at + len(images)]]
                at += len(images)
            return
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=batch_size,
            sampler=[(i, seed, first + k) for k, i in enumerate(order.tolist())],
            num_workers=self.workers,
            collate_fn=folder.collate_skipping_unreadable,
            generator=torch.Generator().manual_seed(seed),  # keeps the global RNG (dropout) untouched
        )
        yield from loader

    def subset(self, idx: torch.Tensor) -> Split:
        if self.images is not None:
            return Split(self.labels[idx], images=self.images[idx])
        if self.shards is not None:
            return Split(self.labels[idx], shards=self.shards.subset(idx), workers=self.workers)
        files = [self.stream.files[i] for i in idx.tolist()]
        labels = [self.stream.labels[i] for i in idx.tolist()]
        stream = folder.StreamingImages(files, labels, self.stream.size, crop_pct=self.stream.crop_pct)
        return Split(self.labels[idx], stream=stream, workers=self.workers)


@dataclass
class Dataset:
    name: str
    classes: list[str]
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    train: Split
    val: Split | None  # None: --val-fraction 0 on data without its own val/ (trains on all of train)
    test: Split | None
    normalization: str  # a key of NORMALIZATIONS: which statistics mean/std are
    crop_pct: float = 1.0  # folders: centre crop of the shorter side before resizing
    # What a comparison must agree on: source, split rules, sizes and a hash of the labels.
    fingerprint: dict = field(default_factory=dict)
    task: str = "multiclass"  # or multilabel: labels are then uint8 N x C multi-hot rows
    excluded: tuple[str, ...] | None = None  # --exclude: the names given (test ones stay in test)

    @property
    def multilabel(self) -> bool:
        return self.task == "multilabel"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        found = getattr(self, name, None) if name in ("train", "val", "test") else None
        if found is None:
            have = [n for n in ("train", "val", "test") if getattr(self, n) is not None]
            why = " (--val-fraction 0 held none out)" if name == "val" and self.fingerprint.get("val_fraction") == 0 \
                else ""
            raise UserError(f"dataset {self.name} has no '{name}' split{why}; use one of {', '.join(have)}")
        return found


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 N x 3 x h x w at `size`, image by image with the rule files go through (folder.fit), so a model
    trained on CIFAR at --img-size 64 sees what `imgcls predict` gives it for the same image as a file."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    pixels = images.permute(0, 2, 3, 1).numpy()
    resized = np.stack([folder.fit(Image.fromarray(p), size) for p in pixels])
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(0, 3, 1, 2)))


def _labels_hash(*label_sets: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for labels in label_sets:
        if labels is not None:
            h.update(labels.numpy().tobytes())
    return h.hexdigest()[:16]


def _content_hash(*splits: Split | None) -> str:
    """A hash of what the splits hold: the decoded pixels in memory, or the files' relative paths and
    sizes when streamed (decoding every file again would cost as much as an epoch)."""
    h = hashlib.sha256()
    for split in splits:
        if split is None:
            continue
        if split.images is not None:
            h.update(split.images.numpy().tobytes())
        elif split.shards is not None:  # the digests the manifest records, and which samples are taken
            h.update(";".join(f.sha256 for f in split.shards.files).encode())
            if split.shards.keep is not None:
                h.update(split.shards.keep.numpy().tobytes())
        else:
            for path in split.stream.files:
                h.update(f"{Path(path).parent.name}/{Path(path).name}:{Path(path).stat().st_size};".encode())
    return h.hexdigest()[:16]


def _carve_val(train: Split, fraction: float, seed: int, classes: list[str]) -> tuple[Split, Split | None]:
    """(train, val): `fraction` of each class of `train` held out, chosen by `seed`; fraction 0 holds
    nothing out: (train, None), every image trains and there is no validation split.

    Otherwise refused when a class would keep no training image or nothing at all is held out: training
    would then divide by an empty epoch or choose its checkpoint on no images."""
    if fraction == 0:
        return train, None
    keep, held = folder.stratified_split(train.labels, fraction, seed)
    counts = torch.bincount(train.labels[keep], minlength=len(classes))
    if len(held) == 0 or (counts == 0).any():
        starved = [c for c, n in zip(classes, counts.tolist(), strict=True) if n == 0]
        problem = (f"--val-fraction {fraction:g} leaves class {starved[0]} no training image" if starved
                   else "every class has a single training image, so none can be held out for validation")
        raise UserError(f"too few training images to carve a validation split: {problem}; lower --val-fraction, "
                        "add images (two or more per class), or add a val/ folder of class folders")
    return train.subset(keep), train.subset(held)


def _load_mini():
    root = resources.files("imgcls.data") / "cifar10_mini"
    meta = json.loads((root / "labels.json").read_text())
    out = []
    for split in ("train", "test"):
        mosaic = np.asarray(Image.open(io.BytesIO((root / f"{split}.webp").read_bytes())).convert("RGB"))
        rows, cols = mosaic.shape[0] // 32, mosaic.shape[1] // 32
        data = mosaic.reshape(rows, 32, cols, 32, 3).transpose(0, 2, 4, 1, 3).reshape(-1, 3, 32, 32)
        data = np.ascontiguousarray(data)
        if hashlib.sha256(data.tobytes()).hexdigest() != meta[f"{split}_sha256"]:
            raise UserError(f"the bundled cifar10-mini {split} file is damaged; reinstall imgcls")
        out += [torch.from_numpy(data), torch.tensor(meta[split], dtype=torch.int64)]
    return (*out, meta["classes"])


def data_source(data: str) -> str:
    """How a dataset is named in fingerprints: the built-in name, or the folder's absolute path."""
    return data_location(data)


def load_dataset(
    data: str,
    data_dir: str | None = None,
    img_size: int | None = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    mode: str = "auto",
    workers: int = 2,
    download: bool = True,
    normalize: str = "auto",
    crop_pct: float = 1.0,
    exclude: list[str] | None = None,
    task: str = "auto",
) -> Dataset:
    """Load `cifar10`, `cifar10-mini` or an image folder, with a validation split (none, `val` None,
    when `val_fraction` is 0 and the data has no val/ of its own).

    `crop_pct` < 1 centre-crops folder images (as a pretrained model's own preprocessing does).
    `exclude`: image names (data/exclusions.py) left out of train and val, before val is carved.
    A manifest (data/manifest.py) is multi-label when some image has other than one label, or when `task`
    says so; everything else is multiclass."""
    if not str(data).strip():
        raise UserError("--data is empty; pass cifar10, cifar10-mini or the path of an image folder")
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int)
                                 or not MIN_IMG_SIZE <= img_size <= MAX_IMG_SIZE):
        raise UserError(f"--img-size must be a whole number from {MIN_IMG_SIZE} to {MAX_IMG_SIZE} (got {img_size!r}); "
                        "e.g. --img-size 32")
    if data in BUILTIN_DATA:
        train, val, test, classes, size, excluded = _load_builtin(data, data_dir, img_size or 32, val_fraction,
                                                                  split_seed, download, exclude)
        normalization = "cifar"
    elif is_shards(data):
        train, val, test, classes, size = _load_shards(data, img_size, val_fraction, workers, exclude, task)
        normalization, excluded = "imagenet", None
    elif is_manifest(data):
        train, val, test, classes, size, task, excluded = _load_manifest(Path(data), img_size or 64, val_fraction,
                                                                         split_seed, crop_pct, task, exclude)
        normalization = "imagenet"
    else:
        if data_dir:
            raise UserError("--data-dir is for --data cifar10; for an image folder pass its path to --data")
        train, val, test, classes, size, excluded = _load_folder(
            Path(data), img_size or 64, val_fraction, split_seed, mode, workers, crop_pct, exclude
        )
        normalization = "imagenet"
    if task == "multilabel" and (data in BUILTIN_DATA or not is_manifest(data)):
        raise UserError("--task multilabel needs a manifest of the labels of each image (a .csv or .jsonl file); "
                        "a folder of class folders, or a built-in set, gives each image one class")
    task = "multiclass" if task == "auto" else task
    if normalize != "auto":
        normalization = normalize
    mean, std = NORMALIZATIONS[normalization]
    fingerprint = _fingerprint(data, size, val_fraction, split_seed, (train, val, test), excluded, task)
    folder_data = data not in BUILTIN_DATA
    name = Path(data).name if folder_data else data
    return Dataset(name, classes, size, mean, std, train, val, test, normalization,
                   crop_pct if folder_data else 1.0, fingerprint, task,
                   None if excluded is None else (*excluded.removed, *excluded.kept_test))


def _fingerprint(data: str, size: int, val_fraction: float, split_seed: int, splits: tuple,
                 excluded: Exclusion | None, task: str) -> dict:
    train, val, test = splits
    fingerprint = {
        "source": data_source(data),
        "img_size": size,
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "sizes": {n: len(s) for n, s in (("train", train), ("val", val), ("test", test)) if s},
        "labels_sha256": _labels_hash(train.labels, val.labels if val else None, test.labels if test else None),
        "content_sha256": _content_hash(train, val, test),
    }
    if excluded is not None:
        fingerprint.update(excluded.fingerprint())
        if excluded.kept_test:
            folder.warn(f"--exclude lists {len(excluded.kept_test)} test image(s) (e.g. {excluded.kept_test[0]}); "
                        "they stay, so that test scores remain comparable: fix their labels by hand")
    if task == "multilabel":
        fingerprint["task"] = task
    return fingerprint


def normalization_named(mean, std) -> str | None:
    """The NORMALIZATIONS key with these statistics, if any."""
    for name, (m, s) in NORMALIZATIONS.items():
        if np.allclose(m, mean, atol=1e-4) and np.allclose(s, std, atol=1e-4):
            return name
    return None


def _load_builtin(data: str, data_dir: str | None, size: int, val_fraction: float, split_seed: int,
                  download: bool, exclude: list[str] | None):
    if data == "cifar10":
        root = Path(data_dir) if data_dir else cifar.default_root()
        x_train, y_train, x_test, y_test, classes = cifar.load_cifar10(root, download)
    else:
        x_train, y_train, x_test, y_test, classes = _load_mini()
    excluded = _builtin_exclusion(exclude, data, y_train, y_test, classes)
    if excluded is not None:
        gone = {int(n.split("/")[1]) for n in excluded.removed}
        keep = torch.tensor([i not in gone for i in range(len(y_train))])
        x_train, y_train = x_train[keep], y_train[keep]
        if len(torch.unique(y_train)) < len(classes):
            raise UserError(f"--exclude leaves a class of {data} no training image; exclude fewer images")
    x_train, x_test = _resize(x_train, size), _resize(x_test, size)
    train, val = _carve_val(Split(y_train, images=x_train), val_fraction, split_seed, classes)
    return train, val, Split(y_test, images=x_test), classes, size, excluded


def _load_shards(data: str, img_size: int | None, val_fraction: float, workers: int, exclude: list[str] | None,
                 task: str):
    """(train, val, test, classes, size) of WebDataset shards written by imgcls shard: their splits as written
    and at the size they were written at. Training reads whole shards, so val is never carved from them."""
    manifest, parts = read_shards(data)
    size = manifest["img_size"]
    if img_size is not None and img_size != size:
        raise UserError(f"{data} holds {size} px images, not {img_size} px: train at {size} px (--img-size {size}), "
                        f"or write the shards at {img_size} px (imgcls shard --img-size {img_size})")
    if exclude is not None:
        raise UserError("--exclude names images of a folder or manifest; shards have none of their names: exclude "
                        "the images before writing the shards")
    if task == "multilabel":
        raise UserError("shards hold one class per image; --task multilabel needs a manifest")
    splits = {name: Split(part.labels.clone(), shards=part, workers=workers) for name, part in parts.items()}
    if "val" not in splits and val_fraction > 0:
        raise UserError(f"{data} has no val shards, and training reads whole shards, so none can be carved; name "
                        "the val shards too, write the shards with a val split (imgcls shard --val-fraction), or "
                        "pass --val-fraction 0")
    return splits["train"], splits.get("val"), splits.get("test"), manifest["classes"], size


def _load_manifest(path: Path, size: int, val_fraction: float, split_seed: int, crop_pct: float, task: str,
                   exclude: list[str] | None = None):
    """(train, val, test, classes, size, task, exclusion) of a manifest, decoded in memory; a split column's val
    and test, or val carved from train at random (seeded): stratifying by label sets would leave most sets alone.
    `exclude`: row names (Manifest.names) left out of train and val, before val is carved."""
    manifest = read_manifest(path)
    if task == "multiclass" and manifest.multilabel:
        raise UserError(f"{path} gives some images no label or several; --task multiclass needs exactly one each: "
                        "drop --task for a multi-label run")
    task = "multilabel" if task == "multilabel" or manifest.multilabel else "multiclass"
    rows, excluded = _manifest_exclusion(manifest, exclude, path)
    images, kept = folder.decode_readable([manifest.files[i] for i in rows], size, crop_pct,
                                          label=f"decoding {path.name}")
    rows = rows[kept]
    targets = torch.from_numpy(manifest.targets[rows])
    labels = targets if task == "multilabel" else targets.argmax(dim=1)
    splits = np.array(manifest.splits)[rows]
    parts = {name: Split(labels[torch.from_numpy(splits == name)], images=images[torch.from_numpy(splits == name)])
             for name in ("train", "val", "test") if (splits == name).any()}
    if "val" not in parts and val_fraction > 0:
        train = parts["train"]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(split_seed))
        held = max(1, round(val_fraction * len(train)))
        if held >= len(train):
            raise UserError(f"--val-fraction {val_fraction:g} leaves no training image of {path}; lower it")
        parts["val"] = train.subset(order[:held].sort().values)
        parts["train"] = train.subset(order[held:].sort().values)
    return parts["train"], parts.get("val"), parts.get("test"), manifest.classes, size, task, excluded


def _manifest_exclusion(manifest, names: list[str] | None, path: Path) -> tuple[np.ndarray, Exclusion | None]:
    """(the rows that stay, the exclusion): `names` checked against the manifest's rows and their labels."""
    every = np.arange(len(manifest.files))
    if names is None:
        return every, None
    known: dict[str, dict[str, str]] = {}
    for i, name in enumerate(manifest.names):
        known.setdefault(manifest.splits[i], {})[name] = manifest.given(i)
    excluded = split_names(names, known, str(path))
    gone = set(excluded.removed)
    rows = np.array([i for i, name in enumerate(manifest.names) if name not in gone], dtype=np.int64)
    if not any(manifest.splits[i] == "train" for i in rows):
        raise UserError(f"--exclude lists every training row of {path}; exclude fewer images")
    return rows, excluded


def _builtin_exclusion(names: list[str] | None, data: str, y_train: torch.Tensor, y_test: torch.Tensor,
                       classes: list[str]) -> Exclusion | None:
    if names is None:
        return None
    known = {"train": dict(zip(builtin_names("train", len(y_train)), (classes[y] for y in y_train.tolist()),
                               strict=True)),
             "test": dict(zip(builtin_names("test", len(y_test)), (classes[y] for y in y_test.tolist()), strict=True))}
    return split_names(names, known, data)


def _folder_exclusion(names: list[str] | None, root: Path, classes: list[str],
                      found: dict) -> tuple[Exclusion | None, dict]:
    """The exclusion, and `found` (split -> (files, labels)) without the excluded train and val files."""
    if names is None:
        return None, found
    named = {split: folder_names(root, split, files) for split, (files, _) in found.items()}
    known = {split: {name: classes[label] for name, label in zip(named[split], found[split][1], strict=True)}
             for split in found}
    excluded = split_names(names, known, str(root))
    gone = set(excluded.removed)
    kept = {}
    for split, (files, labels) in found.items():
        keep = [i for i, name in enumerate(named[split]) if name not in gone]
        kept[split] = ([files[i] for i in keep], [labels[i] for i in keep])
    if not kept["train"][0] or len(set(kept["train"][1])) < len(set(found["train"][1])):
        raise UserError(f"--exclude leaves a class of {root} no training image; exclude fewer images")
    if "val" in kept and not kept["val"][0]:
        raise UserError(f"--exclude lists every image of {root / 'val'}; exclude fewer, or remove the val/ folder "
                        "(validation is then carved from train)")
    return excluded, kept


def _load_folder(root: Path, size: int, val_fraction: float, split_seed: int, mode: str, workers: int,
                 crop_pct: float = 1.0, exclude: list[str] | None = None):
    classes, found = folder.scan(root)
    excluded, found = _folder_exclusion(exclude, root, classes, found)
    n_files = sum(len(files) for files, _ in found.values())
    stream = mode == "stream" or (mode == "auto" and n_files * 3 * size * size > MEMORY_LIMIT_BYTES)
    splits: dict[str, Split] = {}
    for name, (files, labels) in found.items():
        if stream:
            ds = folder.StreamingImages(files, labels, size, crop_pct=crop_pct)
            splits[name] = Split(torch.tensor(labels, dtype=torch.int64), stream=ds, workers=workers)
        else:
            images, kept = folder.decode_all(files, labels, size, crop_pct, label=f"decoding {root.name}/{name}")
            splits[name] = Split(kept, images=images)
    if "val" not in splits:
        splits["train"], splits["val"] = _carve_val(splits["train"], val_fraction, split_seed, classes)
    return splits["train"], splits["val"], splits.get("test"), classes, size, excluded


@dataclass
class Pool:
    """Every labelled image of a dataset, all splits together, each with its name (data/exclusions.py)."""

    name: str
    classes: list[str]
    images: torch.Tensor  # uint8 N x 3 x S x S
    labels: torch.Tensor  # int64 N, or uint8 N x K multi-hot (a multi-label manifest)
    names: list[str]

    @property
    def multilabel(self) -> bool:
        return self.labels.dim() == 2

    @property
    def splits(self) -> list[str]:
        return [n.split("/", 1)[0] for n in self.names]


def pool_dataset(pool: Pool, idx: torch.Tensor, source: str) -> Dataset:
    """The images `idx` of `pool` as a dataset that trains on all of them (no val, no test), normalised as
    the same source would be by load_dataset, with a fingerprint of its own (`source` names the subset)."""
    train = Split(pool.labels[idx], images=pool.images[idx])
    normalization = "cifar" if pool.name in BUILTIN_DATA else "imagenet"
    mean, std = NORMALIZATIONS[normalization]
    fingerprint = {"source": source, "img_size": train.img_size, "val_fraction": 0.0, "split_seed": 0,
                   "sizes": {"train": len(train)}, "labels_sha256": _labels_hash(train.labels),
                   "content_sha256": _content_hash(train)}
    task = "multilabel" if pool.multilabel else "multiclass"
    if pool.multilabel:
        fingerprint["task"] = task
    return Dataset(pool.name, pool.classes, train.img_size, mean, std, train, None, None, normalization,
                   fingerprint=fingerprint, task=task)


def _check_pool_memory(count: int, size: int) -> None:
    if count * 3 * size * size > MEMORY_LIMIT_BYTES:
        raise UserError(f"{count} images at {size} px do not fit in {MEMORY_LIMIT_BYTES >> 30} GiB, which "
                        "checking labels needs; lower --img-size or check a part of the data")


def load_pool(data: str, data_dir: str | None = None, img_size: int | None = None, crop_pct: float = 1.0,
              threads: int = 2) -> Pool:
    """Every image of train, val and test (as on disk: nothing carved) in memory at `img_size`, with its name."""
    if data in BUILTIN_DATA:
        if data == "cifar10":
            x_train, y_train, x_test, y_test, classes = cifar.load_cifar10(
                Path(data_dir) if data_dir else cifar.default_root(), download=True)
        else:
            x_train, y_train, x_test, y_test, classes = _load_mini()
        size = img_size or 32
        names = builtin_names("train", len(y_train)) + builtin_names("test", len(y_test))
        return Pool(data, classes, torch.cat([_resize(x_train, size), _resize(x_test, size)]),
                    torch.cat([y_train, y_test]), names)
    size = img_size or 64
    if is_manifest(data):
        manifest = read_manifest(data)
        _check_pool_memory(len(manifest.files), size)
        images, kept = folder.decode_readable(manifest.files, size, crop_pct, threads, f"decoding {Path(data).name}")
        targets = torch.from_numpy(manifest.targets[kept])
        return Pool(Path(data).name, manifest.classes, images, targets if manifest.multilabel else targets.argmax(1),
                    [manifest.names[i] for i in kept])
    root = Path(data)
    classes, found = folder.scan(root)
    files = [f for fs, _ in found.values() for f in fs]
    labels = [label for _, ls in found.values() for label in ls]
    names = [n for split, (fs, _) in found.items() for n in folder_names(root, split, fs)]
    _check_pool_memory(len(files), size)
    images, kept = folder.decode_readable(files, size, crop_pct, threads, f"decoding {root.name}")
    return Pool(root.name, classes, images, torch.tensor([labels[i] for i in kept], dtype=torch.int64),
                [names[i] for i in kept])
