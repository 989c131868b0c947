"""Prediction rows (inference/files.py) as a console line, or streamed into a .csv, .jsonl or .parquet file
that lands whole (rundir.atomic_path): a killed or concurrent run never leaves a spliced or cut file."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path

from imgcls import rundir
from imgcls.errors import UserError, shown

OUT_FORMATS = (".csv", ".jsonl", ".parquet")


def check_out(out: str | Path) -> Path:
    """--out checked before any image is scored: a known format, a folder that can hold it."""
    out = Path(out)
    if out.suffix not in OUT_FORMATS:
        raise UserError(f"--out {out} has an unknown format; end it with .csv, .jsonl or .parquet")
    if out.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("writing .parquet needs pyarrow; pip install pyarrow, or use --out preds.csv") from None
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'preds.csv'}")
    rundir.refuse_run_file(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {out.parent} ({e.strerror}); choose another --out") from None
    return out


def format_row(row: dict) -> str:
    """One console line: 'path: cat 0.912, dog 0.051', 'path: unknown (cat 0.41, ...)', multi-label
    'path: [cat;dog] (cat 0.91, dog 0.62, ...)', or 'path: error: ...'."""
    if row["error"]:
        return f"{shown(row['path'])}: error: {row['error']}"
    ranked = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in row["top"])
    path = shown(row["path"], limit=4096)  # a file that was read: its name is whole, but never raw control bytes
    if "labels" in row:  # multi-label: the labels decided, then the ranking
        return f"{path}: [{';'.join(row['labels']) or 'no label'}] ({ranked})"
    return f"{path}: unknown ({ranked})" if row["rejected"] else f"{path}: {ranked}"


def flat_row(row: dict, topk: int) -> dict:
    """A row as table columns: path, label, confidence, rejected, energy, top1..topk and their probabilities, error."""
    flat = {k: row[k] for k in ("path", "label", "confidence", "rejected", "energy")}
    for n in range(topk):
        top = row["top"][n] if n < len(row["top"]) else {"class": None, "probability": None}
        flat[f"top{n + 1}"], flat[f"top{n + 1}_prob"] = top["class"], top["probability"]
    flat["error"] = row["error"]
    return flat


def write_rows(rows: Iterable[dict], out: str | Path, topk: int) -> dict:
    """Stream rows into `out` (checked by `check_out`); returns counts (images, errors, rejected) and whether
    an existing file was replaced."""
    out = check_out(out)
    counts = {"images": 0, "errors": 0, "rejected": 0, "replaced": out.exists()}

    def counted():
        for r in rows:
            counts["images"] += 1
            counts["errors"] += r["error"] is not None
            counts["rejected"] += bool(r["rejected"])
            yield r

    with rundir.atomic_path(out) as tmp:
        {".csv": _write_csv, ".jsonl": _write_jsonl, ".parquet": _write_parquet}[out.suffix](counted(), tmp, topk)
    return counts


def _write_csv(rows, out: Path, topk: int) -> None:
    with open(out, "w", newline="") as f:
        writer = None
        for r in rows:
            flat = flat_row(r, topk)
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(flat))
                writer.writeheader()
            writer.writerow({k: "" if v is None else v for k, v in flat.items()})


def _write_jsonl(rows, out: Path, topk: int) -> None:
    with open(out, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _write_parquet(rows, out: Path, topk: int, chunk: int = 4096) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [("path", pa.string()), ("label", pa.string()), ("confidence", pa.float64()), ("rejected", pa.bool_()),
              ("energy", pa.float64())]
    for n in range(1, topk + 1):
        fields += [(f"top{n}", pa.string()), (f"top{n}_prob", pa.float64())]
    schema = pa.schema(fields + [("error", pa.string())])  # fixed, so a chunk of errors alone has the same types
    with pq.ParquetWriter(out, schema) as writer:
        buffer = []
        for r in rows:
            buffer.append(flat_row(r, topk))
            if len(buffer) == chunk:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                buffer = []
        writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
