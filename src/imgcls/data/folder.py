"""Image folders in ImageFolder layout: decoding, corrupt-file handling, stratified splits."""

from __future__ import annotations

import math
import os
import sys
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from imgcls.data.decode import FORMAT_NAMES, DecodeError, open_rgb
from imgcls.errors import UserError
from imgcls.progress import track

IMG_EXTS = {".jpg", ".jpeg", ".jfif", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SPLIT_NAMES = ("train", "val", "test")


BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


REJECTED_LABEL = "unknown"  # what predict prints for a rejected image: no class may be named so


def class_name_problem(name: str) -> str | None:
    """Why `name` cannot be a class name, or None. A newline or other control character in a label forges lines
    in summaries, CSV readers and the server's metrics; a byte that is not UTF-8 (a lone surrogate here) cannot be
    written to JSON or HTML; a bidirectional override prints the name reversed; a blank name prints as nothing;
    a class named `unknown` cannot be told from a rejection."""
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Cs") or ch in BIDI_CONTROLS:
            kind = "not UTF-8" if unicodedata.category(ch) == "Cs" else f"control character {ch!r}"
            return f"class name {name!r} holds a {kind}"
        if unicodedata.category(ch) == "Cf":  # zero-width space, soft hyphen, word joiner: 'cat' prints as 'cat'
            return f"class name {name!r} holds the invisible character U+{ord(ch):04X}"
    if not name.strip():
        return f"class name {name!r} is blank"
    if name != name.strip():
        return f"class name {name!r} begins or ends with white space, which prints as nothing"
    if name.strip().casefold() == REJECTED_LABEL:
        return f"class name {name!r} is the label predict gives a rejected image"
    return None


def class_names_problem(names: list[str]) -> str | None:
    """Why this list of class names cannot be used, or None: a name refused by class_name_problem, or two names
    that are one text in Unicode's normal form (café written with é and with e + accent print alike) or that
    differ only in case (Cat and cat: one folder on macOS and Windows, and most often one class)."""
    problem = next(filter(None, map(class_name_problem, names)), None)
    if problem:
        return problem
    seen: dict[str, str] = {}
    for name in names:
        key = unicodedata.normalize("NFC", name).casefold()
        if key in seen:
            other = seen[key]
            if unicodedata.normalize("NFC", other) == unicodedata.normalize("NFC", name):
                return f"class names {other!r} and {name!r} are the same text in two Unicode spellings"
            return f"class names {other!r} and {name!r} differ only in case (one folder on many file systems)"
        seen[key] = name
    return None


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTS and p.is_file())


