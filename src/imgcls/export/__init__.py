"""`imgcls export`: a run as ONNX and/or safetensors, proven equal to the run, with a model card.

An export folder holds model.onnx (uint8 NHWC in; logits and calibrated probabilities out; the export's
metadata in its properties), model.safetensors + model.json (for `imgcls.load_model`), parity.json
(agreement, probability difference and latency against the run's fp32 engine) and MODEL_CARD.md. It is
written into a staging folder beside --out and renamed into place only once every file is proven: a
failed or killed export leaves nothing at --out.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path

import torch

from imgcls import rundir
from imgcls.errors import UserError
from imgcls.evaluation.analysis import training_record
from imgcls.evaluation.evaluate import eval_problem, evaluation
from imgcls.export.model_card import model_card
from imgcls.export.onnx_export import ONNX_FILE, export_onnx
from imgcls.export.parity import parity, require_parity
from imgcls.export.quantize import CALIBRATION_IMAGES, INT8_FILE, describe, int8_proof, quantize_int8, require_int8
from imgcls.export.safetensors_export import export_safetensors
from imgcls.inference.exported import onnx_engine, safetensors_engine
from imgcls.inference.graph import InferenceModel
from imgcls.inference.metadata import ExportSpec
from imgcls.inference.reject import default_rule
from imgcls.inference.run import TrainedRun, load_run, run_engine
from imgcls.options import EXPORT_FORMATS, ONNX_OPSET, ONNX_OPSET_MIN
from imgcls.training.summary import versions

PARITY = "parity.json"
CARD = "MODEL_CARD.md"


def _test_metrics(trained: TrainedRun) -> dict | None:
    """The run's eval JSON for its test split (val without one), computed again unless it was computed
    from this checkpoint, on the run's own data, with its calibration and no TTA; None when the run has
    neither split (no test split, trained with --val-fraction 0)."""
    split = "test" if trained.has_split("test") else "val"
    if not trained.has_split(split):
        return None
    path = trained.path / f"eval-{split}.json"
    if path.is_file():
        try:
            ev = rundir.read_sealed_json(path, "")
        except UserError:
            ev = None  # edited by hand, or written by an older imgcls: computed again, never printed in the card
        scaling = trained.scaling.as_dict() if trained.scaling else None
        if isinstance(ev, dict) and ev.get("weights") == trained.digest and ev.get("data") == trained.config.data \
                and ev.get("fingerprint") == trained.dataset["fingerprint"] and ev.get("scaling") == scaling \
                and "tta" not in ev and eval_problem(ev, trained.classes) is None:
            return ev
    # computed for the card, not written into the run: RUN/eval-SPLIT.json stays what `imgcls eval` wrote there
    return evaluation(trained.path, split, checkpoint=str(trained.checkpoint), device="cpu")


def check_opset(opset: int) -> None:
    """torch's dynamo exporter writes opset 18 and up; onnx (and so onnxruntime) reads up to its own newest."""
    try:
        import onnx
        import onnxruntime  # noqa: F401  (the parity proof runs the file)
        import onnxscript  # noqa: F401  (torch's exporter writes with it)
    except ImportError as e:
        raise UserError(f"ONNX export needs onnx, onnxscript and onnxruntime ({e.name} is missing): "
                        "pip install 'imgcls[export]', or use --format safetensors") from None
    newest = onnx.defs.onnx_opset_version()
    if not ONNX_OPSET_MIN <= opset <= newest:
        raise UserError(f"--opset must be from {ONNX_OPSET_MIN} to {newest} (got {opset})")


def export_spec(trained: TrainedRun) -> ExportSpec:
    """What the export says about itself: the run's classes, preprocessing, TTA recipe, calibration, the
    --reject auto threshold at the default target (when reachable on val) and curve, and provenance."""
    curve = trained.risk_coverage
    rule = default_rule(curve)  # None when the default target is out of reach on val: no threshold exported
    thresholds = trained.thresholds()
    return ExportSpec(trained.config.model, trained.config.head, trained.classes, trained.preprocessing,
                      trained.recipe, trained.scaling, trained.dataset["fingerprint"], trained.digest, rule, curve,
                      versions(), None if thresholds is None else thresholds.tolist())


def _check_out(out: Path, trained: TrainedRun, quantize: str | None) -> None:
    if quantize is not None and trained.multilabel:
        raise UserError("--quantize int8 proves itself by top-1 accuracy, which a multi-label run has not; export it "
                        "without --quantize")
    # parity reads the run's images: an export among them would become a class folder
    rundir.refuse_run_file(out, within=rundir.folders(trained.config.data, trained.config.data_dir))
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder for the export")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out or delete it")


