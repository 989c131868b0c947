"""What the server serves: one engine opened from a run or an export, the validation reference drift is
measured against, and the answer for each image, which is `imgcls predict`'s row (inference/files.py).

An uploaded image goes through the decoder and resize rule a file goes through in predict (data/decode.py,
data/folder.py `fit`), is scored by the same engine and turned into a row by the same `row`: the server
and `imgcls predict` give the same numbers for the same file and source.
"""

from __future__ import annotations

import base64
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgcls import rundir
from imgcls.data.decode import FORMAT_NAMES, MAX_PIXELS, open_rgb
from imgcls.data.folder import fit
from imgcls.data.preprocessing import INPUT_LAYOUT, Preprocessing
from imgcls.errors import UserError
from imgcls.evaluation.cam import explain
from imgcls.export import read_extras
from imgcls.inference.engine import Engine
from imgcls.inference.exported import SPEC, open_engine
from imgcls.inference.files import row
from imgcls.inference.reject import default_rule, energy
from imgcls.inference.run import TrainedRun, load_run, run_engine
from imgcls.plotting import cam_overlay
from imgcls.runtime import resolve_device
from imgcls.serving.drift import DriftMonitor, Reference
from imgcls.serving.settings import ServeSettings

LOG = logging.getLogger("imgcls.serve")
REFERENCE_IMAGES = 2000  # validation images a run's drift reference is scored on, at start


@dataclass(frozen=True)
class Job:
    """One image for the inference thread: the model's uint8 H x W x 3 input and its TTA mode."""

    pixels: np.ndarray
    tta: str | int


def decode_upload(data: bytes, prep: Preprocessing) -> np.ndarray:
    """Uploaded bytes as the model's uint8 H x W x 3 input, read as `Preprocessing.load` reads a file
    (data/folder.py `load_image`: the same decoder, the same JPEG draft scale, the same resize and crop).
    Raises DecodeError as the decoder does."""
    img = open_rgb(io.BytesIO(data), min_size=math.ceil(prep.img_size / prep.crop_pct))
    return fit(img, prep.img_size, prep.crop_pct)


