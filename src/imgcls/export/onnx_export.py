"""The run as one ONNX file: uint8 NHWC images in, logits and calibrated probabilities out, and
everything a user needs to feed it in the file's metadata_props."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch

import imgcls
from imgcls.errors import UserError
from imgcls.evaluation.batch_predict import INPUT_LAYOUT, InferenceModel, Preprocessing

OPSET = 18


def metadata(trained, prep: Preprocessing, threshold: dict | None, curve: dict | None) -> dict[str, str]:
    """metadata_props: strings only; JSON where a value is structured."""
    scaling = trained.scaling
    meta = {
        "imgcls.classes": json.dumps(trained.classes),
        "imgcls.preprocessing": json.dumps(prep.as_dict()),
        "imgcls.input": INPUT_LAYOUT,
        "imgcls.img_size": str(prep.img_size),
        "imgcls.crop_pct": str(prep.crop_pct),
        "imgcls.resize": prep.as_dict()["resize"],
        "imgcls.mean": json.dumps(list(prep.mean)),
        "imgcls.std": json.dumps(list(prep.std)),
        "imgcls.scaling": json.dumps(scaling.as_dict() if scaling else None),
        "imgcls.temperature": str(scaling.temperature) if scaling and scaling.temperature else "none",
        "imgcls.model": trained.config.model,
        "imgcls.aug": trained.config.aug,
        "imgcls.fingerprint": json.dumps(trained.dataset["fingerprint"]),
        "imgcls.version": imgcls.__version__,
        "torch.version": torch.__version__,
    }
    if threshold is not None:
        meta["imgcls.reject_threshold"] = str(threshold["threshold"])
        meta["imgcls.reject_rule"] = json.dumps(threshold)
    if curve is not None:
        meta["imgcls.risk_coverage"] = json.dumps(curve)
    return meta


def export_onnx(module: InferenceModel, meta: dict[str, str], out: Path, opset: int = OPSET) -> Path:
    """Export `module` (fp32, on the CPU) with a dynamic batch dimension and save it as one file."""
    size = int(meta["imgcls.img_size"])
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=65536)
    module = module.eval()
    try:
        # torch.export first: it refuses a model that fixes the batch size, where torch.onnx's
        # fallbacks would quietly export a graph that only takes batches of 2.
        graph = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            program = torch.onnx.export(graph, (example,), dynamo=True, opset_version=opset,
                                        input_names=["images"], output_names=["logits", "probabilities"],
                                        verbose=False)
    except Exception as e:  # the exporter raises many types; the user needs the model and the first line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{meta['imgcls.model']} cannot be exported to ONNX ({type(e).__name__}: {reason}); "
                        "use --format safetensors") from e
    program.model.metadata_props.update(meta)
    path = out / "model.onnx"
    program.save(path, external_data=False)
    return path
