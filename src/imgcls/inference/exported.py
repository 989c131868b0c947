"""Engines from what `imgcls export` wrote (an ONNX file; model.safetensors + model.json), and
`open_engine`, the one way a command turns a source the user names into an engine."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from imgcls import rundir
from imgcls.errors import UserError, first_line
from imgcls.inference.engine import Engine, TorchBackend
from imgcls.inference.graph import InferenceModel
from imgcls.inference.metadata import ONNX_KEY, ExportSpec, parse_spec, read_onnx_spec
from imgcls.inference.run import load_run, run_engine
from imgcls.models import create_model
from imgcls.models.checkpoint import load_state_strict, nonfinite_tensors
from imgcls.options import EXPORT_BATCH
from imgcls.rundir import strict_json

WEIGHTS, SPEC = "model.safetensors", "model.json"
TENSORS_KEY = "weights_file_sha256"  # model.json's digest of model.safetensors
DOCUMENT_KEY = "imgcls.document_sha256"  # model.safetensors' header: the digest of model.json's document
GRAPH_KEY = "imgcls.graph_sha256"  # an ONNX graph's description, after the document's: the graph's own digest


def _spec_path(path: str | Path) -> Path:
    path = Path(path)
    spec = path / SPEC if path.is_dir() else path.with_name(SPEC)
    if not spec.is_file() or not spec.with_name(WEIGHTS).is_file():
        raise UserError(f"{path} is not an imgcls export (needs {WEIGHTS} and {SPEC}); "
                        "pass a folder written by imgcls export --format safetensors")
    return spec


def _read_document(spec_path: Path) -> dict:
    try:
        return strict_json(spec_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{spec_path} is not valid JSON ({first_line(e)}); export the run again") from None


def read_export_spec(path: str | Path) -> ExportSpec:
    """The checked model.json of an export folder (or of the folder holding a model.safetensors)."""
    spec_path = _spec_path(path)
    return parse_spec(_read_document(spec_path), str(spec_path))


def load_model(path: str | Path):
    """(model, preprocessing) from an export folder or its model.safetensors, timm style:
    `model(preprocessing("cat.jpg")[None])` gives logits. The model is in eval mode on the CPU;
    `model.imgcls` holds the classes, calibration, rejection rule and TTA recipe."""
    model, spec = _load_export(path)
    return model, spec.preprocessing


def document_digest(document: dict) -> str:
    """sha256 of model.json's document in a canonical form, without the tensors' own digest."""
    canonical = {k: v for k, v in document.items() if k != TENSORS_KEY}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def graph_digest(model) -> str:
    """sha256 of an ONNX model's graph (nodes, weights, inputs and outputs) without its description, which holds
    the digests, and of every metadata property: weights of another export spliced into a graph change it, as
    does a property no other check reads (int8's quantization note)."""
    graph = type(model.graph)()
    graph.CopyFrom(model.graph)
    graph.doc_string = ""
    digest = hashlib.sha256(graph.SerializeToString(deterministic=True))
    digest.update(json.dumps(sorted((p.key, p.value) for p in model.metadata_props)).encode())
    return digest.hexdigest()


def pinned_description(document: dict, model) -> str:
    """An ONNX graph's description: the digests of its file's metadata document and of the graph itself, as
    model.json and model.safetensors pin each other, so that metadata edited in place (other class names,
    another crop) or another export's weights spliced in are refused."""
    return f"{DOCUMENT_KEY} {document_digest(document)} {GRAPH_KEY} {graph_digest(model)}"


def _check_pinned(model, document: dict, where: str) -> None:
    """The graph's description must pin its document and the graph: without the digests, or with others, the
    file is not what was exported (a digest removed would otherwise switch the check off)."""
    description = model.graph.doc_string
    if not description.startswith(DOCUMENT_KEY) or GRAPH_KEY not in description:
        raise UserError(f"{where}: its graph carries no digest of its {ONNX_KEY} metadata and weights (it was removed, "
                        "or an older imgcls exported it), so an edit could not be told; export the run again")
    document_part = f"{DOCUMENT_KEY} {document_digest(document)}"
    if not description.startswith(document_part + " "):
        raise UserError(f"{where}: its {ONNX_KEY} metadata is not the document this graph was exported with (a field "
                        "was changed since: classes, preprocessing, calibration...); export the run again")
    if description != f"{document_part} {GRAPH_KEY} {graph_digest(model)}":
        raise UserError(f"{where}: its graph is not the one exported with this metadata (weights, nodes or a "
                        "property were changed since); export the run again")


def _header_metadata(data: bytes) -> dict:
    """The `__metadata__` of a safetensors file's JSON header (8 bytes of length, then the header)."""
    size = int.from_bytes(data[:8], "little")
    try:
        return json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        return {}


def _load_export(path: str | Path) -> tuple[torch.nn.Module, ExportSpec]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    spec_path = _spec_path(path)
    document = _read_document(spec_path)
    spec = parse_spec(document, str(spec_path))
    weights = spec_path.with_name(WEIGHTS)
    data = weights.read_bytes()  # loaded and hashed from the same bytes, so what was checked is what runs
    try:
        state = load(data)
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights} is damaged or not a safetensors file ({first_line(e)}); export the run again") \
            from None
    # Each file pins the other; a digest that is missing is refused like a wrong one, or removing both would
    # switch the check off.
    want, pinned = document.get(TENSORS_KEY), _header_metadata(data).get(DOCUMENT_KEY)
    if want is None or pinned is None:
        raise UserError(f"{spec_path if want is None else weights} carries no digest of "
                        f"{weights.name if want is None else SPEC} (it was removed, or an older imgcls exported it), "
                        "so an edit could not be told; export the run again")
    if hashlib.sha256(data).hexdigest() != want:
        raise UserError(f"{weights} is not the file {SPEC} was written with (its sha256 differs from {TENSORS_KEY}); "
                        "export the run again, or keep each export's two files together")
    if pinned != document_digest(document):
        raise UserError(f"{spec_path} is not the document {weights} was exported with (a field was changed since: "
                        "classes, preprocessing, calibration...); export the run again")
    model = create_model(spec.model, len(spec.classes), head=spec.head)
    load_state_strict(model, state, str(weights), f"it must hold {spec.model} with {len(spec.classes)} classes, as "
                                                  f"{SPEC} says: export the run again")
    bad = nonfinite_tensors(state)
    if bad:
        raise UserError(f"{weights} holds non-finite weights (e.g. {bad[0]}); export the run again")
    model.imgcls = {"classes": spec.classes, "scaling": spec.scaling, "reject_rule": spec.reject_rule,
                    "risk_coverage": spec.risk_coverage, "recipe": spec.recipe}
    return model.eval(), spec


