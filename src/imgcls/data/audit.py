"""`imgcls audit DATA`: what is wrong with a dataset before anything trains on it.

- Counts per class and split, the imbalance ratio (largest / smallest training class) and the smallest classes.
- Exact duplicates: the same file bytes (folders) or the same pixels (CIFAR, WebDataset shards).
  Near-duplicates: a difference hash (dHash) of every image, computed on whole batches of tensors: the image
  in gray at 9 x 8, one bit per pair of horizontal neighbours (is the right one brighter?), 64 bits. A
  re-encoded or resized copy keeps nearly every bit; two different photos agree on about half. Pairs are
  found without comparing all n^2: the hash is cut into `max_distance + 1` bands, and two hashes within
  `max_distance` bits must agree on at least one band exactly (pigeonhole), so only images sharing a band
  value are compared, vectorised. Pairs across splits are leakage: the held-out score then partly measures
  memory.
- Folders and manifests, from each file's header (Pillow reads it without decoding the pixels): unreadable
  files, images much smaller than the training size, extreme aspect ratios, channel modes other than RGB,
  EXIF rotations. Each file is decoded once, by the one decoder (data/decode.py), at a reduced JPEG scale.
  A manifest's images may have several labels each: its counts are then images with each label, and two
  copies carry the same labels only when their whole label sets agree.

`quick_audit(dataset)` is the cheap part that `imgcls train` runs on data already in memory.
"""

from __future__ import annotations

import hashlib
import io
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgcls.data import folder
from imgcls.data.datasets import BUILTIN_DATA, Dataset, load_dataset
from imgcls.data.decode import FORMATS, DecodeError, open_rgb
from imgcls.data.manifest import is_manifest, read_manifest
from imgcls.data.shards import is_shards
from imgcls.errors import UserError
from imgcls.options import NEAR_DUPLICATE_BITS
from imgcls.progress import track

THUMB = 32  # every image is shown in the HTML page as a 32 x 32 copy (and CIFAR hashed from its own 32 x 32)
# Bits two hashes may differ in and still count as near-duplicates: at 4, every planted re-encoded, brightened
# and resized copy of real photos is found, and no distinct pair up to 10 (bench/near_duplicates.py).
NEAR_DISTANCE = NEAR_DUPLICATE_BITS
MAX_PAIRS = 5000  # pairs listed per kind in the JSON; the counts are always complete
ASPECT_LIMIT = 3.0  # training centre-crops the shorter side, so beyond 3:1 it sees under a third of the image
WEIGHTS_RATIO, SAMPLER_RATIO = 3.0, 10.0  # imbalance beyond which the suggestion adds class weights, a sampler
POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


@dataclass
class Audit:
    report: dict  # what the JSON file holds
    thumbs: torch.Tensor  # N x 3 x 32 x 32 uint8, in the order of `offsets`
    offsets: dict[str, int] = field(default_factory=dict)  # split -> index of its first image in thumbs
    suspects: list[np.ndarray] = field(default_factory=list)  # --labels: a picture of each label issue, in order

    def add_labels(self, section: dict, pictures: list[np.ndarray]) -> None:
        """The probable label errors (training/out_of_fold.label_audit) joined to the report."""
        self.report["label_issues"] = section
        self.suspects = pictures

    def thumb(self, item: dict) -> np.ndarray:
        return self.thumbs[self.offsets[item["split"]] + item["index"]].permute(1, 2, 0).numpy()


