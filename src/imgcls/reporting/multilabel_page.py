"""The HTML body of a multi-label run's report, from report/analysis.* as evaluation/multilabel_analysis.py
wrote them: mAP and per-label AP with precision-recall curves, calibration per label, test-time
augmentation, the label pairs most often confused or missed, Grad-CAM per predicted label, top losses."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from imgcls import rundir
from imgcls.plotting import cam_overlay
from imgcls.reporting import figures
from imgcls.reporting.page import html_table, img_file, pct

CALIBRATION_ROWS = (("mAP", "map", pct), ("macro-F1", "macro_f1", pct), ("NLL per label", "nll", lambda v: f"{v:.4f}"),
                    ("ECE, mean over labels", "ece", pct), ("ECE, worst label", "max_class_ece", pct),
                    ("Brier per label", "brier", lambda v: f"{v:.4f}"))


def _before_after(left: str, right: str, a: dict, b: dict) -> str:
    return html_table(["metric", left, right], [[label, fmt(a[key]), fmt(b[key])]
                                                for label, key, fmt in CALIBRATION_ROWS if key in a and key in b])


def _labels(names: list[str]) -> str:
    return ", ".join(names) or "none"


def _figures(folder: Path, a: dict, arrays) -> dict:
    cal = a["calibration"]
    aps = {r["class"]: r["ap"] for r in a["per_class"] if r["ap"] is not None}
    drawn = {"pr": figures.precision_recall_curves(a["pr_curves"], aps, folder / "precision_recall.png"),
             "reliability": figures.reliability_diagrams(
                 [("before", cal["bins_before"], cal["before"]["ece"]),
                  ("after", cal["bins_after"], cal["after"]["ece"])], folder / "reliability.png",
                 x_label="predicted probability of a label", y_label="share of images with it")}
    items, cams, pixels = a["cam"]["per_label"], arrays["cams"], arrays["cam_images"]
    rows, captions, titles, at = [], [], [], 0
    for picture, item in zip(pixels, items, strict=True):
        n = len(item["labels"])
        rows.append([picture, *[cam_overlay(picture, c) for c in cams[at : at + n]]])
        captions.append([f"true: {_labels(item['true'])}"[:40],
                         *[f"{lab['class']} {100 * lab['probability']:.0f}%" + ("" if lab["right"] else " (wrong)")
                           for lab in item["labels"]]])
        titles.append(f"image {item['index']}")
        at += n
    drawn["cams"] = figures.image_grid(rows, captions, titles, folder / "cam_per_label.png") if rows else None
    losses = a["top_losses"]
    drawn["losses"] = figures.image_grid(
        [list(arrays["loss_images"])], [[f"true {_labels(t['true'])}\npredicted {_labels(t['predicted'])}"[:60]
                                         for t in losses]], ["top losses"], folder / "top_losses.png") \
        if losses else None
    return drawn


def multilabel_body(run: Path, folder: Path, summary: dict, curves: Path, a: dict, config: str) -> list[str]:
    """The report page's body for a multi-label run (its training curves already drawn at `curves`)."""
    drawn = _figures(folder, a, np.load(folder / rundir.ANALYSIS_NPZ))
    split, cal, tta, errors = a["split"], a["calibration"], a["tta"], a["label_errors"]
    confused = [[p["true"], p["predicted"], p["count"]] for p in errors["confused"]]
    hidden = [[p["missed"], p["alongside"], p["count"]] for p in errors["missed_alongside"]]
    misses = {r["class"]: r for r in errors["per_class"]}
    return [
        f"<h1>{html.escape(run.name)}: {html.escape(summary['model'])} on {html.escape(summary['data'])} "
        "(multi-label)</h1>",
        html_table(None, [
            ["parameters", f"{summary['params'] / 1e6:.2f}M"],
            ["best epoch (val mAP)", f"{summary['best_epoch']} of {summary['epochs']}"],
            [f"{split} mAP (val-selected checkpoint)", pct(a["map"])],
            [f"{split} macro-F1 / micro-F1", f"{pct(a['macro_f1'])} / {pct(a['micro_f1'])}"],
            [f"{split} subset accuracy (every label right)", pct(a["subset_accuracy"])],
            [f"{split} Hamming loss", f"{a['hamming_loss']:.4f}"],
            ["training time", f"{summary['train_time_s']:.0f} s ({summary['train_images_per_s']:.0f} img/s)"],
            ["device", f"{summary['device']} {summary['precision']}"]]),
        "<h2>Training curves</h2>", img_file(curves, "training curves"),
        "<p class=note>Accuracy in these curves is subset accuracy: the share of images with every label right.</p>",
        f"<h2>Per label on {split} ({a['n']} images)</h2>",
        html_table(["label", "AP", "threshold", "precision", "recall", "F1", "support", "missed", "false alarms"],
                   [[r["class"], "-" if r["ap"] is None else f"{r['ap']:.3f}", f"{r['threshold']:.3f}",
                     f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"],
                     misses[r["class"]]["missed"], misses[r["class"]]["false_alarms"]] for r in a["per_class"]]),
        "<p class=note>Each label is decided at its own threshold, tuned on val for its best F1 (and carried through "
        "the calibration below, which moves probabilities, never decisions), as imgcls predict decides.</p>",
        "<h2>Precision-recall curves</h2>", img_file(drawn["pr"], "precision-recall curves"),
        "<h2>Labels confused and missed</h2>",
        "<h3>Taken for another: a missed where b was predicted without being there</h3>",
        html_table(["true (missed)", "predicted instead", "images"], confused) if confused else "<p>none</p>",
        "<h3>Hidden by another: a missed where b was rightly found</h3>",
        html_table(["missed", "found alongside", "images"], hidden) if hidden else "<p>none</p>",
        f"<h2>Calibration per label on {split}</h2>",
        _before_after("before", "after", cal["before"], cal["after"]),
        f"<p class=note>The calibration is {html.escape(cal['where'])}.</p>",
        img_file(drawn["reliability"], "reliability diagrams"),
        f"<h2>Test-time augmentation ({html.escape(tta['mode'])})</h2>",
        _before_after("no TTA", "TTA", tta["without"], tta["with"]),
        "<h2>Grad-CAM per predicted label</h2>",
        img_file(drawn["cams"], "Grad-CAM per label") if drawn["cams"] else "<p>no image has a predicted label</p>",
        "<p class=note>The images predicted with the most labels, the most confident first: one heat-map for each "
        "predicted label (at most four), each explaining that label's logit.</p>",
        "<h2>Top losses</h2>", img_file(drawn["losses"], "top losses") if drawn["losses"] else "<p>no images</p>",
        "<h2>Configuration</h2>", f"<pre>{html.escape(config)}</pre>",
    ]
