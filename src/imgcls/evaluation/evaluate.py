"""`imgcls eval` and `imgcls calibrate` as library calls, both on the run's inference engine."""

from __future__ import annotations

import math
from pathlib import Path

import torch.nn.functional as F

from imgcls import rundir
from imgcls.data.presets import parse_tta
from imgcls.errors import UserError
from imgcls.evaluation.calibration import (
    MULTILABEL_METHODS,
    calibration_metrics,
    check_calibration_data,
    check_multilabel_calibration_data,
    check_scaling,
    fit_multilabel_scaling,
    fit_scaling,
    multilabel_calibration_metrics,
)
from imgcls.evaluation.metrics import classification_metrics
from imgcls.evaluation.multilabel import multilabel_metrics
from imgcls.evaluation.rejection import number_in, risk_coverage
from imgcls.inference.run import load_run, run_engine
from imgcls.runtime import resolve_device

# Most test-time views `--tta N` may ask for. The gain from random views levels off after a few dozen,
# and each batch holds N views of every image, so an unbounded N only finds the memory limit.
MAX_TTA_VIEWS = 64


def parse_tta_flag(mode: str) -> str | int:
    """--tta as presets.parse_tta reads it, with at most MAX_TTA_VIEWS random views."""
    try:
        parsed = parse_tta(mode)
    except ValueError as e:
        raise UserError(str(e)) from None
    if isinstance(parsed, int) and parsed > MAX_TTA_VIEWS:
        raise UserError(f"--tta {parsed} asks for more than {MAX_TTA_VIEWS} views per image (more add nothing but "
                        f"memory); pass --tta {MAX_TTA_VIEWS} or fewer, or flip / flip-crop")
    return parsed


SHARES = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy")  # eval results in [0, 1]
CLASS_SHARES = ("precision", "recall", "f1")


def eval_problem(ev, classes: list[str]) -> str | None:
    """What is wrong with an eval JSON's numbers that a model card prints (None: nothing): shares in [0, 1],
    a finite loss, per-class figures of the run's own classes, counts that are whole numbers."""
    if not isinstance(ev, dict):
        return "is not a JSON object"
    if not (isinstance(ev.get("n"), int) and ev["n"] >= 1 and isinstance(ev.get("split"), str)):
        return "has no image count n or split"
    bad = [k for k in SHARES if (k in ev or k != "top5_accuracy") and not number_in(ev.get(k), 0, 1)]
    bad += [] if number_in(ev.get("loss"), 0, math.inf) else ["loss"]
    rows = ev.get("per_class")
    if not isinstance(rows, list) or [r.get("class") if isinstance(r, dict) else None for r in rows] != classes or \
            not all(number_in(r.get(k), 0, 1) for r in rows for k in CLASS_SHARES):
        bad.append("per_class")
    pairs = ev.get("most_confused")
    if not isinstance(pairs, list) or not all(isinstance(p, dict) and p.get("true") in classes and
                                              p.get("predicted") in classes and isinstance(p.get("count"), int)
                                              for p in pairs):
        bad.append("most_confused")
    return f"has a wrong {', '.join(bad)}" if bad else None


def eval_out(run: str | Path, split: str, data: str | None, out: str | Path | None) -> Path:
    """Where eval writes: `out` when given; else the run's eval-<split>.json for its own data, and
    eval-<data>-<split>.json here for other data. A run's folder (or one inside it) only ever holds results
    of its own data, however the path is spelled (`eval . --data OTHER` from inside the run included)."""
    own = Path(run) / f"eval-{split}.json"
    if out is None:
        target = own if data is None else Path(f"eval-{Path(str(data)).name}-{split}.json")
    else:
        target = Path(out)
        if target.suffix != ".json" or target.is_dir():
            raise UserError(f"--out {target} must name a .json file; e.g. --out eval-other.json")
        if not target.parent.is_dir():
            raise UserError(f"--out {target}: the folder {target.parent} does not exist; create it or choose "
                            "another --out")
    if out is not None and target.resolve() != own.resolve():
        # another run's files, an export's; nor into the data eval reads, or the run's (a shard manifest)
        rundir.refuse_run_file(target, within=rundir.folders(data, *_run_data(run)))
    run_dir = Path(run).resolve()
    if target.resolve().parent.is_relative_to(run_dir) and (data is not None or target.resolve() != own.resolve()):
        raise UserError(f"{target} is inside the run {run}, which holds only its own data's eval-{split}.json; "
                        "write these results elsewhere with --out FILE.json")
    return target


def _run_data(run: str | Path) -> tuple[str | None, ...]:
    """The data a run was trained on, as its config.yaml names it (nothing when that cannot be read: the
    evaluation itself then says why)."""
    from imgcls.config import load_config

    try:
        cfg = load_config(Path(run) / rundir.CONFIG)
    except (UserError, OSError):
        return ()
    return cfg.data, cfg.data_dir


def evaluate_run(run: str | Path, split: str = "test", data: str | None = None, data_dir: str | None = None,
                 checkpoint: str = "best", device: str = "auto", tta: str = "none",
                 allow_data_change: bool = False, out: str | Path | None = None) -> tuple[dict, Path]:
    """`evaluation` written to `eval_out`'s file (whose place is checked first)."""
    target = eval_out(run, split, data, out)
    result = evaluation(run, split, data, data_dir, checkpoint, device, tta, allow_data_change)
    rundir.write_sealed_json(target, result)  # a model card reuses it: an edit within bounds must show
    return result, target


