"""The run as one ONNX file: uint8 NHWC images in, logits and calibrated probabilities out, and the export's
metadata (inference/metadata.py) in the file's metadata_props."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from imgcls.errors import UserError
from imgcls.inference.exported import pinned_description
from imgcls.inference.graph import InferenceModel
from imgcls.inference.metadata import ExportSpec
from imgcls.options import ONNX_OPSET

ONNX_FILE = "model.onnx"


def export_onnx(graph: InferenceModel, spec: ExportSpec, out: Path, opset: int = ONNX_OPSET) -> Path:
    """Export `graph` (fp32, on the CPU) with a dynamic batch dimension and save it as one file."""
    size = spec.preprocessing.img_size
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # batch 2: a batch of 1 would be specialised
    batch = torch.export.Dim("batch", min=1, max=65536)
    graph = graph.eval()
    try:
        # torch.export first: it refuses a model that fixes the batch size, where torch.onnx's
        # fallbacks would quietly export a graph that only takes batches of 2.
        program = torch.export.export(graph, (example,), dynamic_shapes=({0: batch},), strict=False)
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            onnx_program = torch.onnx.export(program, (example,), dynamo=True, opset_version=opset,
                                             input_names=["images"], output_names=["logits", "probabilities"],
                                             verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; the user needs the model and the first line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{spec.model} cannot be exported to ONNX ({type(e).__name__}: {reason}); "
                        "use --format safetensors") from e
    import onnx  # the exporter needs it too

    onnx_program.model.metadata_props.update(spec.onnx_properties())
    path = out / ONNX_FILE
    onnx_program.save(path, external_data=False)
    model = onnx.load(str(path))  # the graph as it will be read back, pinned with its metadata
    model.graph.doc_string = pinned_description(spec.to_dict(), model)
    onnx.save(model, str(path))
    return path