def _engine_from_spec(spec: ExportSpec, backend, source: str, module=None, batch_size: int | None = None) -> Engine:
    thresholds = torch.tensor(spec.thresholds, dtype=torch.float64) if spec.multilabel else None
    return Engine(backend, spec.classes, spec.preprocessing, batch_size or EXPORT_BATCH, spec.recipe, spec.scaling,
                  spec.risk_coverage, "fp32", None, source, spec.identity, module, thresholds=thresholds)


def safetensors_engine(path: str | Path, batch_size: int | None = None) -> Engine:
    """An exported safetensors folder as an engine (fp32, CPU)."""
    model, spec = _load_export(path)
    return _engine_from_spec(spec, TorchBackend(InferenceModel(model, spec.preprocessing,
                                                               multilabel=spec.multilabel), torch.device("cpu"),
                                                "fp32"), str(path), model, batch_size)


class OnnxBackend:
    """An ONNX file written by `imgcls export`, run by onnxruntime (whose sessions are safe to share)."""

    def __init__(self, session):
        self.session = session

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(images.numpy())
        return torch.from_numpy(self.session.run(["logits"], {"images": batch})[0]).float()


# The graph's probabilities against the same arithmetic in float64 on its logits: an fp32 graph agrees to
# about 1e-7; an int8 one quantizes the path between its two outputs (differences of 2e-3 seen), while an
# edited temperature moves probabilities by far more.
CALIBRATION_PROBE_TOLERANCE = {"fp32": 1e-4, "int8": 2e-2}