def difference_hash(image: Image.Image) -> np.uint64:
    """64-bit dHash of a decoded image: gray, Lanczos-resized to 8 rows x 9 columns, a bit set where a pixel is
    darker than its right neighbour (row-major, the first bit highest). Lanczos from the decoded pixels, not an
    area average of the 32 x 32 thumbnail: on planted copies of real photos the thumbnail's hash missed 3 of 40
    JPEG re-encodes at 4 bits and paired distinct photos at 8 (bench/near_duplicates.py, docs/results.md)."""
    gray = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    return np.packbits(gray[:, 1:] > gray[:, :-1]).view(">u8").astype(np.uint64)[0]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 hashes, element-wise."""
    x = np.ascontiguousarray(np.bitwise_xor(a, b)).view(np.uint8).reshape(-1, 8)
    return POPCOUNT[x].sum(axis=1, dtype=np.int64)


def _equal_key_pairs(keys: np.ndarray) -> np.ndarray:
    """All (i, j), i < j, with keys[i] == keys[j]: sort, then compare each item with the k-th next
    while any run of equal keys is longer than k. Cost: n x the largest run, in numpy."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    pairs, k = [], 1
    while k < len(keys):
        same = ordered[k:] == ordered[:-k]
        if not same.any():
            break
        pairs.append(np.stack([order[:-k][same], order[k:][same]], axis=1))
        k += 1
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    found = np.concatenate(pairs)
    return np.sort(found, axis=1)


def near_pairs(hashes: np.ndarray, max_distance: int = NEAR_DISTANCE) -> tuple[np.ndarray, np.ndarray]:
    """(pairs M x 2 with i < j, their Hamming distances) of every two hashes within `max_distance` bits.

    The 64 bits are cut into max_distance + 1 bands; hashes that close agree exactly on at least one."""
    n_bands = max_distance + 1
    edges = np.linspace(0, 64, n_bands + 1).astype(int)
    found = [np.zeros((0, 2), dtype=np.int64)]
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        keys = (hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)
        candidates = _equal_key_pairs(keys)
        close = hamming(hashes[candidates[:, 0]], hashes[candidates[:, 1]]) <= max_distance
        found.append(candidates[close])  # filtered before de-duplication: candidates outnumber pairs by far
    pairs = np.unique(np.concatenate(found), axis=0)
    return pairs, hamming(hashes[pairs[:, 0]], hashes[pairs[:, 1]])


def _pixel_hashes(images: torch.Tensor) -> list[str]:
    rows = images.reshape(len(images), -1).numpy()
    return [hashlib.blake2b(row, digest_size=16).hexdigest() for row in rows]


