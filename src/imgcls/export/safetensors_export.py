"""The run as model.safetensors plus model.json: rebuilt by `imgcls.load_model` without the run folder, no
pickle (inference/exported.py reads it back)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from imgcls.inference.exported import DOCUMENT_KEY, SPEC, TENSORS_KEY, WEIGHTS, document_digest
from imgcls.inference.metadata import ExportSpec
from imgcls.rundir import file_digest


def export_safetensors(model: torch.nn.Module, spec: ExportSpec, out: Path) -> Path:
    """Weights (contiguous, fp32) and the JSON document that rebuilds the model (inference/metadata.py)."""
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    path = out / WEIGHTS
    # Each file pins the other: the tensors' header holds the document's digest, the document the file's.
    save_file(state, path, metadata={"format": spec.to_dict()["format"], "model": spec.model,
                                     DOCUMENT_KEY: document_digest(spec.to_dict())})
    os.chmod(path, 0o644)  # safetensors writes 0600; the export's other files are world-readable
    # The file's digest binds model.json to these very tensors: weights of another export (same architecture,
    # other training) copied beside it would otherwise load and answer silently.
    document = {**spec.to_dict(), TENSORS_KEY: file_digest(path)}
    (out / SPEC).write_text(json.dumps(document, indent=2) + "\n")
    return path