def _check_calibration(session, spec: ExportSpec, where: str, tolerance: float) -> None:
    """The calibration the metadata states is the one in the graph: on two probe images, the graph's own
    `probabilities` must be the softmax of its `logits` scaled as the metadata says. imgcls reads `logits`
    and applies the metadata's scaling, other readers take `probabilities`: the two must not part ways."""
    size = spec.preprocessing.img_size
    ramp = np.linspace(0, 255, size * size * 3).reshape(1, size, size, 3).astype(np.uint8)
    probe = np.concatenate([ramp, ramp[:, ::-1, ::-1].copy()])
    logits, graph_probs = session.run(["logits", "probabilities"], {"images": probe})
    scaled = torch.from_numpy(logits).double()
    if spec.scaling is not None:
        scaled = spec.scaling.apply(scaled)
    expected = scaled.sigmoid() if spec.multilabel else scaled.softmax(dim=1)
    gap = (expected - torch.from_numpy(graph_probs).double()).abs().max().item()
    if not gap <= tolerance:
        raise UserError(f"{where}: the calibration in its metadata ({'none' if spec.scaling is None else 'scaling'}) "
                        f"is not the one in the graph (probabilities differ by {gap:.3g}); export the run again")


def _check_graph(session, spec: ExportSpec, where: str) -> None:
    """The graph's input and outputs against what the metadata says they are."""
    inputs, outputs = session.get_inputs(), {o.name: o for o in session.get_outputs()}
    size, k = spec.preprocessing.img_size, len(spec.classes)
    if len(inputs) != 1 or inputs[0].name != "images" or inputs[0].type != "tensor(uint8)":
        raise UserError(f"{where}: the graph's input is not one uint8 tensor named 'images'; export the run again")
    shape = inputs[0].shape
    if len(shape) != 4 or any(isinstance(d, int) and d != want for d, want in zip(shape[1:], (size, size, 3),
                                                                                   strict=True)):
        raise UserError(f"{where}: the graph takes images of shape {shape}, but its metadata says {size}x{size}x3; "
                        "export the run again")
    if "logits" not in outputs or "probabilities" not in outputs:
        raise UserError(f"{where}: the graph lacks a 'logits' or 'probabilities' output; export the run again")
    width = outputs["logits"].shape[-1]
    if isinstance(width, int) and width != k:
        raise UserError(f"{where}: the graph has {width} outputs but its metadata names {k} classes; export the run "
                        "again (a label would otherwise be shifted onto another class)")


def onnx_engine(path: str | Path, threads: int | None = None, batch_size: int | None = None) -> Engine:
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed; pip install 'imgcls[export]'") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        import onnx
    except ImportError:
        raise UserError("reading an ONNX export needs onnx; pip install 'imgcls[export]'") from None
    data = Path(path).read_bytes()  # parsed for its digests and run from the same bytes: what is checked runs
    try:
        model = onnx.load_from_string(data)
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnx and onnxruntime raise their own exception types for unreadable files
        raise UserError(f"cannot load {path} as ONNX ({first_line(e, 100)}); pass a .onnx file written by "
                        "imgcls export") from e
    meta = session.get_modelmeta()
    spec = read_onnx_spec(meta.custom_metadata_map, str(path))
    _check_graph(session, spec, str(path))
    quantized = "imgcls.quantization" in meta.custom_metadata_map
    _check_calibration(session, spec, str(path), CALIBRATION_PROBE_TOLERANCE["int8" if quantized else "fp32"])
    # last: an edit the checks above cannot see (swapped names, another crop) is one the digest can
    _check_pinned(model, strict_json(meta.custom_metadata_map[ONNX_KEY]), str(path))
    return _engine_from_spec(spec, OnnxBackend(session), str(path), None, batch_size)


def open_engine(source: str | Path, checkpoint: str = "best", batch_size: int | None = None,
                device: torch.device | None = None) -> Engine:
    """A run folder, an exported .onnx file or an exported safetensors folder, ready to score."""
    path = Path(source)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise UserError(f"{path} does not exist; pass a .onnx file written by imgcls export")
        return onnx_engine(path, batch_size=batch_size)
    if rundir.is_run(path):
        return run_engine(load_run(path, checkpoint, device), batch_size=batch_size)
    if path.suffix == ".safetensors" or (path / SPEC).is_file():
        return safetensors_engine(path, batch_size)
    raise UserError(f"{path} is not a run folder, a .onnx file or an export folder; pass one of those")
