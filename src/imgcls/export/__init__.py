"""`imgcls export`: a run as ONNX and/or safetensors, proven equal to the run, with a model card.

An export folder holds model.onnx (uint8 NHWC in; logits and calibrated probabilities out; the
preprocessing in its metadata), model.safetensors + model.json (for `imgcls.load_model`),
parity.json (agreement, probability difference and latency against the run) and MODEL_CARD.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from imgcls import rundir
from imgcls.errors import UserError
from imgcls.evaluation.batch_predict import (
    InferenceModel,
    Predictor,
    Preprocessing,
    onnx_predictor,
    run_predictor,
    split_nhwc,
)
from imgcls.evaluation.rejection import choose_threshold, read_risk_coverage
from imgcls.export.model_card import model_card
from imgcls.export.onnx_export import OPSET, export_onnx, metadata
from imgcls.export.parity import format_parity, parity, require_parity
from imgcls.export.safetensors_export import export_safetensors, load_model, safetensors_predictor

FORMATS = ("onnx", "safetensors", "all")
OPSET_MIN = 18
PARITY = "parity.json"
CARD = "MODEL_CARD.md"

__all__ = ["FORMATS", "export_run", "format_parity", "load_model", "open_predictor"]


def open_predictor(source: str | Path, checkpoint: str = "best") -> Predictor:
    """A run folder, an exported .onnx file or an exported safetensors folder, ready to predict."""
    from imgcls.evaluation.predict import load_run

    path = Path(source)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise UserError(f"{path} does not exist; pass a .onnx file written by imgcls export")
        return onnx_predictor(path)
    if rundir.is_run(path):
        return run_predictor(load_run(path, checkpoint))
    if path.suffix == ".safetensors" or (path / "model.json").is_file():
        return safetensors_predictor(path)
    raise UserError(f"{path} is not a run folder, a .onnx file or an export folder; pass one of those")


def _test_metrics(trained) -> dict:
    """The run's eval JSON for its test split (val without one), computed when missing or stale; None
    when the run has neither (no test split, trained with --val-fraction 0)."""
    from imgcls.evaluation.evaluate import evaluate_run

    sizes = trained.dataset["fingerprint"]["sizes"]
    split = "test" if "test" in sizes else "val"
    if split not in sizes:
        return None
    path = trained.path / f"eval-{split}.json"
    scaling = trained.scaling.as_dict() if trained.scaling else None
    if path.is_file():
        ev = rundir.read_json(path)
        if ev.get("checkpoint") == str(trained.checkpoint) and ev.get("scaling") == scaling:
            return ev
    ev, _ = evaluate_run(trained.path, split, checkpoint=str(trained.checkpoint), device="cpu")
    return ev


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
    if not OPSET_MIN <= opset <= newest:
        raise UserError(f"--opset must be from {OPSET_MIN} to {newest} (got {opset})")


def export_run(run: str | Path, fmt: str = "all", out: str | Path | None = None, opset: int = OPSET,
               checkpoint: str = "best", timing: tuple[int, int] = (20, 3)) -> dict:
    """Export a run in fp32 (whatever its training precision), prove parity on its validation split,
    write parity.json and MODEL_CARD.md; raise if an export disagrees with the run. `timing`: timed
    calls at batch 1 and at batch 64 for the latency figures."""
    from imgcls.evaluation.evaluate import run_split
    from imgcls.evaluation.predict import load_run

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt} is unknown; use onnx, safetensors or all")
    if fmt in ("onnx", "all"):
        check_opset(opset)
    trained = load_run(run, checkpoint, torch.device("cpu"))
    trained.model.float()
    out = Path(out) if out else trained.path / "export"
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; choose a folder for the export")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; choose another --out or delete it")
    out.mkdir(parents=True, exist_ok=True)
    info = trained.dataset
    prep = Preprocessing(info["img_size"], tuple(info["mean"]), tuple(info["std"]), info.get("crop_pct", 1.0))
    curve = read_risk_coverage(trained.path)
    try:
        rule = choose_threshold(curve) if curve else None
    except UserError:  # the default target is out of reach on val: export without a threshold
        rule = None
    reference = run_predictor(trained, precision="fp32")
    sizes = trained.dataset["fingerprint"]["sizes"]  # parity images: val, else (--val-fraction 0) test or train
    parity_split = next(n for n in ("val", "test", "train") if n in sizes)
    batches = [images for images, _ in split_nhwc(run_split(trained, parity_split))]
    results = {}
    if fmt in ("onnx", "all"):
        s = trained.scaling
        module = InferenceModel(trained.model, prep.mean, prep.std, s.scale if s else None, s.bias if s else None)
        onnx_path = export_onnx(module, metadata(trained, prep, rule, curve), out, opset)
        results["onnx"] = parity(reference, onnx_predictor(onnx_path), batches, "onnxruntime", timing)
        results["onnx"]["split"] = parity_split
    if fmt in ("safetensors", "all"):
        export_safetensors(trained, prep, {"reject_rule": rule, "risk_coverage": curve}, out)
        results["safetensors"] = parity(reference, safetensors_predictor(out), batches, "safetensors", timing)
        results["safetensors"]["split"] = parity_split
    rundir.write_json(out / PARITY, {"run": str(trained.path), "checkpoint": str(trained.checkpoint),
                                     "precision": "fp32", "results": results})
    calibration_path = trained.path / rundir.CALIBRATION
    calibration = rundir.read_json(calibration_path) if calibration_path.is_file() else None
    summary_path = trained.path / rundir.SUMMARY
    summary = rundir.read_json(summary_path) if summary_path.is_file() else None
    card = model_card(trained, prep, _test_metrics(trained), calibration, rule, curve, results, summary)
    (out / CARD).write_text(card)
    for result in results.values():
        require_parity(result)
    return {"out": out, "files": sorted(p.name for p in out.iterdir()), "parity": results, "reject_rule": rule}


def predict_command(source: str, inputs: list[str], list_file: str | None = None, topk: int = 3,
                    as_json: bool = False, out: str | None = None, tta: str = "none", reject: str | None = None,
                    target_accuracy: float | None = None, coverage: float | None = None, batch_size: int = 64,
                    workers: int = 2, checkpoint: str = "best", progress: bool = True) -> int:
    """`imgcls predict`: rows to --out (csv, jsonl, parquet) with a progress bar, or to the console."""
    import json
    import time

    from imgcls.evaluation.batch_predict import collect_paths, format_row, predict_paths, write_rows
    from imgcls.evaluation.evaluate import parse_tta_flag
    from imgcls.evaluation.rejection import resolve_threshold

    if batch_size < 1 or workers < 0 or topk < 1:
        raise UserError("--topk and --batch-size must be at least 1 and --workers at least 0; "
                        "pass e.g. --topk 3 --batch-size 64 --workers 2")
    if out is not None and Path(out).suffix not in (".csv", ".jsonl", ".parquet"):
        raise UserError(f"--out {out} has an unknown format; end it with .csv, .jsonl or .parquet")
    tta_mode = parse_tta_flag(tta)
    predictor = open_predictor(source, checkpoint)
    threshold = resolve_threshold(reject, predictor.risk_coverage, target_accuracy, coverage)
    paths = collect_paths(inputs, list_file)
    start = time.perf_counter()
    rows = predict_paths(predictor, paths, topk, tta_mode, threshold, batch_size, workers, progress and bool(out))
    if out is None:
        rows = list(rows)
        if as_json:
            print(json.dumps([{"image": r["path"], **r} for r in rows], indent=2))
        for row in [] if as_json else rows:
            print(format_row(row))
        return 0
    counts = write_rows(rows, out, topk)
    seconds = time.perf_counter() - start
    rule = "" if threshold is None else f", {counts['rejected']} rejected below {threshold:.4f}"
    print(f"wrote {out}: {counts['images']} files, {counts['errors']} unreadable{rule}; "
          f"{counts['images'] / max(seconds, 1e-9):.0f} images/s")
    return 0