def _inspect(path: Path) -> dict:
    """One file: its content hash, header facts (size, mode, EXIF orientation) and a 32 x 32 copy, or why
    it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return {"error": f"cannot open the file ({e.strerror})"}
    info = {"hash": hashlib.blake2b(data, digest_size=16).hexdigest()}
    try:
        rgb = open_rgb(io.BytesIO(data), min_size=THUMB)  # the one decoder; JPEGs at a reduced scale
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:  # the header again, as the file has it
            info.update(width=img.width, height=img.height, mode=img.mode, alpha="transparency" in img.info,
                        orientation=int(img.getexif().get(0x0112, 1) or 1))
    except DecodeError as e:
        info["error"] = str(e)
        return info
    info["thumb"] = np.asarray(rgb.resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.uint8)
    info["dhash"] = difference_hash(rgb)
    return info


def channel_kind(mode: str, alpha: bool = False) -> str | None:
    """What is unusual about a Pillow mode, or None for plain 8-bit RGB."""
    if mode.startswith("I") or mode == "F":
        return "16-bit or more"
    if mode in ("LA", "La"):
        return "grayscale with alpha"
    if mode in ("L", "1"):
        return "grayscale with alpha" if alpha else "grayscale"
    if mode in ("RGBA", "RGBa", "PA") or alpha:
        return "alpha (RGBA)"
    if mode == "CMYK":
        return "CMYK"
    if mode == "P":
        return "palette"
    return None if mode == "RGB" else mode


@dataclass
class _Images:
    """Every image of every split, flat: where it is, its label, exact hash, dHash, 32 x 32 copy and header facts."""
    classes: list[str]
    split: list[str]
    index: list[int]
    labels: np.ndarray  # int64 N, or (a multi-label manifest) uint8 N x K multi-hot
    hashes: list[str]
    dhashes: np.ndarray  # uint64, 0 for an unreadable file
    thumbs: torch.Tensor
    readable: np.ndarray
    files: list[str] | None = None
    infos: list[dict] | None = None

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def label(self, i: int) -> str:
        """Image i's class, or its labels joined by ';' (a multi-label manifest's)."""
        if self.multilabel:
            return ";".join(c for c, on in zip(self.classes, self.labels[i], strict=True) if on)
        return self.classes[self.labels[i]]

    def item(self, i: int) -> dict:
        out = {"split": self.split[i], "index": self.index[i], "class": self.label(i)}
        if self.files is not None:
            out["file"] = self.files[i]
        return out


def _decoded_images(data: str, data_dir: str | None) -> _Images:
    """CIFAR-10 or cifar10-mini as training splits it (val carved from train as `imgcls train` does), or
    WebDataset shards as written: images already decoded at one size, hashed from their pixels."""
    shards = is_shards(data)
    ds = load_dataset(data, data_dir, val_fraction=0 if shards else 0.1)
    splits = [(n, s) for n, s in (("train", ds.train), ("val", ds.val), ("test", ds.test)) if s is not None]
    hashes, dhashes, thumbs = [], [], []
    for _, split in splits:  # a shard split is read in order, a batch at a time: memory holds the thumbnails
        for images, _ in split.batches(torch.arange(len(split)), 256):
            hashes += _pixel_hashes(images)
            dhashes += [difference_hash(Image.fromarray(t.permute(1, 2, 0).numpy())) for t in images]
            if images.shape[-1] != THUMB:
                images = torch.nn.functional.interpolate(images.float(), size=(THUMB, THUMB), mode="area")
                images = images.round().clamp(0, 255).to(torch.uint8)
            thumbs.append(images)
    names = [n for n, s in splits for _ in range(len(s))]
    index = [i for _, s in splits for i in range(len(s))]
    labels = torch.cat([s.labels for _, s in splits]).numpy()
    return _Images(ds.classes, names, index, labels, hashes, np.array(dhashes, np.uint64), torch.cat(thumbs),
                   np.ones(len(labels), bool))


def _folder_images(root: Path, threads: int, progress: bool) -> _Images:
    classes, found = folder.scan(root)
    files = [f for files, _ in found.values() for f in files]
    names = [n for n, (fs, _) in found.items() for _ in fs]
    index = [i for fs, _ in found.values() for i in range(len(fs))]
    labels = np.array([label for _, ls in found.values() for label in ls], dtype=np.int64)
    return _file_images(classes, files, names, index, labels, root.name, threads, progress)


def _manifest_images(path: Path, threads: int, progress: bool) -> _Images:
    """A manifest's images grouped by their split column (train when it has none: val is carved at training);
    one class index each, or multi-hot rows when some image has other than one label."""
    manifest = read_manifest(path)
    order = sorted(range(len(manifest.files)), key=lambda i: ("train", "val", "test").index(manifest.splits[i]))
    names = [manifest.splits[i] for i in order]
    index = _positions_within(names)
    targets = manifest.targets[order]
    labels = targets.astype(np.uint8) if manifest.multilabel else targets.argmax(axis=1).astype(np.int64)
    return _file_images(manifest.classes, [manifest.files[i] for i in order], names, index, labels, path.name,
                        threads, progress)


def _positions_within(splits: list[str]) -> list[int]:
    """Each entry's position among the entries of its own split, in order."""
    seen: dict[str, int] = {}
    out = []
    for s in splits:
        out.append(seen.get(s, 0))
        seen[s] = out[-1] + 1
    return out


def _file_images(classes: list[str], files: list[Path], names: list[str], index: list[int], labels: np.ndarray,
                 what: str, threads: int, progress: bool) -> _Images:
    """Hashes, thumbnails and header facts of image files, read in `threads` threads."""
    # Pillow and hashlib release the GIL on large buffers, so threads overlap reading, hashing and decoding.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        infos = list(track(pool.map(_inspect, files), len(files), f"audit: hashing {what}", enabled=progress))
    blank = np.zeros((THUMB, THUMB, 3), dtype=np.uint8)
    thumbs = np.stack([info.get("thumb", blank) for info in infos]) if infos else np.zeros((0, THUMB, THUMB, 3))
    readable = np.array(["thumb" in info for info in infos], dtype=bool)
    dhashes = np.array([info.pop("dhash", 0) for info in infos], dtype=np.uint64)
    for info in infos:
        info.pop("thumb", None)
    return _Images(classes, names, index, labels, [info.get("hash", "") for info in infos], dhashes,
                   torch.from_numpy(thumbs.transpose(0, 3, 1, 2).copy()), readable, [str(f) for f in files], infos)


