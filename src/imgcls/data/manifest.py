"""Manifests: a CSV or JSONL file that lists images and their labels, for data an ImageFolder cannot hold
(several labels per image).

Two layouts, told apart by the header:
  path,labels[,split]         labels separated by ';' or spaces (the Kaggle Planet / Open Images style);
                              an image may have none
  path,CLASS,CLASS,...[,split] one 0/1 column per class (the CheXpert style)
JSONL holds one object per line with the same keys ("labels" a list or a separated string). Paths are
relative to the manifest's folder. `split` is train, val or test; without the column everything is train
and validation is carved as for folders. Every bad row is a one-line error that names the row and field.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls.data.folder import IMG_EXTS, SPLIT_NAMES, class_name_problem, class_names_problem
from imgcls.errors import UserError, shown
from imgcls.rundir import read_text, strict_json

MANIFEST_SUFFIXES = (".csv", ".jsonl")
PATH_COLUMNS = ("path", "image", "file", "filename")
MAX_MANIFEST_BYTES = 512 * 2**20
SEPARATORS = re.compile(r"[;\s]+")


@dataclass
class Manifest:
    root: Path  # the folder paths are relative to
    classes: list[str]
    files: list[Path]
    targets: np.ndarray  # uint8 N x C multi-hot
    splits: list[str]  # per row: train, val or test
    has_split_column: bool

    @property
    def multilabel(self) -> bool:
        """Whether some image has other than exactly one label: then only a multi-label task fits."""
        return bool((self.targets.sum(axis=1) != 1).any())

    @property
    def names(self) -> list[str]:
        """Each row's image name (data/exclusions.py): its split and its path as the manifest gives it."""
        return [f"{split}/{file.relative_to(self.root).as_posix()}" for split, file in zip(self.splits, self.files,
                                                                                            strict=True)]

    def given(self, i: int) -> str:
        """Row i's labels, joined by ';' in class order: what an exclusion list records as the given label."""
        return ";".join(c for c, on in zip(self.classes, self.targets[i], strict=True) if on)


def is_manifest(data: str) -> bool:
    return Path(data).suffix.lower() in MANIFEST_SUFFIXES and Path(data).is_file()


def read_manifest(path: str | Path) -> Manifest:
    path = Path(path)
    where = shown(str(path))
    text = read_text(path, f"manifest {where}", MAX_MANIFEST_BYTES, "save it as UTF-8 text, split if large")
    rows = _jsonl_rows(text, where) if path.suffix.lower() == ".jsonl" else _csv_rows(text, where)
    if not rows:
        raise UserError(f"manifest {where} lists no images; add a row per image")
    header = list(rows[0][1])
    path_key = next((k for k in PATH_COLUMNS if k in header), None)
    if path_key is None:
        raise UserError(f"manifest {where} has no path column (one of {', '.join(PATH_COLUMNS)}); name the column "
                        "of image paths 'path'")
    split_key = "split" if "split" in header else None
    if "labels" in header:
        classes, targets = _listed_labels(rows, where)
    else:
        columns = [k for k in header if k not in (path_key, split_key)]
        classes, targets = _indicator_columns(rows, columns, where)
    files, splits, seen = [], [], {}
    for (n, row), _ in zip(rows, targets, strict=True):
        name = str(row.get(path_key, "")).strip()
        file = _checked_file(name, path.parent, n, where)
        real = file.resolve()  # one image under two spellings (a link, ./) is one image
        if real in seen:
            raise UserError(f"manifest {where} row {n}: {shown(name)} is the image of row {seen[real]} again; "
                            "give each image one row with all its labels")
        seen[real] = n
        split = str(row.get(split_key, "train")).strip().lower() if split_key else "train"
        if split not in SPLIT_NAMES:
            raise UserError(f"manifest {where} row {n}: split {shown(split)} is not train, val or test")
        files.append(file)
        splits.append(split)
    if "train" not in splits:
        raise UserError(f"manifest {where} has no train rows; mark the training images split=train")
    return Manifest(path.parent, classes, files, targets, splits, split_key is not None)


def _csv_rows(text: str, where: str) -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return []
    if len(set(header)) != len(header):
        raise UserError(f"manifest {where}: the header names a column twice; name each column once")
    rows = []
    for n, values in enumerate(reader, 2):
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise UserError(f"manifest {where} row {n} has {len(values)} field(s), the header {len(header)}; "
                            "repair the row (quote a field that holds a comma)")
        rows.append((n, dict(zip(header, values, strict=True))))
    return rows


