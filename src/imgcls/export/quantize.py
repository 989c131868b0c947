"""int8 export for CPUs: onnxruntime's static quantization of the fp32 ONNX file, calibrated on the run's
validation images, with its own proof: top-1 agreement with the fp32 file, the accuracy of both on
validation and test, and latency. An int8 file that disagrees with the fp32 one on more than 1% of the
validation images, or loses more than a point of accuracy, is refused.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import torch

from imgcls.errors import UserError
from imgcls.export.parity import latency_ms
from imgcls.inference.engine import Engine
from imgcls.inference.exported import pinned_description
from imgcls.inference.metadata import ExportSpec

INT8_FILE = "model.int8.onnx"
MIN_AGREEMENT = 0.99  # top-1 agreement with the fp32 file on validation
MAX_ACCURACY_DROP = 0.01  # on validation and on test
CALIBRATION_IMAGES = 256  # validation images whose activation ranges the quantization takes (MinMax)


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over uint8 NHWC batches."""

    def __init__(self, batches: list[torch.Tensor]):
        self.batches = iter(batches)

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"images": batch.contiguous().numpy()}


def describe(reduce_range: bool, images: int) -> str:
    return (f"static int8: QDQ, per-channel int8 weights, uint8 activations{', reduced range' if reduce_range else ''}"
            f"; ranges from {images} validation images")


def _drop_axis_fallback(record: logging.LogRecord) -> bool:
    return "is out-of-range for weight" not in record.getMessage()


@contextlib.contextmanager
def _quiet_axis_fallback():
    """onnxruntime logs one root-logger warning per LayerNorm (its 1-D scale has no channel axis) as it falls
    back to one scale for that tensor, which is what is wanted there; a ViT's export printed a screenful."""
    root = logging.getLogger()
    root.addFilter(_drop_axis_fallback)
    try:
        yield
    finally:
        root.removeFilter(_drop_axis_fallback)


def quantize_int8(fp32: Path, out: Path, calibration: list[torch.Tensor], spec: ExportSpec,
                  reduce_range: bool = False) -> Path:
    """The fp32 file quantized (QDQ, int8 weights per channel, uint8 activations, ranges from `calibration`),
    with the export's metadata and a note of how it was quantized."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:
        raise UserError(f"int8 export needs onnx and onnxruntime ({e.name} is missing): pip install "
                        "'imgcls[export]'") from None
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), _quiet_axis_fallback():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), _Calibration(calibration), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=reduce_range, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    model = onnx.load(str(out))
    del model.metadata_props[:]
    quantization = describe(reduce_range, sum(len(b) for b in calibration))
    for key, value in {**spec.onnx_properties(), "imgcls.quantization": quantization}.items():
        model.metadata_props.add(key=key, value=value)
    model.graph.doc_string = pinned_description(spec.to_dict(), model)
    onnx.save(model, str(out))
    return out


def _accuracy(engine: Engine, batches: list[torch.Tensor], labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    predicted = torch.cat([engine.score(b).probs.argmax(1) for b in batches])
    return float((predicted == labels).double().mean()), predicted


def int8_proof(fp32: Engine, int8: Engine, splits: dict[str, tuple[list[torch.Tensor], torch.Tensor]],
               repeats: tuple[int, int] = (20, 3), method: str = "") -> dict:
    """Agreement with the fp32 file (on the first split, validation), the accuracy of both on every split,
    and ms/image at batch 1 and 64 of both."""
    result = {"format": "onnxruntime int8", "method": method, "accuracy": {}, "passed": True}
    for i, (name, (batches, labels)) in enumerate(splits.items()):
        acc32, pred32 = _accuracy(fp32, batches, labels)
        acc8, pred8 = _accuracy(int8, batches, labels)
        result["accuracy"][name] = {"fp32": acc32, "int8": acc8, "images": len(labels)}
        if i == 0:
            result["split"], result["images"] = name, len(labels)
            result["top1_agreement"] = float((pred32 == pred8).double().mean())
        result["passed"] &= acc32 - acc8 <= MAX_ACCURACY_DROP
    result["passed"] &= result["top1_agreement"] >= MIN_AGREEMENT
    sample = next(iter(splits.values()))[0][0]
    result["latency_ms_per_image"] = {kind: {"batch1": latency_ms(engine, sample, 1, repeats[0]),
                                             "batch64": latency_ms(engine, sample, 64, repeats[1])}
                                      for kind, engine in (("fp32", fp32), ("int8", int8))}
    return result


def require_int8(result: dict) -> None:
    if not result["passed"]:
        drops = ", ".join(f"{name} {a['fp32']:.2%} -> {a['int8']:.2%}" for name, a in result["accuracy"].items())
        raise UserError(f"the int8 export disagrees with fp32 on {1 - result['top1_agreement']:.2%} of the "
                        f"{result['split']} images (at most {1 - MIN_AGREEMENT:.0%}) or loses accuracy ({drops}; at "
                        f"most {MAX_ACCURACY_DROP:.0%} a split); nothing was written: export without --quantize")
