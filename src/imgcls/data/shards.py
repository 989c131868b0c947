"""WebDataset shards: a dataset written once as tar files of already-resized images, for data too big for
one folder walk or one machine's memory, read the same way on every rank of a cluster.

    DIR/shards.json             classes, image size, per split its shards (name, samples, bytes, sha256) and
                                labels in shard order, a content digest; sealed
    DIR/{split}-{k:06d}.tar     samples `{split}-{i:08d}.cls` (the class index) and `.png` or `.jpg` (S x S
                                RGB), the layout timm's and OpenCLIP's WebDataset readers take

PNG (the default) keeps exactly the pixels a folder run trains on; JPEG at quality 95 (4:4:4) is smaller and
decodes faster (bench/shard_throughput.py, docs/results.md).

Samples are written in a seeded random order, so every shard mixes the classes. Training reads them a
chunk at a time (data/shards.py `epoch_chunks`): each epoch the shards are shuffled (seeded), the sequence
is cut into one contiguous range per rank (no sample twice across ranks; every rank the same count) and
each range into chunks of at most one shard, shuffled within (seeded), which the DataLoader's workers
decode in parallel and hand back in order: memory stays at a few shards, the order does not depend on the
worker count, and a run resumed mid-epoch skips the chunks already trained on and continues at the sample.
Evaluation reads the shards in order. Every sample's key and class are checked against the manifest as it
is read, every shard's size before any is read, and every shard read, in whole or in part, against its
sha256 (a second pass over the file, mostly from the page cache).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import secrets
import shutil
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from braceexpand import braceexpand  # webdataset's dependency
from PIL import Image

from imgcls.errors import UserError
from imgcls.rundir import file_digest

MANIFEST = "shards.json"
FORMAT = "imgcls-shards/1"
SPLITS = ("train", "val", "test")
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}  # the member's extension: Pillow's format name
JPEG_QUALITY = 95
MAX_PATTERN_NAMES = 100_000
MIN_SAMPLE_BYTES = 2048  # two tar members, each a 512-byte header and at least one 512-byte block
MAX_OUT_OF_ORDER = 4096  # samples read in an order other than the shards' (a report's gallery) held at once


@dataclass(frozen=True)
class ShardFile:
    path: Path
    count: int
    bytes: int
    first: int  # the split index of its first sample
    sha256: str  # as the manifest records it (the dataset fingerprint's content)


@dataclass
class ShardSplit:
    """One split of a shard set: its files, in order, with the labels the manifest gives its samples."""

    name: str
    files: list[ShardFile]
    labels: torch.Tensor  # int64, the manifest's, in shard order
    size: int
    ext: str  # of the image members, a key of IMAGE_FORMATS
    keep: torch.Tensor | None = None  # a subset: the split indices it holds, in its order

    def __len__(self) -> int:
        return len(self.keep) if self.keep is not None else len(self.labels)

    def subset(self, idx: torch.Tensor) -> ShardSplit:
        ids = self.keep[idx] if self.keep is not None else idx
        return replace(self, keep=ids.clone())

    def ids(self, order: torch.Tensor) -> torch.Tensor:
        """The split indices of positions `order` of this (sub)set."""
        return self.keep[order] if self.keep is not None else order

    def read(self, shard: int, start: int, stop: int) -> torch.Tensor:
        """uint8 (stop - start) x 3 x S x S: samples [start, stop) of shard `shard`, checked."""
        f = self.files[shard]
        out = np.empty((stop - start, self.size, self.size, 3), dtype=np.uint8)
        try:
            with tarfile.open(f.path, "r:") as tar:
                self._read_members(tar, f, start, stop, out)
        except (tarfile.TarError, EOFError, OSError) as e:  # a header or member cut or overwritten
            raise _damaged(f.path, f"it does not read as a tar file ({str(e).splitlines()[0] if str(e) else e!r})"
                           ) from None
        # the whole file's digest, also when a rank reads a part (a pass over it, mostly from the page cache)
        if file_digest(f.path) != f.sha256:
            raise _damaged(f.path, "its sha256 is not the manifest's (a sample's pixels were changed)")
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def _read_members(self, tar: tarfile.TarFile, f: ShardFile, start: int, stop: int, out: np.ndarray) -> None:
        count = 0
        for i, (cls, encoded) in enumerate(_samples(tar, f, self.name, self.ext)):
            if i >= stop:
                break
            count = i + 1
            if i < start:
                continue
            index = f.first + i
            if cls != str(int(self.labels[index])).encode():
                raise _damaged(f.path, f"sample {index} has class {cls[:20].decode(errors='replace')!r}, the "
                                       f"manifest {int(self.labels[index])}")
            out[i - start] = _pixels(encoded, self.ext, self.size, f.path, index)
        if count < stop:
            raise _damaged(f.path, f"it holds {count} samples, the manifest {f.count}")

    def in_order(self, ids: torch.Tensor, batch_size: int):
        """uint8 batches of the samples `ids` (split indices), in that order: streamed a shard at a time when
        ascending, else (a few images, such as a report's gallery) gathered first."""
        ascending = bool((ids[1:] >= ids[:-1]).all()) if len(ids) > 1 else True
        if not ascending:
            if len(ids) > MAX_OUT_OF_ORDER:
                raise UserError(f"{len(ids)} samples of the {self.name} shards asked for out of shard order; shards "
                                f"are read in order (at most {MAX_OUT_OF_ORDER} otherwise)")
            unique = torch.unique(ids)
            got = torch.cat(list(self.in_order(unique, max(1, len(unique)))))
            at = {int(i): k for k, i in enumerate(unique.tolist())}
            pixels = got[[at[int(i)] for i in ids.tolist()]]
            for s in range(0, len(ids), batch_size):
                yield pixels[s : s + batch_size]
            return
        def per_shard():
            for shard, f in enumerate(self.files):
                mine = ids[(ids >= f.first) & (ids < f.first + f.count)] - f.first
                if len(mine):
                    yield (self.read(shard, int(mine.min()), int(mine.max()) + 1)[mine - mine.min()],)

        for (pixels,) in _rebatch(per_shard(), batch_size):
            yield pixels


def _rebatch(parts, batch_size: int):
    """Tuples of tensors aligned on their first dimension (a shard's or a chunk's pixels and indices), cut into
    batches of `batch_size`, the last maybe short: views into each part, and only a tail that fills no batch is
    joined to the next part (joining the whole remainder for every batch copied a shard per batch)."""
    rest = None
    for part in parts:
        if rest is not None:
            take = min(batch_size - len(rest[0]), len(part[0]))
            rest = tuple(torch.cat([r, p[:take]]) for r, p in zip(rest, part, strict=True))
            part = tuple(p[take:] for p in part)
            if len(rest[0]) < batch_size:
                continue
            yield rest
            rest = None
        full = len(part[0]) - len(part[0]) % batch_size
        for start in range(0, full, batch_size):
            yield tuple(p[start : start + batch_size] for p in part)
        if full < len(part[0]):
            rest = tuple(p[full:].clone() for p in part)
    if rest is not None:
        yield rest


def _samples(tar: tarfile.TarFile, f: ShardFile, split: str, ext: str):
    """(class bytes, image bytes) of each sample of one shard, its members checked to be the expected pairs."""
    members = iter(tar)
    for i in range(f.count):
        key = f"{split}-{f.first + i:08d}"
        pair = {}
        for part in ("cls", ext):
            member = next(members, None)
            if member is None or member.name != f"{key}.{part}" or not member.isfile():
                found = "nothing" if member is None else repr(member.name)
                raise _damaged(f.path, f"expected {key}.{part}, found {found}")
            pair[part] = tar.extractfile(member).read()
        yield pair["cls"], pair[ext]


def _pixels(encoded: bytes, ext: str, size: int, path: Path, index: int) -> np.ndarray:
    kind = IMAGE_FORMATS[ext]
    try:
        with Image.open(io.BytesIO(encoded)) as img:
            if img.format != kind or img.size != (size, size) or img.mode != "RGB":
                raise _damaged(path, f"sample {index} is not a {size} x {size} RGB {kind}")
            return np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise _damaged(path, f"sample {index} does not decode ({e})") from None


def _damaged(path: Path, what: str) -> UserError:
    return UserError(f"shard {path} is damaged: {what}; write the shards again with imgcls shard")


# ---------------------------------------------------------------- training order


@dataclass(frozen=True)
class Chunk:
    shard: int
    start: int  # positions in the shard
    stop: int
    seed: int  # of its shuffle
    skip: int = 0  # of its shuffled samples, the first `skip` already trained on


def epoch_chunks(split: ShardSplit, seed: int, rank: int, world: int, done: int) -> list[Chunk]:
    """This rank's chunks of an epoch: the shards in a seeded order, the sequence cut into `world` equal
    contiguous ranges (the last N mod world samples of it left out), this rank's range cut at the shard
    boundaries; the first `done` samples (a resumed run's) skipped."""
    if split.keep is not None:
        raise ValueError("training reads whole shard splits")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split.files), generator=gen).tolist()
    per_rank = len(split.labels) // world
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    chunks, at = [], 0
    for shard in order:
        count = split.files[shard].count
        start, stop = max(lo, at) - at, min(hi, at + count) - at
        if start < stop:
            chunks.append(Chunk(shard, start, stop, (seed * 1_000_003 + shard) % 2**63))
        at += count
    out = []
    for c in chunks:
        n = c.stop - c.start
        if done >= n:
            done -= n
            continue
        out.append(replace(c, skip=done))
        done = 0
    return out