def _jsonl_rows(text: str, where: str) -> list[tuple[int, dict]]:
    rows, keys = [], None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = strict_json(line)
        except ValueError as e:  # not JSON, nested too deeply, or a key given twice
            why = f" ({e})" if "given twice" in str(e) else ""
            raise UserError(f"manifest {where} line {n} is not a JSON object{why}; write one object per line, each "
                            "key once") from None
        if not isinstance(row, dict):
            raise UserError(f"manifest {where} line {n} is not a JSON object; write one object per line")
        if keys is None:
            keys = set(row)
        elif set(row) != keys:
            raise UserError(f"manifest {where} line {n} has keys {sorted(row)}, the first line {sorted(keys)}; "
                            "give every line the same keys")
        rows.append((n, row))
    return rows


def _label_list(value, n: int, where: str) -> list[str]:
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            raise UserError(f"manifest {where} row {n}: labels must be names (strings)")
        labels = [v.strip() for v in value]
    elif isinstance(value, str):
        labels = [v for v in SEPARATORS.split(value.strip()) if v]
    else:
        raise UserError(f"manifest {where} row {n}: labels must be a list or a ';'-separated string")
    for label in labels:
        problem = class_name_problem(label)
        if problem:
            raise UserError(f"manifest {where} row {n}: label {shown(label)}: {problem}")
    if len(set(labels)) != len(labels):
        raise UserError(f"manifest {where} row {n} names a label twice; list each once")
    return labels


def _listed_labels(rows, where: str) -> tuple[list[str], np.ndarray]:
    lists = [_label_list(row["labels"], n, where) for n, row in rows]
    classes = sorted({label for labels in lists for label in labels})
    problem = class_names_problem(classes)
    if problem:
        raise UserError(f"manifest {where}: {problem}; write each label one way")
    if len(classes) < 2:
        raise UserError(f"manifest {where} names {len(classes)} label(s); a classifier needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(rows), len(classes)), dtype=np.uint8)
    for i, labels in enumerate(lists):
        targets[i, [index[label] for label in labels]] = 1
    return classes, targets


def _indicator_columns(rows, columns: list[str], where: str) -> tuple[list[str], np.ndarray]:
    if len(columns) < 2:
        raise UserError(f"manifest {where} has neither a labels column nor two or more 0/1 class columns; add "
                        "'labels' (names separated by ';') or one 0/1 column per class")
    for c in columns:
        problem = class_name_problem(c)
        if problem:
            raise UserError(f"manifest {where}: class column {shown(c)}: {problem}")
    problem = class_names_problem(columns)
    if problem:
        raise UserError(f"manifest {where}: {problem}; name each class column one way")
    targets = np.zeros((len(rows), len(columns)), dtype=np.uint8)
    for i, (n, row) in enumerate(rows):
        for j, c in enumerate(columns):
            value = row[c]
            value = value.strip() if isinstance(value, str) else value
            if value in ("1", 1, True, "1.0"):
                targets[i, j] = 1
            elif value not in ("0", 0, False, "0.0"):
                raise UserError(f"manifest {where} row {n} column {shown(c)}: {shown(repr(value))} is not 0 or 1; "
                                "mark each class 0 or 1 (map uncertain or blank values to one of them first)")
    return columns, targets


def _checked_file(name: str, root: Path, n: int, where: str) -> Path:
    if not name:
        raise UserError(f"manifest {where} row {n} has an empty path")
    if any(ord(c) < 32 for c in name) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise UserError(f"manifest {where} row {n}: {shown(name)} is not a path inside the manifest's folder; "
                        "give paths relative to it")
    file = root / name
    if Path(name).suffix.lower() not in IMG_EXTS:
        raise UserError(f"manifest {where} row {n}: {shown(name)} is not an image file name "
                        f"({', '.join(sorted(IMG_EXTS))})")
    if not file.is_file():
        raise UserError(f"manifest {where} row {n}: {shown(name)} does not exist beside the manifest; check the path")
    if not file.resolve().is_relative_to(root.resolve()):
        raise UserError(f"manifest {where} row {n}: {shown(name)} leads outside the manifest's folder (a link); "
                        "copy the image into the folder")
    return file