def _pair(images: _Images, i: int, j: int, **extra) -> dict:
    return {"a": images.item(i), "b": images.item(j), "cross_split": images.split[i] != images.split[j],
            "same_label": bool(np.array_equal(images.labels[i], images.labels[j])), **extra}


def _duplicates(images: _Images, max_distance: int) -> tuple[list[dict], list[dict]]:
    """(exact, near) duplicate pairs; leakage (cross-split) first. An exact group pairs each copy with the first."""
    groups: dict[str, list[int]] = {}
    for i, h in enumerate(images.hashes):
        if h:
            groups.setdefault(h, []).append(i)
    exact = [_pair(images, g[0], j) for g in groups.values() for j in g[1:]]
    readable = np.flatnonzero(images.readable)
    pairs, distance = near_pairs(images.dhashes[readable], max_distance)
    near = []
    for (i, j), d in zip(readable[pairs].tolist(), distance.tolist(), strict=True):
        if images.hashes[i] != images.hashes[j]:  # identical ones are listed as exact
            near.append(_pair(images, i, j, distance=d))
    key = lambda p: (not p["cross_split"], p.get("distance", 0))  # noqa: E731
    return sorted(exact, key=key), sorted(near, key=key)


def _counts(images: _Images) -> dict[str, dict[str, int]]:
    counts = {}
    for split in dict.fromkeys(images.split):
        mask = np.array([s == split for s in images.split]) & images.readable
        per_class = images.labels[mask].astype(np.int64).sum(axis=0) if images.multilabel else \
            np.bincount(images.labels[mask], minlength=len(images.classes))
        counts[split] = dict(zip(images.classes, per_class.tolist(), strict=True))
    return counts


def imbalance(train_counts: dict[str, int]) -> float:
    """Largest training class over smallest (inf when a class has no readable image)."""
    smallest = min(train_counts.values())
    return float("inf") if smallest == 0 else max(train_counts.values()) / smallest


def _file_issues(images: _Images, min_side: int) -> dict:
    """Header findings of a folder: unreadable, small, extreme aspect, unusual channel modes, EXIF rotations."""
    found = {"unreadable": [], "small": [], "extreme_aspect": [], "unusual_mode": [], "exif_rotated": []}
    modes: dict[str, int] = {}
    for file, info in zip(images.files, images.infos, strict=True):
        if "error" in info:
            found["unreadable"].append({"file": file, "reason": info["error"]})
            continue
        w, h = info["width"], info["height"]
        if min(w, h) < min_side:
            found["small"].append({"file": file, "width": w, "height": h})
        if max(w, h) > ASPECT_LIMIT * min(w, h):
            found["extreme_aspect"].append({"file": file, "width": w, "height": h})
        kind = channel_kind(info["mode"], info["alpha"])
        modes[kind or "RGB"] = modes.get(kind or "RGB", 0) + 1
        if kind:
            found["unusual_mode"].append({"file": file, "mode": info["mode"], "kind": kind})
        if info["orientation"] != 1:
            found["exif_rotated"].append({"file": file, "orientation": info["orientation"]})
    return {"channel_modes": modes, "min_side": min_side, "aspect_limit": ASPECT_LIMIT,
            **{k: {"count": len(v), "files": v[:MAX_PAIRS]} for k, v in found.items()}}


def suggest_command(data: str, data_dir: str | None, ratio: float, multilabel: bool = False,
                    sampler: bool = True) -> str:
    """The train command this audit points to: class weights beyond 3:1, a balanced sampler beyond 10:1
    (not both: they would correct the imbalance twice; shards, read in their own order, take the weights),
    and a checkpoint chosen by balanced accuracy; for multi-label data beyond 3:1, each label's positives
    weighed by its negatives (--pos-weight auto)."""
    parts = ["imgcls train", f"--data {shlex.quote(data)}"] + ([f"--data-dir {shlex.quote(data_dir)}"] if data_dir
                                                                else [])
    if multilabel:
        return " ".join(parts + (["--pos-weight auto"] if ratio > WEIGHTS_RATIO else []))
    if ratio > SAMPLER_RATIO and sampler:
        parts.append("--sampler balanced")
    elif ratio > WEIGHTS_RATIO:
        parts.append("--class-weights auto")
    if ratio > WEIGHTS_RATIO:
        parts.append("--monitor balanced_acc")
    return " ".join(parts)


