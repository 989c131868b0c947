"""Image files through an engine: the paths a user names, decoded in DataLoader workers with the
engine's preprocessing, scored a batch at a time. Memory stays flat however many files there are, and a
file that cannot be read becomes a row with an error, never a crash. WebDataset shards (data/shards.py)
are scored a shard at a time."""

from __future__ import annotations

import glob
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgcls.data.decode import FORMAT_NAMES, DecodeError
from imgcls.data.folder import fit
from imgcls.data.preprocessing import Preprocessing
from imgcls.data.presets import tta_view_count
from imgcls.errors import UserError, first_line, shown
from imgcls.inference.engine import Engine, Scores
from imgcls.inference.reject import energy


def collect_paths(inputs: Iterable[str], list_file: str | None = None, what: str = "predict") -> list[Path]:
    """Files as given, every file under folders (recursively, hidden ones skipped) and glob matches, in the
    given order, folders sorted; then the lines of `list_file` as they are (a UTF-8 byte-order mark and line
    ends dropped; a relative path is taken from the working folder, as on the command line). A name given on
    the command line that matches nothing is refused (a typo); a listed file that is missing, or a folder,
    becomes an error row."""
    paths: list[Path] = []
    for name in inputs:
        found = [Path(p) for p in sorted(glob.glob(name, recursive=True))] if glob.has_magic(name) else [Path(name)]
        problem = path_problem(found[0]) if found else ("", "")
        if problem and problem[0] != "IsADirectoryError":
            why = f" ({problem[1].split(': ', 1)[1]})" if problem[1].startswith("cannot") else ""
            raise UserError(f"{shown(name)} matches no file or folder{why}; check the path or quote the glob")
        for p in found:
            if p.is_dir():  # every entry but folders: a broken link or a device becomes an error row, not a gap
                paths += sorted(f for f in p.rglob("*") if not _is_folder(f)
                                and not any(part.startswith(".") for part in f.relative_to(p).parts))
            else:
                paths.append(p)
    if list_file:
        listed = Path(list_file)
        if not listed.is_file():
            what_is = "is a folder" if listed.is_dir() else "is not a regular file (a device or pipe)" \
                if listed.exists() else "does not exist"
            raise UserError(f"--list {listed} {what_is}; pass a text file with one image path per line (a folder "
                            "goes on the command line)")
        try:
            text = listed.read_text(encoding="utf-8-sig")  # Notepad's byte-order mark is not part of a path
        except UnicodeDecodeError:
            raise UserError(f"--list {listed} is not a UTF-8 text file; pass one image path per line") from None
        paths += [Path(line.strip()) for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not paths:
        raise UserError(f"no files to {what}; pass image files, folders, globs or --list FILE" if what == "predict"
                        else f"no files to {what} in {', '.join(map(str, inputs))}; pass a folder of images")
    return paths


def _is_folder(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a symbolic link loop
        return False


def path_problem(path: Path) -> tuple[str, str] | None:
    """(the error's kind, what is wrong: 'does not exist') when `path` is no image file to open, else None; never
    raises (a name over the file system's 255 bytes makes stat raise where a missing file returns False; a NUL
    cannot be in a name at all)."""
    try:
        if path.is_dir():
            return "IsADirectoryError", "is a folder, not an image file"
        if path.is_file():
            return None
        if path.is_symlink():  # is_file() follows the link: a loop or a missing target
            try:
                path.resolve(strict=True)
            except RuntimeError:
                return "SymlinkLoopError", "is a symbolic link that loops"
            except (OSError, ValueError):
                return "FileNotFoundError", "is a symbolic link to a file that does not exist"
        if path.exists():
            return "NotARegularFile", "is not a regular file (a device, pipe or socket)"
        return "FileNotFoundError", "does not exist"
    except (OSError, ValueError) as e:
        return type(e).__name__, f"cannot be opened: {e.strerror if isinstance(e, OSError) else first_line(e)}"


def path_error(path: Path) -> str | None:
    """path_problem as a prediction row's error: 'FileNotFoundError: a.png does not exist'."""
    problem = path_problem(path)
    return f"{problem[0]}: {shown(str(path))} {problem[1]}" if problem else None


def load_images(paths: list[str | Path], prep: Preprocessing) -> torch.Tensor:
    """Files -> uint8 N x H x W x 3 with `prep`'s decoding, resize and crop; an unreadable one is refused
    (for a handful of named files, as Grad-CAM explains; folders go through `score_files`)."""
    if not paths:
        raise UserError("no images given; pass one or more image files")
    arrays = []
    for p in map(Path, paths):
        problem = path_problem(p)
        if problem:
            raise UserError(f"image {shown(str(p))} {problem[1]}; check the path")
        try:
            arrays.append(prep.load(p))
        except DecodeError as e:
            raise UserError(f"cannot read image {p}: {e}; pass a readable {FORMAT_NAMES} file") from e
    return torch.from_numpy(np.stack(arrays))


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], prep: Preprocessing):
        self.paths, self.prep = paths, prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        path = self.paths[i]
        problem = path_error(path)
        if problem:
            return i, None, problem
        try:
            return i, torch.from_numpy(np.array(self.prep.load(path))), None  # a writable copy
        except Exception as e:  # noqa: BLE001 - any decoder failure is this file's problem, never the run's
            return i, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()


def _collate(items):
    images = [img for _, img, _ in items if img is not None]
    return [i for i, _, _ in items], torch.stack(images) if images else None, [err for _, _, err in items]


