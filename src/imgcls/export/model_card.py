"""MODEL_CARD.md: what the exported model does and how well, from the run's own numbers only."""

from __future__ import annotations

from pathlib import Path

FEW_IMAGES = 100  # parity on fewer images than this gets a caveat

RECIPE_KEYS = ("model", "head", "pretrained", "strategy", "epochs", "batch_size", "optimizer", "lr", "weight_decay",
               "warmup_epochs", "ema", "aug", "random_erasing", "mixup", "cutmix", "label_smoothing", "precision",
               "seed")


def pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


NOTHING_HELD_OUT = ("no held-out metrics: the data has no test split and the run no validation split "
                    "(trained with --val-fraction 0)")


def _multilabel_metrics_section(ev: dict) -> list[str]:
    lines = [f"## Test metrics ({ev['split']} split, {ev['n']} images; multi-label)", "",
             f"- mAP: {pct(ev['map'])}", f"- macro F1: {ev['macro_f1']:.4f}, micro F1: {ev['micro_f1']:.4f}",
             f"- subset accuracy (every label right): {pct(ev['subset_accuracy'])}",
             f"- Hamming loss: {ev['hamming_loss']:.4f}; binary cross-entropy: {ev['loss']:.4f}", "",
             "Each label is decided at its own threshold, tuned on val (the best F1 there); the thresholds are in "
             "model.json and the ONNX metadata (`imgcls.thresholds`).", ""]
    rows = [[r["class"], "-" if r["ap"] is None else f"{r['ap']:.4f}", f"{r['threshold']:.4f}",
             f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]] for r in ev["per_class"]]
    return lines + _table(["class", "AP", "threshold", "precision", "recall", "F1", "images with it"], rows)