def _warnings(report: dict) -> list[str]:
    out = []
    for kind in ("exact", "near"):
        pairs = report[f"{kind}_duplicates"]
        if pairs["leakage"]:
            out.append(f"leakage: {pairs['leakage']} {kind}-duplicate pair(s) across splits; remove one image of "
                       "each from the held-out split")
        if pairs["count"] - pairs["leakage"]:
            out.append(f"{pairs['count'] - pairs['leakage']} {kind}-duplicate pair(s) within a split")
        if pairs["label_conflicts"] and kind == "exact":  # near pairs with two labels are often look-alikes
            out.append(f"{pairs['label_conflicts']} {kind}-duplicate pair(s) carry different labels; fix the labels")
    ratio = report["imbalance_ratio"]
    if ratio > WEIGHTS_RATIO:
        small = ", ".join(f"{c} ({n})" for c, n in report["smallest_classes"])
        out.append(f"imbalance: the largest training class has {ratio:.1f}x the images of the smallest ({small})")
    files = report.get("files") or {}
    for key, what in (("unreadable", "unreadable file(s), skipped by training"),
                      ("small", f"image(s) with a side under {files.get('min_side')} px (half the training size)"),
                      ("extreme_aspect", f"image(s) longer than {ASPECT_LIMIT:g}:1 (the centre crop cuts most)"),
                      ("unusual_mode", "image(s) not in 8-bit RGB (converted on load)"),
                      ("exif_rotated", "image(s) with an EXIF rotation (applied on load)")):
        if files.get(key, {}).get("count"):
            out.append(f"{files[key]['count']} {what}")
    return out


def _pair_summary(pairs: list[dict]) -> dict:
    return {"count": len(pairs), "leakage": sum(p["cross_split"] for p in pairs),
            "label_conflicts": sum(not p["same_label"] for p in pairs), "pairs": pairs[:MAX_PAIRS]}