@dataclass
class Service:
    engine: Engine
    settings: ServeSettings
    drift: DriftMonitor
    default_threshold: float | None  # settings.reject resolved on this model's curve
    extras: dict = field(default_factory=dict)  # the export's parity figures and model card, when it has them
    ready: bool = False  # warmed up and its inference thread running (set by the app)

    def threshold(self, reject: str | None) -> float | None:
        """The `reject` query parameter as a threshold; the server's --reject when it is not given."""
        if reject is None:
            return self.default_threshold
        targets = (self.settings.target_accuracy, self.settings.coverage) if reject == "auto" else (None, None)
        return self.engine.threshold(reject, *targets)

    def score(self, jobs: list[Job]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(calibrated probabilities, plain-view logits) per job, the jobs of one TTA mode in one engine call.
        Random TTA views are drawn per image from seed 0, as `imgcls predict` draws them for a single file,
        so an image's answer never depends on which requests shared its batch."""
        results: list = [None] * len(jobs)
        by_mode: dict = {}
        for i, job in enumerate(jobs):
            by_mode.setdefault(job.tta, []).append(i)
        for mode, indices in by_mode.items():
            groups = [[i] for i in indices] if isinstance(mode, int) else [indices]
            for group in groups:
                images = torch.from_numpy(np.stack([jobs[i].pixels for i in group]))
                scores = self.engine.score(images, mode, torch.Generator().manual_seed(0), "the served images")
                for j, i in enumerate(group):
                    results[i] = (scores.probs[j], scores.logits[j])
        return results

    def answer(self, names: list[str], results: list, topk: int, threshold: float | None) -> list[dict]:
        """predict's row per image, its path key named `image`, with the model's identity."""
        k = min(topk, len(self.engine.classes))
        rows = []
        for name, (probs, logits) in zip(names, results, strict=True):
            found = row(Path(name), self.engine.classes, probs, logits, k, threshold)
            rows.append({"image": name, **{key: v for key, v in found.items() if key != "path"},
                         "model": self.engine.identity})
        return rows

    @property
    def explains(self) -> bool:
        """Grad-CAM needs the model's gradients: a run or a safetensors export, not an ONNX graph."""
        return self.engine.module is not None

    def explain(self, pixels: np.ndarray, class_name: str | None) -> dict:
        """`imgcls cam`'s overlay of one image for `class_name` (by default the predicted class), as a PNG
        data URL, with the class explained and the model's softmax for it (before any calibration)."""
        classes = self.engine.classes
        target = None if class_name is None else torch.tensor([classes.index(class_name)])
        cams, chosen, probs = explain(self.engine, torch.tensor(pixels[None]), target, progress=False)
        out = io.BytesIO()
        Image.fromarray(cam_overlay(pixels, cams[0].cpu().numpy())).save(out, format="PNG")
        c = int(chosen[0])
        return {"class": classes[c], "uncalibrated_probability": float(probs[0, c]), "method": "gradcam",
                "overlay": "data:image/png;base64," + base64.b64encode(out.getvalue()).decode("ascii")}

    def describe(self) -> dict:
        """GET /v1/model: what the model is, what it takes, how it decides."""
        engine, s = self.engine, self.settings
        return {"model": engine.identity, "source": engine.source, "classes": engine.classes,
                "input": {"accepts": f"{FORMAT_NAMES} files, as multipart/form-data parts or one raw body",
                          "max_bytes": s.max_bytes, "max_pixels": MAX_PIXELS, "model_input": INPUT_LAYOUT},
                "preprocessing": engine.preprocessing.as_dict(),
                "calibration": engine.scaling.as_dict() if engine.scaling is not None else None,
                "reject": {"default": s.reject or "off", "threshold": self.default_threshold,
                           "auto_rule": default_rule(engine.risk_coverage)},
                "tta_recipe": engine.recipe.as_dict(), "precision": engine.precision, "device": engine.device.type,
                "batching": {"max_batch": s.max_batch, "max_wait_ms": s.max_wait_ms, "max_queue": s.max_queue,
                             "engine_batch_size": engine.batch_size},
                "explain": self.explains, "drift_reference": self.drift.origin, **self.extras}


def build_service(source: str | Path, settings: ServeSettings) -> Service:
    """Open `source` (a run folder, a model.onnx, a safetensors export folder) as predict does, resolve the
    default reject rule, take the drift reference and score one image, so that the first request waits
    for nothing."""
    path = Path(source)
    device = resolve_device(settings.device)
    if rundir.is_run(path):  # a run is loaded here, not in open_engine, for its validation split
        trained = load_run(path, settings.checkpoint, device)
        trained.require_multiclass("imgcls serve")
        engine = run_engine(trained, batch_size=settings.batch_size)
        references, origin = _run_reference(trained, engine)
    else:
        engine = open_engine(path, settings.checkpoint, settings.batch_size, device)
        references, origin = _curve_reference(engine)
    threshold = engine.threshold(settings.reject, settings.target_accuracy, settings.coverage)
    drift = DriftMonitor(references, threshold if threshold is not None else _auto_threshold(engine),
                         settings.drift_window, settings.drift_min_images, settings.drift_psi, origin, LOG)
    size = engine.preprocessing.img_size
    engine.score(torch.zeros(1, size, size, 3, dtype=torch.uint8), where="the warm-up image")
    return Service(engine, settings, drift, threshold, _export_extras(path, engine))


def _run_reference(trained: TrainedRun, engine: Engine) -> tuple[dict, str]:
    """Both scores of the run's validation split (at most REFERENCE_IMAGES of it, evenly spread), by the
    serving engine; the stored curve when the run has no validation split or its data changed since training."""
    if not trained.has_split("val"):
        return _curve_reference(engine, "the run has no validation split")
    try:
        split = trained.split("val")
    except UserError as e:
        return _curve_reference(engine, str(e))
    # evenly spread, not the first ones: a folder's val/ is in class order
    order = torch.linspace(0, len(split) - 1, min(len(split), REFERENCE_IMAGES)).round().long().unique()
    per_call = engine.batch_size
    scores, _ = engine.score_batches(split.batches(order, per_call), where="the validation split")
    references = {"confidence": Reference.of_sample(scores.probs.max(dim=1).values.numpy()),
                  "energy": Reference.of_sample(energy(scores.logits).numpy())}
    return references, f"the run's validation split ({len(order)} images, scored at start)"


def _curve_reference(engine: Engine, why: str = "") -> tuple[dict, str]:
    because = f" ({why})" if why else ""
    if engine.risk_coverage is None:
        LOG.warning("drift: no validation reference%s and no stored risk-coverage curve; run imgcls calibrate and "
                    "export again for one", because)
        return {}, "none: no validation data or risk-coverage curve"
    curve = engine.risk_coverage
    return ({"confidence": Reference.of_curve(curve), "energy": None},
            f"the validation risk-coverage curve ({len(curve['threshold'])} points, confidence only){because}")


def _auto_threshold(engine: Engine) -> float | None:
    """The share under this threshold is watched when no --reject was given: --reject auto's, when reachable."""
    rule = default_rule(engine.risk_coverage)
    return rule["threshold"] if rule else None


def _export_extras(path: Path, engine: Engine) -> dict:
    """An export's parity.json and MODEL_CARD.md, when `path` is (in) an export folder, checked as export wrote
    them for this model."""
    folder = path.parent if path.suffix in (".onnx", ".safetensors") else path
    if not (folder / SPEC).is_file() and path.suffix != ".onnx":
        return {}
    return read_extras(folder, engine.identity["weights"])