def score_files(engine: Engine, paths: list[Path], tta: str | int = "none", workers: int = 2,
                seed: int = 0) -> Iterator[tuple[list[int], Scores | None, list[str | None]]]:
    """Per batch of files: (their indices, the scores of the readable ones in order, an error or None each).
    A batch is what the engine scores in one call (its views counted), as in `Engine.score_split`: so `--tta N`
    draws the same random views for an image here as `imgcls eval` does over a split of the same files."""
    batch = max(1, engine.batch_size // tta_view_count(tta))
    workers = min(workers, max(0, (len(paths) - 1) // batch))  # no worker processes for a handful
    loader = torch.utils.data.DataLoader(_Files(paths, engine.preprocessing), batch_size=batch,
                                         num_workers=workers, collate_fn=_collate)
    gen = torch.Generator().manual_seed(seed)
    for indices, images, errors in loader:
        yield indices, engine.score(images, tta, gen) if images is not None else None, errors


def row(path: Path, classes: list[str], probs: torch.Tensor | None, logits: torch.Tensor | None, topk: int,
        threshold: float | None, error: str | None = None, thresholds: torch.Tensor | None = None) -> dict:
    """One prediction: the top-k classes with calibrated probabilities, the decision (a class, or `unknown`
    when the top-1 probability is under `threshold`), the max-softmax and energy scores; or the error. A
    multi-label model (`thresholds`, one per class) decides every class at or above its own threshold:
    `label` joins them with ';' (empty: none), `labels` lists them."""
    if probs is None:
        return {"path": str(path), "label": None, "confidence": None, "rejected": None, "energy": None, "top": [],
                "error": error}
    order = torch.argsort(probs, descending=True, stable=True)[:topk].tolist()
    if thresholds is not None:  # multi-label: every class at or above its threshold, in order of probability
        chosen = [i for i in torch.argsort(probs, descending=True, stable=True).tolist() if probs[i] >= thresholds[i]]
        return {"path": str(path), "label": ";".join(classes[i] for i in chosen), "confidence": float(probs[order[0]]),
                "rejected": False, "energy": None, "labels": [classes[i] for i in chosen],
                "top": [{"class": classes[i], "probability": float(probs[i])} for i in order], "error": None}
    confidence = float(probs[order[0]])
    rejected = threshold is not None and confidence < threshold
    return {"path": str(path), "label": "unknown" if rejected else classes[order[0]], "confidence": confidence,
            "rejected": rejected, "energy": float(energy(logits[None])[0]),
            "top": [{"class": classes[i], "probability": float(probs[i])} for i in order], "error": None}


def predict_rows(engine: Engine, paths: list[Path], topk: int = 3, tta: str | int = "none",
                 threshold: float | None = None, workers: int = 2) -> Iterator[dict]:
    """One row per path, in order (see `row`)."""
    k = min(topk, len(engine.classes))
    for indices, scores, errors in score_files(engine, paths, tta, workers):
        readable = iter(range(len(scores.probs))) if scores is not None else iter(())
        for i, error in zip(indices, errors, strict=True):
            j = next(readable) if error is None else None
            yield row(paths[i], engine.classes, scores.probs[j] if j is not None else None,
                      scores.logits[j] if j is not None else None, k, threshold, error, engine.thresholds)


def shard_rows(engine: Engine, data: str, topk: int = 3, tta: str | int = "none",
               threshold: float | None = None) -> tuple[int, Iterator[dict]]:
    """(how many, one row per sample) of the shards `data` names (a folder written by imgcls shard: every
    split; a brace pattern: the splits it names), in shard order, a shard decoded at a time; a row's `path`
    is SHARD#KEY, the tar file and the sample's WebDataset key. Samples at a size other than the model's go
    through its resize rule, as a PNG file of them would."""
    from imgcls.data.shards import read_shards

    _, splits = read_shards(data, need_train=False)
    prep, k = engine.preprocessing, min(topk, len(engine.classes))
    batch = max(1, engine.batch_size // tta_view_count(tta))

    def rows() -> Iterator[dict]:
        gen = torch.Generator().manual_seed(0)
        for split in splits.values():
            for shard, f in enumerate(split.files):
                pixels = split.read(shard, 0, f.count).permute(0, 2, 3, 1)  # N x S x S x 3, as files load
                if split.size != prep.img_size or prep.crop_pct != 1.0:
                    pixels = torch.from_numpy(np.stack([fit(Image.fromarray(p.numpy()), prep.img_size,
                                                            prep.crop_pct) for p in pixels]))
                for start in range(0, f.count, batch):
                    scores = engine.score(pixels[start : start + batch], tta, gen)
                    for j in range(len(scores.probs)):
                        name = f"{f.path}#{split.name}-{f.first + start + j:08d}"
                        yield row(Path(name), engine.classes, scores.probs[j], scores.logits[j], k, threshold,
                                  None, engine.thresholds)

    return sum(len(s.labels) for s in splits.values()), rows()


def score_all(engine: Engine, paths: list[Path], workers: int = 2) -> tuple[Scores | None, int]:
    """(scores of every readable file, or None when none was, the number that were not)."""
    parts, unreadable = [], 0
    for _, scores, errors in score_files(engine, paths, workers=workers):
        unreadable += sum(e is not None for e in errors)
        if scores is not None:
            parts.append(scores)
    if not parts:
        return None, unreadable
    return Scores(torch.cat([s.logits for s in parts]), torch.cat([s.probs for s in parts])), unreadable