def audit(data: str, data_dir: str | None = None, img_size: int | None = None,
          max_distance: int = NEAR_DISTANCE, threads: int = 2, progress: bool = True) -> Audit:
    """Audit `data` (cifar10, cifar10-mini, an image folder, a manifest, or shards written by imgcls shard).
    `img_size`: the training size, below half of which a folder image counts as small (default 64, as in
    train)."""
    from imgcls.config import MAX_IMG_SIZE
    from imgcls.data.datasets import MIN_IMG_SIZE

    if img_size is not None and not MIN_IMG_SIZE <= img_size <= MAX_IMG_SIZE:
        raise UserError(f"--img-size must be a whole number from {MIN_IMG_SIZE} to {MAX_IMG_SIZE} (got {img_size}); "
                        "pass the size you will train at, e.g. --img-size 64")
    if not 0 <= max_distance <= 16:
        raise UserError(f"--max-distance must be from 0 to 16 bits of 64 (got {max_distance}); beyond 16, distinct "
                        f"images match: keep the default {NEAR_DISTANCE}")
    builtin = data in BUILTIN_DATA
    if data_dir and not builtin:
        raise UserError("--data-dir is for --data cifar10; for an image folder pass its path to --data")
    shards = is_shards(data)
    decoded = builtin or shards  # no files of their own: no header facts, no unreadable files
    start = time.perf_counter()
    if decoded:
        images = _decoded_images(data, data_dir)
    elif is_manifest(data):
        images = _manifest_images(Path(data), threads, progress)
    else:
        images = _folder_images(Path(data), threads, progress)
    loaded = time.perf_counter()
    exact, near = _duplicates(images, max_distance)
    elapsed = time.perf_counter() - start
    counts = _counts(images)
    ratio = imbalance(counts["train"])
    report = {
        "data": data, "images": len(images.labels), "classes": images.classes, "counts": counts,
        "task": "multilabel" if images.multilabel else "multiclass",
        "imbalance_ratio": ratio,
        "smallest_classes": sorted(counts["train"].items(), key=lambda kv: kv[1])[:3],
        "exact_duplicates": _pair_summary(exact), "near_duplicates": _pair_summary(near),
        "near_duplicate_max_distance": max_distance,
        "files": None if decoded else _file_issues(images, max(1, (img_size or 64) // 2)),
        "seconds": {"read_and_hash": elapsed if not builtin else elapsed - (loaded - start), "total": elapsed},
    }
    report["images_per_s"] = len(images.labels) / max(report["seconds"]["read_and_hash"], 1e-9)
    report["warnings"] = _warnings(report)
    report["suggested_command"] = suggest_command(data, data_dir, ratio, images.multilabel, sampler=not shards)
    offsets, n = {}, 0
    for split in dict.fromkeys(images.split):
        offsets[split] = n
        n += images.split.count(split)
    return Audit(report, images.thumbs, offsets)


FEW_VAL_IMAGES = 20  # validation images of a class below which choosing an epoch on them is noise


def images_per_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images of each class: class indices counted, or multi-hot rows summed (a multi-label run's)."""
    if labels.dim() == 2:
        return labels.long().sum(dim=0)
    return torch.bincount(labels, minlength=num_classes)


def quick_audit(dataset: Dataset) -> list[str]:
    """One-line warnings about what training should not start on unawares: the same image (same decoded
    pixels) in two splits, training classes more than 3:1 apart, and classes with fewer than FEW_VAL_IMAGES
    validation images. Cheap: a hash per in-memory image; a streamed dataset is not checked for leakage."""
    warnings = []
    splits = [(n, s) for n, s in (("train", dataset.train), ("val", dataset.val), ("test", dataset.test)) if s]
    if all(s.images is not None for _, s in splits):
        seen: dict[str, str] = {}
        leaks: dict[tuple[str, str], int] = {}
        for name, split in splits:
            mine = set(_pixel_hashes(split.images))
            for h in mine:
                if h in seen and seen[h] != name:
                    leaks[(seen[h], name)] = leaks.get((seen[h], name), 0) + 1
            for h in mine:
                seen.setdefault(h, name)
        for (a, b), n in leaks.items():
            source = dataset.fingerprint.get("source", dataset.name)  # the path as given, not only its name
            warnings.append(f"leakage: {n} image(s) of {b} also appear in {a}; run imgcls audit "
                            f"{shlex.quote(str(source))} to list them and remove them from {b}")
    labels = [s.labels for s in (dataset.train, dataset.val) if s is not None]
    counts = images_per_class(torch.cat(labels), dataset.num_classes)
    ratio = imbalance(dict(zip(dataset.classes, counts.tolist(), strict=True)))
    if ratio > WEIGHTS_RATIO:
        smallest = dataset.classes[int(counts.argmin())]
        fix = ("--pos-weight auto" if dataset.multilabel else
               "--class-weights auto or --sampler balanced, and --monitor balanced_acc")
        warnings.append(f"imbalance: the largest class has {ratio:.1f}x the training images of the smallest "
                        f"({smallest}); consider {fix}")
    return warnings + _few_val_images(dataset)


def _few_val_images(dataset: Dataset) -> list[str]:
    """A class with fewer than FEW_VAL_IMAGES validation images: one image moves its recall by 5% or more, so
    the epoch the validation score chooses as best rests on noise."""
    if dataset.val is None:
        return []
    counts = images_per_class(dataset.val.labels, dataset.num_classes).tolist()
    few = sorted((n, c) for c, n in zip(dataset.classes, counts, strict=True) if n < FEW_VAL_IMAGES)
    if not few:
        return []
    listed = ", ".join(f"{c} {n}" for n, c in few[:5]) + (", ..." if len(few) > 5 else "")
    return [f"validation: {len(few)} class(es) have fewer than {FEW_VAL_IMAGES} validation images ({listed}), so "
            "the best epoch is chosen on a handful of images; raise --val-fraction, or add images to the val/ folder"]