def steps_per_epoch(split: ShardSplit, local_batch: int, world: int) -> int:
    return math.ceil(len(split.labels) // world / local_batch)


class _ChunkReader(torch.utils.data.Dataset):
    """Chunk k, decoded and shuffled: (uint8 n x 3 x S x S, split indices), for the DataLoader's workers."""

    def __init__(self, split: ShardSplit, chunks: list[Chunk]):
        self.split, self.chunks = split, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        c = self.chunks[k]
        try:
            pixels = self.split.read(c.shard, c.start, c.stop)
        except UserError as e:  # handed back as it is: a worker's exception reaches the caller wrapped in its traceback
            return e, None
        order = torch.randperm(c.stop - c.start, generator=torch.Generator().manual_seed(c.seed))[c.skip :]
        return pixels[order], self.split.files[c.shard].first + c.start + order


def chunk_batches(split: ShardSplit, chunks: list[Chunk], labels: torch.Tensor, batch_size: int, workers: int):
    """(images, labels) batches of `batch_size` over the chunks in order (the last may be short); `labels`
    are the Split's, indexed by split index."""
    loader = torch.utils.data.DataLoader(_ChunkReader(split, chunks), batch_size=None, num_workers=workers,
                                         prefetch_factor=1 if workers else None)

    def per_chunk():
        for pixels, index in loader:
            if isinstance(pixels, UserError):  # a worker's refusal, handed back as it is
                raise pixels
            yield pixels, index

    for pixels, index in _rebatch(per_chunk(), batch_size):
        yield pixels, labels[index]


# ---------------------------------------------------------------- reading a shard set


def is_shards(data: str) -> bool:
    path = Path(str(data))
    return (path.is_dir() and (path / MANIFEST).is_file()) or (str(data).endswith(".tar") or ".tar}" in str(data))


def read_shards(data: str, need_train: bool = True) -> tuple[dict, dict[str, ShardSplit]]:
    """(the manifest, its splits) of a shard folder, or of the shards a brace pattern names (`DIR/train-
    {000000..000009}.tar`; their folder holds the manifest), every file's size checked. Training needs
    the train shards among them; prediction takes any split."""
    from imgcls.rundir import read_sealed_json

    path = Path(str(data))
    folder = path if path.is_dir() else path.parent
    if not (folder / MANIFEST).is_file():
        raise UserError(f"{data}: no {MANIFEST} in {folder}; pass a folder written by imgcls shard, or a pattern of "
                        "its tar files")
    manifest = read_sealed_json(folder / MANIFEST, "write the shards again with imgcls shard")
    _check_manifest(manifest, folder)
    chosen = None if path.is_dir() else _pattern_names(str(data), path.name, manifest, folder)
    splits = {}
    for name, part in manifest["splits"].items():
        files, first = [], 0
        for entry in part["shards"]:
            files.append(ShardFile(folder / entry["name"], entry["count"], entry["bytes"], first, str(entry["sha256"])))
            first += entry["count"]
        if chosen is not None and not chosen & {f.path.name for f in files}:
            continue
        if chosen is not None and not {f.path.name for f in files} <= chosen:
            raise UserError(f"{data} names part of the {name} shards; a split is read whole: name all of "
                            f"{name}-*.tar or none")
        for f in files:
            if not f.path.is_file():
                raise UserError(f"shard {f.path} is missing; restore it, or write the shards again with imgcls shard")
            if f.path.stat().st_size != f.bytes:
                raise _damaged(f.path, f"it has {f.path.stat().st_size} bytes, the manifest {f.bytes}")
            if f.count * MIN_SAMPLE_BYTES > f.bytes:  # the manifest's count is bounded by the file before any read
                raise _damaged(f.path, f"{f.bytes} bytes cannot hold the {f.count} samples its manifest says")
        splits[name] = ShardSplit(name, files, torch.tensor(part["labels"], dtype=torch.int64), manifest["img_size"],
                                  manifest["image_format"])
    if need_train and "train" not in splits:
        raise UserError(f"{data} holds no train shards; name them too")
    return manifest, splits


def _pattern_names(data: str, pattern: str, manifest: dict, folder: Path) -> set[str]:
    """The file names a brace pattern expands to, every one a shard the manifest lists: read lazily, so a
    pattern of a billion names is refused at the first name that is not a shard, not after expanding it."""
    listed = {e["name"] for p in manifest["splits"].values() for e in p["shards"]}
    # braceexpand makes each {A..B} a list before it expands the rest: a range is bounded before it runs
    for low, high in re.findall(r"\{(-?\d+)\.\.(-?\d+)(?:\.\.-?\d+)?\}", data):
        if abs(int(high) - int(low)) >= MAX_PATTERN_NAMES:
            raise UserError(f"{data} has a range of over {MAX_PATTERN_NAMES} names; name each shard once")
    names = set()
    for k, name in enumerate(braceexpand(pattern)):
        if k == MAX_PATTERN_NAMES:
            raise UserError(f"{data} expands to over {MAX_PATTERN_NAMES} names; name each shard once")
        name = Path(name).name
        if name not in listed:
            raise UserError(f"{data} names {name}, which {folder / MANIFEST} does not list")
        names.add(name)
    return names


def _check_manifest(m: dict, folder: Path) -> None:
    where = folder / MANIFEST
    ok = (m.get("format") == FORMAT and isinstance(m.get("classes"), list) and len(m["classes"]) >= 2
          and len(set(m["classes"])) == len(m["classes"]) and all(isinstance(c, str) for c in m["classes"])
          and isinstance(m.get("img_size"), int) and 8 <= m["img_size"] <= 1024
          and m.get("image_format") in IMAGE_FORMATS
          and isinstance(m.get("splits"), dict) and set(m["splits"]) <= set(SPLITS))
    if not ok:
        raise UserError(f"{where} is not an imgcls shard manifest ({FORMAT}); write the shards again with imgcls shard")
    for name, part in m["splits"].items():
        labels, shards = part.get("labels"), part.get("shards")
        if not (isinstance(labels, list) and isinstance(shards, list) and shards
                and all(isinstance(y, int) and 0 <= y < len(m["classes"]) for y in labels)
                and all(isinstance(e, dict) and isinstance(e.get("count"), int) and e["count"] > 0
                        and isinstance(e.get("bytes"), int) and isinstance(e.get("name"), str)
                        and isinstance(e.get("sha256"), str)
                        and e["name"] == Path(e["name"]).name for e in shards)
                and sum(e["count"] for e in shards) == len(labels)):
            raise UserError(f"{where}: split {name!r} is damaged (its shards, counts and labels disagree); write the "
                            "shards again with imgcls shard")


# ---------------------------------------------------------------- writing a shard set


def write_shards(dataset, out: Path, shard_size: int, seed: int = 0, say=None, image_format: str = "png") -> dict:
    """Every split of `dataset` (images already at its size) as shards in `out`, each image a PNG or a JPEG
    (`image_format`: png or jpg), written into a staging folder beside it and renamed into place whole.
    Returns the manifest."""
    from imgcls.rundir import TMP_MARK, remove_stale_temps, write_sealed_json

    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out} exists; shards are written into a new folder: choose another --out")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: the folder {out.parent} does not exist; create it or name another")
    if image_format not in IMAGE_FORMATS:
        raise UserError(f"--image-format must be png or jpg (got {image_format!r})")
    remove_stale_temps(out)
    stage = out.with_name(f".{out.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")  # one per writer
    manifest = {"format": FORMAT, "source": dataset.name, "classes": dataset.classes, "img_size": dataset.img_size,
                "image_format": image_format, "splits": {}}
    try:
        stage.mkdir()
        for name in SPLITS:
            split = getattr(dataset, name)
            if split is not None and len(split):
                manifest["splits"][name] = _write_split(split, name, stage, shard_size, seed, image_format, say)
        digest = hashlib.sha256(json.dumps({n: [e["sha256"] for e in p["shards"]]
                                            for n, p in manifest["splits"].items()}).encode())
        manifest["content_sha256"] = digest.hexdigest()[:16]
        write_sealed_json(stage / MANIFEST, manifest)
        try:
            stage.rename(out)
        except OSError:
            if not out.exists():
                raise
            raise UserError(f"--out {out} was written meanwhile by another process; it is kept as that one wrote "
                            "it, and these shards are not: choose another --out") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _write_split(split, name: str, stage: Path, shard_size: int, seed: int, image_format: str, say) -> dict:
    """One split's shards in `stage`, its samples in a seeded random order: the manifest's entry for it."""
    import webdataset as wds

    encode = {"format": "PNG"} if image_format == "png" else {"format": "JPEG", "quality": JPEG_QUALITY,
                                                               "subsampling": 0}
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    labels, shards = [], []
    writer, count, shard_path = None, 0, None
    for images, ys in split.batches(order, 64):
        for image, y in zip(images, ys.tolist(), strict=True):
            if writer is None:
                shard_path = stage / f"{name}-{len(shards):06d}.tar"
                writer, count = wds.TarWriter(str(shard_path)), 0
            buffer = io.BytesIO()
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, **encode)
            writer.write({"__key__": f"{name}-{len(labels):08d}", "cls": str(int(y)), image_format: buffer.getvalue()})
            labels.append(int(y))
            count += 1
            if count == shard_size:
                writer.close()
                shards.append(_entry(shard_path, count))
                writer = None
        if say:
            say(f"shard: {name} {len(labels)}/{len(split)}")
    if writer is not None:
        writer.close()
        shards.append(_entry(shard_path, count))
    return {"count": len(labels), "shards": shards, "labels": labels}


def _entry(path: Path, count: int) -> dict:
    return {"name": path.name, "count": count, "bytes": path.stat().st_size, "sha256": file_digest(path)}