def export_run(run: str | Path, fmt: str = "all", out: str | Path | None = None, opset: int = ONNX_OPSET,
               checkpoint: str = "best", timing: tuple[int, int] = (20, 3), quantize: str | None = None) -> dict:
    """Export a run in fp32 (whatever its training precision), prove parity on its validation split,
    write parity.json and MODEL_CARD.md; refuse (writing nothing) if an export disagrees with the run.
    `quantize="int8"` adds model.int8.onnx with its own proof (export/quantize.py). `timing`: timed calls
    at batch 1 and at batch 64 for the latency figures."""
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"--format {fmt} is unknown; use {', '.join(EXPORT_FORMATS)}")
    if quantize is not None and (quantize != "int8" or fmt == "safetensors"):
        raise UserError(f"--quantize {quantize} needs an ONNX export: use --quantize int8 with --format onnx or all")
    if fmt in ("onnx", "all"):
        check_opset(opset)
    trained = load_run(run, checkpoint, torch.device("cpu"))
    trained.model.float()
    out = Path(out) if out else trained.path / "export"
    _check_out(out, trained, quantize)
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = export_spec(trained)
    reference = run_engine(trained, precision="fp32")
    parity_split = next(n for n in ("val", "test", "train") if trained.has_split(n))  # val, else test or train
    held_out = {name: _nhwc_batches(trained.split(name)) for name in dict.fromkeys([parity_split, "test"])
                if trained.has_split(name)}
    batches = held_out[parity_split][0]
    rundir.remove_stale_temps(out)
    stage = out.with_name(f".{out.name}{rundir.TMP_MARK}{os.getpid()}")
    try:
        stage.mkdir()
        results = _write_formats(trained, spec, reference, batches, fmt, stage, opset, timing)
        for result in results.values():
            result["split"] = parity_split
        if quantize:
            results["int8"] = _write_int8(stage, spec, held_out, timing)
        for kind, result in results.items():
            (require_int8 if kind == "int8" else require_parity)(result)
        card = model_card(trained, spec, _test_metrics(trained), trained.calibration, results,
                          _summary(trained))
        (stage / CARD).write_bytes(card.encode())  # the bytes parity.json's card_sha256 is of, whatever the locale
        rundir.write_sealed_json(stage / PARITY, {"run": str(trained.path), "checkpoint": str(trained.checkpoint),
                                                  "weights": trained.digest, "precision": "fp32", "results": results,
                                                  "card_sha256": hashlib.sha256(card.encode()).hexdigest()})
        try:
            if out.exists():
                out.rmdir()  # empty, checked above
            stage.rename(out)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise UserError(f"another export into {out} finished while this one ran; this one wrote nothing: keep "
                            "that one, or choose another --out") from None
    except OSError as e:  # a full disk, mostly: say where, and that nothing was left behind
        raise UserError(f"cannot write the export into {out.parent} ({e.strerror}); nothing was written: free some "
                        "space or choose another --out") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"out": out, "files": sorted(p.name for p in out.iterdir()), "parity": results,
            "reject_rule": spec.reject_rule}


def _write_formats(trained, spec, reference, batches, fmt, stage, opset, timing) -> dict:
    results = {}
    if fmt in ("onnx", "all"):
        graph = InferenceModel(trained.model, spec.preprocessing, spec.scaling, multilabel=spec.multilabel)
        exported = onnx_engine(export_onnx(graph, spec, stage, opset))
        session = exported.backend.session
        graph_probs = torch.cat([torch.from_numpy(session.run(["probabilities"], {"images": b.contiguous().numpy()})[0])
                                 for b in batches]).double().numpy()
        results["onnx"] = parity(reference, exported, batches, "onnxruntime", timing, graph_probs)
    if fmt in ("safetensors", "all"):
        export_safetensors(trained.model, spec, stage)
        results["safetensors"] = parity(reference, safetensors_engine(stage), batches, "safetensors", timing)
    return results


def _nhwc_batches(split, size: int = 256) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A split as uint8 N x H x W x 3 batches (the exported graph's input), and its labels."""
    pairs = [(images, labels) for images, labels in split.batches(torch.arange(len(split)), size) if len(images)]
    return [images.permute(0, 2, 3, 1) for images, _ in pairs], torch.cat([labels for _, labels in pairs])


def _write_int8(stage: Path, spec: ExportSpec, held_out: dict, timing) -> dict:
    """model.int8.onnx quantized from the stage's fp32 file, calibrated on the first CALIBRATION_IMAGES images
    of the first held-out split; with reduced range instead when the plain one does not pass its proof (the
    U8S8 instructions of CPUs without VNNI can saturate)."""
    fp32 = onnx_engine(stage / ONNX_FILE)
    calibration = torch.cat(next(iter(held_out.values()))[0])[:CALIBRATION_IMAGES].split(64)
    for reduce_range in (False, True):
        path = quantize_int8(stage / ONNX_FILE, stage / INT8_FILE, list(calibration), spec, reduce_range)
        proof = int8_proof(fp32, onnx_engine(path), held_out, timing,
                           describe(reduce_range, sum(len(b) for b in calibration)))
        if proof["passed"]:
            break
    return proof


def read_extras(folder: Path, weights: str) -> dict:
    """An export folder's parity.json and MODEL_CARD.md as export wrote them for the checkpoint whose digest
    starts with `weights` (what a server publishes); an edited, foreign or unsealed one is refused in one line."""
    fix = "export the run again (or serve the run folder itself)"
    extras = {}
    if (folder / PARITY).is_file():
        parity = rundir.read_sealed_json(folder / PARITY, fix)
        if not str(parity.get("weights", "")).startswith(weights):
            raise UserError(f"{folder / PARITY} holds the parity of other weights than {folder}'s model; {fix}")
        extras["parity"] = parity
        if (folder / CARD).is_file():
            card = (folder / CARD).read_bytes()
            if hashlib.sha256(card).hexdigest() != parity.get("card_sha256"):
                raise UserError(f"{folder / CARD} is not the card export wrote beside {PARITY} (it was edited); {fix}")
            extras["model_card"] = card.decode()
    return extras


def _summary(trained: TrainedRun) -> dict | None:
    """summary.json, checked as the report checks it (types, bounds, its metrics.jsonl)."""
    return training_record(trained.path)[0] if (trained.path / rundir.SUMMARY).is_file() else None
