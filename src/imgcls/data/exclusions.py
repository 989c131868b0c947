"""Image names that stay put, and `train --exclude FILE`: leaving listed images out of training.

An image's name is its split and its path within the split's folder for folders (`train/cat/cat_00012.jpg`;
a folder of class folders alone is all train), and
`split/index` in the files' own order for the built-in sets (`train/4711`: CIFAR's train index counts
all 50,000, before any validation split is carved). `imgcls audit --labels` names its suspects so, and
the file it writes (or any list of such names, one per line) is what `--exclude` reads.

Listed images leave train and val (the labels training and model selection see); a listed test image
stays, with a warning, so that test scores remain comparable with runs that excluded nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from imgcls.errors import UserError, shown
from imgcls.rundir import read_text

MAX_EXCLUDE_BYTES = 64 * 2**20  # a list of names; far beyond any real dataset's
NAME_COLUMN = "path"  # the column of the audit's label-issues CSV that names each image
GIVEN_COLUMN = "given"  # and the label it had then: a list of other data (train/4711 of cifar10-mini) is refused
GIVEN_MARK = "\x00"  # name + GIVEN_MARK + label: no name holds a NUL (name_problem refuses control characters)


def read_exclusions(path: str | Path) -> list[str]:
    """The image names a file lists: a CSV with a `path` column (the audit's label issues), or one name per
    line (blank lines and lines starting with # skipped). Each bad row is a one-line error naming it."""
    path = Path(path).expanduser()
    where = f"--exclude {shown(str(path))}"
    if not path.is_file():
        raise UserError(f"{where} is not a file; pass the label-issues CSV imgcls audit --labels "
                        "wrote, or a list of image paths, one per line")
    text = read_text(path, where, MAX_EXCLUDE_BYTES, "pass a CSV or a list of image paths")
    lines = text.splitlines()
    first = lines[0] if lines else ""
    header = next(csv.reader([first]), [])
    if NAME_COLUMN in header:
        given = header.index(GIVEN_COLUMN) if GIVEN_COLUMN in header else None
        names = _csv_names(text, header.index(NAME_COLUMN), given, where)
    else:
        names = [(n, line.strip(), None) for n, line in enumerate(lines, 1)
                 if line.strip() and not line.startswith("#")]
    for row, name, _ in names:
        problem = name_problem(name)
        if problem:
            raise UserError(f"{where} row {row}: {problem}; each row names an image as audit "
                            "--labels does, e.g. train/cat/cat_00012.jpg or train/4711")
    if not names:
        raise UserError(f"{where} lists no images; pass the label-issues CSV, or drop --exclude")
    # one image named twice (train/a/1.png and train\a\1.png) is one name: normalised before de-duplication
    posix = [(name.replace("\\", "/"), label) for _, name, label in names]
    return list(dict.fromkeys(f"{name}{GIVEN_MARK}{label}" if label else name for name, label in posix))


def excluded_names(cfg) -> list[str] | None:
    """The names a TrainConfig's --exclude file lists, read now (None without --exclude)."""
    return read_exclusions(cfg.exclude) if cfg.exclude else None


def _csv_names(text: str, column: int, given: int | None, where: str) -> list[tuple[int, str, str | None]]:
    out = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if n == 1 or not row:
            continue
        if len(row) <= max(column, given or 0):
            raise UserError(f"{where} row {n} has {len(row)} field(s), fewer than its header; repair or remove the row")
        out.append((n, row[column].strip(), row[given].strip() if given is not None else None))
    return out


def folder_names(root: Path, split: str, files: list[Path]) -> list[str]:
    """The names of a split's files under a data folder `root` (train/, val/, test/ or class folders alone)."""
    split_root = root / split if (root / "train").is_dir() else root
    return [f"{split}/{Path(f).relative_to(split_root).as_posix()}" for f in files]


def builtin_names(split: str, n: int) -> list[str]:
    return [f"{split}/{i}" for i in range(n)]


def name_problem(name: str) -> str | None:
    """Why `name` cannot name an image of a dataset, or None."""
    parts = name.replace("\\", "/").split("/")
    if not name:
        return "the name is empty"
    if any(ord(c) < 32 for c in name):
        return f"{name!r} holds a control character"
    if name.startswith("/") or any(p in ("", ".", "..") for p in parts):
        return f"{shown(name)} is not a path inside the data folder"
    if parts[0] not in ("train", "val", "test") or len(parts) < 2:
        return f"{shown(name)} does not start with train/, val/ or test/"
    return None


@dataclass(frozen=True)
class Exclusion:
    """What --exclude removed: the names by split, for the data's fingerprint and the run's record."""

    removed: tuple[str, ...]
    kept_test: tuple[str, ...]  # listed test images, which stay

    def fingerprint(self) -> dict:
        digest = hashlib.sha256("\n".join(sorted(self.removed)).encode()).hexdigest()[:16]
        return {"excluded": len(self.removed), "excluded_sha256": digest}


def split_names(names: list[str], known: dict[str, dict[str, str]], source: str) -> Exclusion:
    """`names` checked against the images the data holds (`known`: split -> name -> class); an unknown name, or
    one the list says had another label, is a one-line error, so that a list of another dataset cannot pass
    for this one's."""
    normal = []
    for entry in names:
        name, _, given = entry.partition(GIVEN_MARK)
        name = name.replace("\\", "/")
        label = known.get(name.split("/")[0], {}).get(name)
        if label is None:
            raise UserError(f"--exclude names {shown(name)}, which is no image of {shown(source)}; pass the list "
                            "audit --labels wrote for this data")
        if given and given != label:
            raise UserError(f"--exclude lists {shown(name)} as {shown(given)}, but it is {shown(label)} in "
                            f"{shown(source)}: the list is of other data (or the labels changed); audit this data "
                            "again")
        if name not in normal:  # listed with and without its label: one image
            normal.append(name)
    return Exclusion(tuple(n for n in normal if not n.startswith("test/")),
                     tuple(n for n in normal if n.startswith("test/")))