def _metrics_section(ev: dict | None) -> list[str]:
    if ev is None:
        return ["## Test metrics", "", NOTHING_HELD_OUT]
    if ev.get("task") == "multilabel":
        return _multilabel_metrics_section(ev)
    lines = [f"## Test metrics ({ev['split']} split, {ev['n']} images)", "",
             f"- accuracy: {pct(ev['accuracy'])}", f"- macro F1: {ev['macro_f1']:.4f}", f"- NLL: {ev['loss']:.4f}"]
    if "top5_accuracy" in ev:
        lines.append(f"- top-5 accuracy: {pct(ev['top5_accuracy'])}")
    rows = [[r["class"], f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
            for r in ev["per_class"]]
    lines += ["", *_table(["class", "precision", "recall", "F1", "support"], rows), "", "## Most-confused pairs", ""]
    pairs = [[p["true"], p["predicted"], p["count"]] for p in ev["most_confused"]]
    lines += _table(["true", "predicted as", "images"], pairs) if pairs else ["none: no errors on this split"]
    return lines


def _calibration_section(calibration: dict | None) -> list[str]:
    lines = ["## Calibration", ""]
    if calibration is None:
        return lines + ["not calibrated: probabilities are the softmax of the logits (`imgcls calibrate RUN`)"]
    s = calibration["scaling"]
    fitted = f"temperature {s['temperature']:.4f}" if s.get("temperature") else f"{s['method']} scaling"
    lines += [f"{fitted}, fitted on val; the exported probabilities include it", ""]
    rows = []
    for split, m in calibration["splits"].items():
        for key in ("ece", "nll", "brier"):
            rows.append([split, key, f"{m['before'][key]:.4f}", f"{m['after'][key]:.4f}"])
    return lines + _table(["split", "metric", "before", "after"], rows)


def _rejection_section(rule: dict | None, curve: dict | None, has_val: bool = True) -> list[str]:
    lines = ["## Rejection (saying \"unknown\")", ""]
    if rule is None:
        reason = "no risk-coverage curve (`imgcls calibrate RUN`)" if curve is None else \
            "the validation images cannot show the target accuracy with the stated confidence"
        if not has_val:
            reason = "no validation split to choose one on (trained with --val-fraction 0)"
        return lines + [f"no threshold: {reason}"]
    return lines + [
        f"- threshold on the calibrated top-1 probability: {rule['threshold']:.4f} "
        f"(chosen on val so that accuracy >= {rule['target_accuracy']} holds with {pct(rule['confidence'])} "
        f"confidence: its binomial lower bound there is {pct(rule['accuracy_bound'])})",
        f"- on val it accepts {pct(rule['coverage'])} of images at accuracy {pct(rule['accuracy'])}, "
        f"against {pct(curve['accuracy'][-1])} accuracy when everything is accepted ({curve['n']} images)",
        f"- area under the val risk-coverage curve: {curve['aurc']:.4f}"]


def _parity_section(parity: dict, split: str = "val") -> list[str]:
    rows = []
    for r in (r for kind, r in parity.items() if kind != "int8"):
        lat = r["latency_ms_per_image"]
        rows.append([r["format"], r["images"], pct(r["top1_agreement"]), f"{r['max_abs_prob_diff']:.2e}",
                     f"{lat['pytorch']['batch1']:.2f}", f"{lat[r['format']]['batch1']:.2f}",
                     f"{lat['pytorch']['batch64']:.2f}", f"{lat[r['format']]['batch64']:.2f}"])
    header = ["format", f"{split} images", "agreement", "max abs prob diff", "pytorch ms/img b1",
              "export ms/img b1", "pytorch ms/img b64", "export ms/img b64"]
    few = [r["images"] for r in parity.values() if r.get("images", FEW_IMAGES) < FEW_IMAGES]
    caveat = ([f"Only {few[0]} {split} images: one disagreement moves the agreement by {1 / few[0]:.1%}, so the "
               "proof is weak."] if few else [])
    return ["## Export parity (fp32, against the run in PyTorch)", "", *_table(header, rows), *caveat] + \
        _int8_section(parity)


def _int8_section(parity: dict) -> list[str]:
    r = parity.get("int8")
    if r is None:
        return []
    lat = r["latency_ms_per_image"]
    rows = [[name, a["images"], pct(a["fp32"]), pct(a["int8"])] for name, a in r["accuracy"].items()]
    return ["", f"## int8 ({r['method']})", "",
            f"- top-1 agreement with the fp32 file on {r['images']} {r['split']} images: {pct(r['top1_agreement'])}",
            f"- ms/image, batch 1: fp32 {lat['fp32']['batch1']:.2f}, int8 {lat['int8']['batch1']:.2f}; batch 64: "
            f"fp32 {lat['fp32']['batch64']:.2f}, int8 {lat['int8']['batch64']:.2f}", "",
            *_table(["split", "images", "fp32 accuracy", "int8 accuracy"], rows)]


def _limitations(ev: dict | None, calibration: dict | None) -> list[str]:
    if ev is None:
        return ["## Limitations the numbers show", "", f"- {NOTHING_HELD_OUT}"]
    recalls = [r["recall"] for r in ev["per_class"]]
    mean = sum(recalls) / len(recalls)
    low = [f"{r['class']} ({r['recall']:.4f})" for r in ev["per_class"] if r["recall"] < mean]
    lines = ["## Limitations the numbers show", "",
             f"- classes with recall under the mean recall {mean:.4f}: {', '.join(low) or 'none'}"]
    if calibration is not None and "test" in calibration["splits"]:
        lines.append(f"- test ECE after calibration: {calibration['splits']['test']['after']['ece']:.4f}")
    if ev["split"] != "test":
        lines.append("- the data has no test split: the metrics above are on val, which chose the checkpoint")
    return lines


def model_card(trained, spec, ev: dict | None, calibration: dict | None, parity: dict, summary: dict | None) -> str:
    """The card of an export (`spec`, inference/metadata.py) of `trained`, from the run's own numbers."""
    cfg, info = trained.config, trained.dataset
    prep, rule, curve = spec.preprocessing, spec.reject_rule, spec.risk_coverage
    fp = info["fingerprint"]
    scaling = calibration["scaling"] if calibration else None
    lines = [f"# Model card: {cfg.model} on {info.get('name', fp['source'])}", "",
             f"Written by `imgcls export` from run `{trained.path}` (checkpoint `{Path(trained.checkpoint).name}`).",
             "", "## What it classifies", "",
             f"- {len(trained.classes)} classes: {', '.join(trained.classes)}",
             f"- input: {prep.as_dict()['input']}, img_size {prep.img_size}",
             f"- resize: {prep.as_dict()['resize']}, crop_pct {prep.crop_pct}",
             f"- normalisation inside the graph: mean {list(prep.mean)}, std {list(prep.std)}",
             "- outputs: logits, and probabilities" + (" after the fitted calibration" if scaling else ""),
             "", "## Data", "", f"- source: {fp['source']}",
             "- split sizes: " + ", ".join(f"{k} {v}" for k, v in fp["sizes"].items()),
             f"- val_fraction {fp['val_fraction']}, split_seed {fp['split_seed']}, "
             f"labels sha256 {fp['labels_sha256']}", "", "## Training recipe", ""]
    lines += _table(["setting", "value"], [[k, getattr(cfg, k)] for k in RECIPE_KEYS])
    has_val = "val" in fp["sizes"]  # none with --val-fraction 0
    if summary is None:
        lines += ["", "**Training did not finish** (no summary.json: it diverged, was stopped, or is still to be "
                      "resumed); the figures below are of its last saved checkpoint."]
    elif summary and has_val:
        lines += ["", f"best epoch {summary['best_epoch']} of {summary['epochs']}, val accuracy "
                      f"{pct(summary['best_val_acc'])}, training time {summary['train_time_s']:.1f} s"]
    elif summary:
        lines += ["", f"final epoch {summary['best_epoch']} of {summary['epochs']} (no validation split: "
                      f"--val-fraction 0), training time {summary['train_time_s']:.1f} s"]
    parity_split = "val" if has_val else "test" if "test" in fp["sizes"] else "train"
    for section in (_metrics_section(ev), _calibration_section(calibration), _rejection_section(rule, curve, has_val),
                    _parity_section(parity, parity_split), _limitations(ev, calibration)):
        lines += ["", *section]
    return "\n".join(lines) + "\n"