def scan(root: Path) -> tuple[list[str], dict[str, tuple[list[Path], list[int]]]]:
    """Return (classes, {split: (files, labels)}) for `root`.

    `root` holds either train/ [val/] [test/] folders of class folders, or class folders alone
    (then everything is 'train' and the caller splits it).
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data folder {root} does not exist; pass --data an existing image folder")
    has_splits = (root / "train").is_dir()
    orphans = [name for name in SPLIT_NAMES[1:] if (root / name).is_dir()]
    if orphans and not has_splits:  # else val/ and test/ would be read as two class folders
        raise UserError(f"{root} has {' and '.join(n + '/' for n in orphans)} but no train/; imgcls reads split "
                        "folders beside a train/ with the same class folders: add it, or pass the split's own folder "
                        "(class folders alone)")
    train_root = root / "train" if has_splits else root
    classes = [d.name for d in _class_dirs(train_root)]
    problem = class_names_problem(classes)
    if problem:
        raise UserError(f"{train_root}: {problem}; rename the folder")
    if len(classes) < 2:
        found = f"only one class folder ({classes[0]})" if classes else "no class folders"
        raise UserError(
            f"{train_root} has {found}; a classifier needs at least two: "
            "put each class's images in its own subfolder"
        )
    splits = {}
    for name in SPLIT_NAMES if has_splits else ("train",):
        split_root = root / name if has_splits else root
        if not split_root.is_dir():
            continue
        extra = sorted({d.name for d in _class_dirs(split_root)} - set(classes))
        if extra:
            raise UserError(
                f"{split_root} has class folders {', '.join(extra)} that train/ lacks; "
                "give every split the same class folders"
            )
        files, labels = [], []
        for idx, cls in enumerate(classes):
            found = _images_in(split_root / cls)
            files += found
            labels += [idx] * len(found)
        if name == "train":
            empty = [c for i, c in enumerate(classes) if i not in set(labels)]
            if empty:
                raise UserError(f"class folder(s) {', '.join(empty)} in {split_root} hold no images; add images "
                                "or remove the empty folders")
        elif not files:
            raise UserError(f"{split_root} holds no images in class folders named as in train/ "
                            f"({', '.join(classes)}); add them, or remove the {name}/ folder")
        splits[name] = (files, labels)
    return classes, splits


def load_image(path: Path, size: int, crop_pct: float = 1.0) -> np.ndarray:
    """Decode to RGB (decode.open_rgb), resize the shorter side to size / crop_pct and centre-crop
    size x size (timm's eval transform; crop_pct 1 keeps the whole shorter side): H x W x 3 uint8.
    Raises DecodeError for a file that is not a usable image."""
    img = open_rgb(path, min_size=math.ceil(size / crop_pct))  # JPEG: decode at a reduced scale when enough
    return fit(img, size, crop_pct)


def fit(img: Image.Image, size: int, crop_pct: float = 1.0) -> np.ndarray:
    """The resize rule every image goes through (files and the built-in datasets alike): the shorter side to
    size / crop_pct, bicubic, and the centre size x size: H x W x 3 uint8."""
    bleed = (1.0 - crop_pct) / 2  # the margin cut from every edge before the square is fitted
    return np.asarray(ImageOps.fit(img, (size, size), Image.Resampling.BICUBIC, bleed=bleed), dtype=np.uint8)


def _try_load(path: Path, size: int, crop_pct: float = 1.0) -> np.ndarray | str:
    """The image, or why it cannot be read."""
    try:
        return load_image(path, size, crop_pct)
    except DecodeError as e:
        return str(e)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def decode_all(files: list[Path], labels: list[int], size: int, crop_pct: float = 1.0, threads: int = 2,
               label: str = "decoding"):
    """Decode every file into one uint8 N x 3 x size x size tensor, skipping unreadable ones."""
    images, kept = decode_readable(files, size, crop_pct, threads, label)
    return images, torch.tensor([labels[i] for i in kept], dtype=torch.int64)


def decode_readable(files: list[Path], size: int, crop_pct: float = 1.0, threads: int = 2,
                    label: str = "decoding") -> tuple[torch.Tensor, list[int]]:
    """(uint8 N x 3 x size x size, the indices into `files` of its N images): unreadable files skipped, each
    with a warning; none readable is a one-line error."""
    # Pillow releases the GIL while decoding, so threads overlap the work without processes.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        results = list(track(pool.map(lambda p: _try_load(p, size, crop_pct), files), len(files), label))
    failed = [(path, result) for path, result in zip(files, results, strict=True) if isinstance(result, str)]
    if not files:
        raise UserError("no image files were found; put the images in one folder per class")
    if len(failed) == len(files):  # one line that names the folder, not a warning per file before it
        raise UserError(f"none of the {len(files)} image file(s) under {Path(os.path.commonpath(files))} could be "
                        f"read (e.g. {failed[0][0]}: {failed[0][1]}); check that they are {FORMAT_NAMES} images")
    for path, reason in failed:
        warn(f"skipped unreadable image {path} ({reason})")
    if failed:
        warn(f"skipped {len(failed)} unreadable image(s) of {len(files)}")
    kept = [i for i, r in enumerate(results) if not isinstance(r, str)]
    array = np.stack([results[i] for i in kept]).transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(array)), kept


def stratified_split(labels: torch.Tensor, fraction: float, seed: int):
    """Indices (keep, held_out): `fraction` of each class held out, chosen by `seed`."""
    gen = torch.Generator().manual_seed(seed)
    keep, held = [], []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_held = max(1, round(fraction * len(idx))) if len(idx) > 1 else 0
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return torch.sort(torch.cat(keep)).values, torch.sort(torch.cat(held)).values


class StreamingImages(torch.utils.data.Dataset):
    """Decodes files on demand, for folders too large to hold in memory."""

    def __init__(self, files: list[Path], labels: list[int], size: int, transform=None, crop_pct: float = 1.0):
        self.files, self.labels, self.size, self.crop_pct = files, labels, size, crop_pct
        self.transform = transform  # per-image training augmentation, run in the workers

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: int | tuple[int, int, int]):
        """Image `item`, or (index, epoch seed, position in the epoch): the augmentation then draws from
        its own seeded stream, leaving the process's random state untouched."""
        i, seed, position = item if isinstance(item, tuple) else (item, 0, item)
        result = _try_load(self.files[i], self.size, self.crop_pct)
        if isinstance(result, str):
            warn(f"skipped unreadable image {self.files[i]} ({result})")
            return None
        image = torch.from_numpy(result.transpose(2, 0, 1).copy())
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed((seed * 1_000_003 + position) % 2**63)
                image = self.transform(image)
        return image, self.labels[i]


def collate_skipping_unreadable(items):
    items = [it for it in items if it is not None]
    if not items:
        return torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    images, labels = zip(*items, strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
