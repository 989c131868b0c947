"""Checkpoint files: written atomically, read without executing pickled code, checked before use."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from imgcls.errors import UserError, first_line
from imgcls.rundir import atomic_write_bytes

FORMAT = "imgcls-checkpoint-1"
REQUIRED = ("model_name", "num_classes", "model")  # what every imgcls checkpoint holds besides its format


def save_checkpoint(payload: dict, path: Path) -> None:
    """Save with a format tag; a crash mid-write leaves the previous file intact."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    atomic_write_bytes(Path(path), buffer.getvalue())


def safe_torch_load(path: Path, what: str, fix: str, mmap: bool = False):
    """torch.load with weights_only=True: tensors and plain containers only, nothing executed. `mmap`: the
    tensors are mapped, not read, for a caller that wants the checkpoint's small fields alone.

    Refusals are one line: `what` names the file's role ("checkpoint", "weights file"), `fix` says what
    to pass instead."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # weights_only met a class or function: a pickle that would run code
            raise UserError(f"{what} {path} holds Python objects other than tensors, which imgcls never unpickles "
                            f"(they could run code); {fix}") from e
        raise UserError(f"{what} {path} is damaged or truncated (not a pickle of tensors); {fix}") from e
    except Exception as e:  # noqa: BLE001  garbage makes torch's readers fail in many ways (KeyError, EOFError, ...)
        raise UserError(f"{what} {path} is damaged or truncated ({first_line(e)}); {fix}") from e


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors in `state` that hold a NaN or an infinity in float32, the precision
    models load them in (1e39 in a float64 tensor is finite there, infinite here)."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v.float()).all()]


def load_checkpoint(path: str | Path, model_name: str | None = None, num_classes: int | None = None) -> dict:
    """Load with weights_only=True and check it is an imgcls checkpoint of `model_name` with `num_classes`
    whose weights are all finite."""
    path = Path(path)
    other = "use the run's other checkpoint (best.pt or last.pt) or train again"
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder; pass a checkpoint file (best, last, or a path to a .pt file)")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; check the path or the run folder")
    ckpt = safe_torch_load(path, "checkpoint", other)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an imgcls checkpoint; pass a best.pt or last.pt written by imgcls train")
    absent = [k for k in REQUIRED if k not in ckpt]
    if absent or not isinstance(ckpt["model"], dict):
        raise UserError(f"checkpoint {path} is incomplete (no {', '.join(absent) or 'state dict'}); {other}")
    found = (ckpt["model_name"], ckpt["num_classes"])
    if model_name is not None and found[0] != model_name or num_classes is not None and found[1] != num_classes:
        raise UserError(
            f"checkpoint {path} holds {found[0]} with {found[1]} classes, but this run needs "
            f"{model_name} with {num_classes} classes; pass a checkpoint from the same run"
        )
    bad = nonfinite_tensors(ckpt["model"])
    if bad:
        raise UserError(f"checkpoint {path} holds non-finite weights (NaN or Inf in {len(bad)} tensors, e.g. "
                        f"{bad[0]}): the run diverged; train again with a lower --lr (or --precision fp32)")
    return ckpt


def state_mismatch(model: torch.nn.Module, state: dict) -> str | None:
    """The first way `state` does not fit `model` (a missing or extra key, a shape, a non-tensor), or None."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing:
        return f"no tensor {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if extra:
        return f"an unexpected tensor {extra[0]!r}" + (f" and {len(extra) - 1} more" if len(extra) > 1 else "")
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            return f"{k!r} is not a tensor"
        if v.shape != own[k].shape:
            return f"{k!r} has shape {tuple(v.shape)}, the model's is {tuple(own[k].shape)}"
    return None


def load_state_strict(model: torch.nn.Module, state: dict, where: str, fix: str) -> None:
    """`state` into `model`, every key and shape matching; the first misfit is one line naming `where`."""
    problem = state_mismatch(model, state)
    if problem:
        raise UserError(f"{where} does not fit the model: {problem}; {fix}")
    model.load_state_dict(state)


def restore_weights(model: torch.nn.Module, ckpt: dict, path: str | Path) -> None:
    """Copy a loaded checkpoint's state dict into `model`; a tensor that does not fit is one line."""
    load_state_strict(model, ckpt["model"], f"checkpoint {path} ({ckpt['model_name']}, {ckpt['num_classes']} classes)",
                      "pass a checkpoint written by the same run")
