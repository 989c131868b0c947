"""Checkpoint files: written atomically, read without executing pickled code."""

from __future__ import annotations

import io
import pickle
import zipfile
from pathlib import Path

import torch

from imgcls.errors import UserError
from imgcls.rundir import atomic_write_bytes

FORMAT = "imgcls-checkpoint-1"


def save_checkpoint(payload: dict, path: Path) -> None:
    """Save with a format tag; a crash mid-write leaves the previous file intact."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def load_checkpoint(path: str | Path, model_name: str | None = None, num_classes: int | None = None) -> dict:
    """Load with weights_only=True and check it belongs to `model_name` with `num_classes`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path or the run folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        reason = str(e).splitlines()[0][:120]
        raise UserError(
            f"checkpoint {path} is damaged or truncated ({reason}); "
            "use the run's other checkpoint (best.pt or last.pt) or train again"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an imgcls checkpoint; pass a best.pt or last.pt written by imgcls train")
    found = (ckpt["model_name"], ckpt["num_classes"])
    if model_name is not None and found[0] != model_name or num_classes is not None and found[1] != num_classes:
        raise UserError(
            f"checkpoint {path} holds {found[0]} with {found[1]} classes, but this run needs "
            f"{model_name} with {num_classes} classes; pass a checkpoint from the same run"
        )
    return ckpt
