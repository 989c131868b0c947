"""The run directory: its file names, and writes that never leave a half-written file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from imgcls.errors import UserError

CONFIG = "config.yaml"  # the fully resolved TrainConfig
DATASET = "dataset.json"  # classes, image size, normalisation, split fingerprint
METRICS = "metrics.jsonl"  # one line per finished epoch
SUMMARY = "summary.json"  # written when training ends
LAST = "last.pt"  # full training state, for --resume
BEST = "best.pt"  # weights of the epoch with the best validation accuracy
CALIBRATION = "calibration.json"  # imgcls calibrate: the scaling fitted on val; eval and predict apply it
REPORT_DIR = "report"  # imgcls report: figures, galleries and report.html
ANALYSIS_JSON, ANALYSIS_NPZ = "analysis.json", "analysis.npz"  # in REPORT_DIR: what the report shows
REPORT_HTML = "report.html"  # in REPORT_DIR of a run, or at the top of a comparison folder


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_run(path: Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def require_run(path: str | Path) -> Path:
    path = Path(path)
    if not is_run(path):
        raise UserError(f"{path} is not an imgcls run (no {CONFIG}); pass a folder made by imgcls train")
    return path


def refuse_existing(out: str | Path) -> None:
    """An explicit --out that already holds files is refused, never overwritten."""
    path = Path(out)
    if path.exists() and any(path.iterdir()):
        raise UserError(
            f"{path} already exists and is not empty; choose another --out, "
            f"or continue a run there with imgcls train --resume {path}"
        )


def new_run_dir(out: str | None, data: str, model: str) -> Path:
    """The folder for a new run: --out if free, else runs/<data>-<model> with a numeric suffix if taken."""
    if out:
        refuse_existing(out)
        path = Path(out)
    else:
        base = Path("runs") / f"{Path(data).name}-{model.replace('/', '_')}"
        path, n = base, 1
        while path.exists():
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    path.mkdir(parents=True, exist_ok=True)
    return path