def evaluation(run: str | Path, split: str = "test", data: str | None = None, data_dir: str | None = None,
               checkpoint: str = "best", device: str = "auto", tta: str = "none",
               allow_data_change: bool = False) -> dict:
    """Metrics of a trained run on one split, with test-time augmentation compared against none when
    `tta` is given; the run's calibration applies once `calibrate` has stored one; with what they were
    computed from (checkpoint digest, data, split, TTA, scaling, precision)."""
    tta_mode = parse_tta_flag(tta)
    trained = load_run(run, checkpoint, resolve_device(device), allow_data_change)
    engine = run_engine(trained)
    images = trained.split(split, data, data_dir)
    where = f"the {split} split"
    scores, labels = engine.score_split(images, where=where)
    if trained.multilabel:  # at the run's per-class thresholds, as predict decides
        result = multilabel_metrics(scores.probs, labels.float(), trained.classes, engine.thresholds)
        loss = F.binary_cross_entropy_with_logits(scores.logits.double(), labels.double()).item()
        result.update(task="multilabel", classes=trained.classes, loss=loss,
                      calibration=multilabel_calibration_metrics(scores.probs, labels))
    else:
        result = classification_metrics(scores.probs, labels, trained.classes)
        result["calibration"] = calibration_metrics(scores.probs, labels)
    if tta_mode != "none":
        tta_scores, _ = engine.score_split(images, tta_mode, where=where)
        mode = f"{tta_mode} random views of '{trained.config.aug}'" if isinstance(tta_mode, int) else tta_mode
        result["tta"] = {"mode": mode, "without": tta_side(scores.probs, labels, trained.classes, engine.thresholds),
                         "with": tta_side(tta_scores.probs, labels, trained.classes, engine.thresholds)}
    result.update(split=split, data=data or trained.config.data, checkpoint=str(trained.checkpoint),
                  weights=trained.digest, scaling=trained.scaling.as_dict() if trained.scaling else None,
                  precision=engine.precision)
    # the run's fingerprint only when its own, unchanged data was scored (--allow-data-change scores data that
    # may differ from it: such results must never stand for the run's)
    result["fingerprint"] = trained.dataset["fingerprint"] if data is None and not allow_data_change else None
    return result


def tta_side(probs, labels, classes: list[str], thresholds=None) -> dict:
    """One side of a before/after of test-time augmentation: the calibration figures, and for a multi-label
    model (`thresholds`, one per class) its mAP and macro-F1 at them (averaging over views moves both)."""
    if thresholds is None:
        return calibration_metrics(probs, labels)
    ranked = multilabel_metrics(probs, labels.float(), classes, thresholds)
    return {"map": ranked["map"], "macro_f1": ranked["macro_f1"], **multilabel_calibration_metrics(probs, labels)}


def calibrate_run(run: str | Path, method: str = "temperature", checkpoint: str = "best",
                  device: str = "auto", allow_data_change: bool = False) -> dict:
    """Fit a temperature (or vector scaling; for a multi-label run, a temperature per label or Platt scaling)
    on the validation split, never on test; store it in the run for eval, predict and export, with the
    validation risk-coverage curve `--reject auto` reads (multiclass); report the metrics on validation and test
    before and after."""
    trained = load_run(run, checkpoint, resolve_device(device), allow_data_change, calibrated=False)
    check_method(method, trained.multilabel)
    trained.require_split("val", "calibrate (it fits on the validation split, never on test)")
    engine = run_engine(trained)  # uncalibrated: it fits on the raw logits
    report = {"method": method, "fitted_on": "val", "checkpoint": str(trained.checkpoint), "weights": trained.digest,
              "task": "multilabel" if trained.multilabel else "multiclass", "splits": {}}
    scaling = None
    for name in ["val"] + (["test"] if trained.has_split("test") else []):
        scores, labels = engine.score_split(trained.split(name), where=f"the {name} split")
        logits = scores.logits.double()
        if trained.multilabel:
            if scaling is None:
                check_multilabel_calibration_data(logits, labels, trained.classes, method)
                scaling = fit_multilabel_scaling(logits, labels, method)
                check_scaling(scaling)
            report["splits"][name] = {"before": multilabel_calibration_metrics(logits.sigmoid(), labels),
                                      "after": multilabel_calibration_metrics(scaling.apply(logits).sigmoid(), labels)}
            continue
        if scaling is None:  # the first split is val: too little of it gives a temperature that is noise
            check_calibration_data(labels, len(trained.classes), trained.classes, logits, method)
            scaling = fit_scaling(logits, labels, method)
            check_scaling(scaling)
            report["risk_coverage"] = risk_coverage(scaling.apply(logits).softmax(1), labels)
        report["splits"][name] = {"before": calibration_metrics(logits.softmax(1), labels),
                                  "after": calibration_metrics(scaling.apply(logits).softmax(1), labels)}
    report["scaling"] = scaling.as_dict()
    rundir.write_sealed_json(trained.path / rundir.CALIBRATION, report)
    return report


def check_method(method: str, multilabel: bool) -> None:
    """Refuse a calibration method that is not for the run's kind of output: softmax or one sigmoid per label."""
    if multilabel and method not in MULTILABEL_METHODS:
        raise UserError(f"--method {method} scales a softmax; a multi-label run's labels are each calibrated alone: "
                        "use --method temperature (one per label) or platt")
    if not multilabel and method not in ("temperature", "vector"):
        raise UserError(f"--method {method} calibrates each label of a multi-label run alone; for this run's one "
                        "label per image use --method temperature or vector")
