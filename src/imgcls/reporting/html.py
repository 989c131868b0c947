"""One self-contained HTML page per run (images embedded), and one per comparison.

Reads what training (config.yaml, metrics.jsonl, summary.json) and evaluation (report/analysis.*)
wrote; draws the figures with reporting/figures.py; never trains or infers.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from imgcls import rundir
from imgcls.evaluation.analysis import analysis_mark, training_record
from imgcls.plotting import cam_overlay
from imgcls.progress import track
from imgcls.reporting import figures
from imgcls.reporting.multilabel_page import multilabel_body
from imgcls.reporting.page import html_page, html_table, img_file, pct
from imgcls.reporting.tables import aggregate, to_markdown

METRICS = (("accuracy", "accuracy", pct), ("NLL", "nll", lambda v: f"{v:.4f}"), ("ECE", "ece", pct),
           ("MCE", "mce", pct), ("classwise ECE", "classwise_ece", pct), ("Brier", "brier", lambda v: f"{v:.4f}"))


def _compare_table(left: str, right: str, a: dict, b: dict) -> str:
    return html_table(["metric", left, right], [[label, fmt(a[key]), fmt(b[key])] for label, key, fmt in METRICS])


def _gallery(images: np.ndarray, items: list[dict], title: str, out: Path, cams: np.ndarray | None = None) -> Path:
    row = list(images) if cams is None else [cam_overlay(i, c) for i, c in zip(images, cams, strict=True)]
    captions = [f"{it['true']} → {it['predicted']}\n{100 * it['probability']:.0f}%" for it in items]
    return figures.image_grid([row], [captions], [title], out)


def _run_figures(folder: Path, metrics: list[dict], a: dict, arrays) -> dict:
    """The report's figures, drawn into `folder`: curves, confusion, reliability, CAM and loss galleries."""
    cal = a["calibration"]
    n_right = len(a["cam"]["right"])
    cam_images, cams = arrays["cam_images"], arrays["cams"]
    draw = {
        "curves": lambda: figures.training_curves(metrics, folder / "curves.png"),
        "confusion": lambda: figures.confusion_heatmaps(a["confusion_matrix"], a["classes"], folder / "confusion.png"),
        "reliability": lambda: figures.reliability_diagrams(
            [("before", cal["bins_before"], cal["before"]["ece"]),
             (f"after, T = {cal['temperature']:.2f}", cal["bins_after"], cal["after"]["ece"])],
            folder / "reliability.png"),
        "cam_right": lambda: _gallery(cam_images[:n_right], a["cam"]["right"], "Grad-CAM, right",
                                      folder / "cam_right.png", cams[:n_right]) if a["cam"]["right"] else None,
        "cam_wrong": lambda: _gallery(cam_images[n_right:], a["cam"]["wrong"], "Grad-CAM, wrong",
                                      folder / "cam_wrong.png", cams[n_right:]) if a["cam"]["wrong"] else None,
        "losses": lambda: _gallery(arrays["loss_images"], a["top_losses"], "top losses", folder / "top_losses.png")
        if a["top_losses"] else None,
    }
    drawn = {name: thunk() for name, thunk in track(draw.items(), len(draw), "report: drawing figures", "figures")}
    drawn["galleries"] = [g for g in (drawn.pop("cam_right"), drawn.pop("cam_wrong")) if g is not None]
    return drawn


def write_run_report(run: Path) -> Path:
    """report/report.html for a run whose report/analysis.* exist (see evaluation.analysis)."""
    run = Path(run)
    folder = run / rundir.REPORT_DIR
    summary, metrics = training_record(run)
    a = rundir.read_sealed_json(folder / rundir.ANALYSIS_JSON, f"run imgcls report {run} again")
    config = (run / rundir.CONFIG).read_text()
    if a.get("task") == "multilabel":
        curves = figures.training_curves(metrics, folder / "curves.png")
        return _write_page(folder, run, multilabel_body(run, folder, summary, curves, a, config), a)
    cal, tta = a["calibration"], a["tta"]
    drawn = _run_figures(folder, metrics, a, np.load(folder / rundir.ANALYSIS_NPZ))
    curves, confusion, reliability = drawn["curves"], drawn["confusion"], drawn["reliability"]
    galleries, losses = drawn["galleries"], drawn["losses"]

    split = a["split"]
    # older analyses said only whether the report fitted the temperature itself
    where = cal.get("where") or ("fitted on val for this report" if cal.get("fitted_for_report")
                                 else "stored by imgcls calibrate")
    body = [
        f"<h1>{html.escape(run.name)}: {html.escape(summary['model'])} on {html.escape(summary['data'])}</h1>",
        html_table(None, [
            ["parameters", f"{summary['params'] / 1e6:.2f}M"],
            *([["best epoch (val)", f"{summary['best_epoch']} of {summary['epochs']}"],
               ["best val accuracy", pct(summary["best_val_acc"])],
               [f"{split} accuracy (val-selected checkpoint)", pct(a["accuracy"])]]
              if summary.get("val_split", True) else  # --val-fraction 0: best.pt is the final epoch
              [["checkpoint", f"final epoch ({summary['best_epoch']} of {summary['epochs']}): no validation split"],
               [f"{split} accuracy (final epoch)", pct(a["accuracy"])]]),
            *[[f"{split} {label}", pct(a[key])] for label, key in (("balanced accuracy", "balanced_accuracy"),
                                                                      ("macro-F1", "macro_f1")) if key in a],
            ["training time", f"{summary['train_time_s']:.0f} s ({summary['train_images_per_s']:.0f} img/s)"],
            ["device", f"{summary['device']} {summary['precision']}"]]),
        "<h2>Training curves</h2>", img_file(curves, "training curves"),
        f"<h2>Metrics on {split} ({a['n']} images)</h2>",
        _compare_table("before temperature scaling", f"after (T = {cal['temperature']:.3f})", cal["before"],
                       cal["after"]),
        f"<p class=note>The temperature was {where}; it never changes a prediction.</p>",
        "<h2>Classification report</h2>",
        html_table(["class", "precision", "recall", "F1", "support"],
               [[r["class"], f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1']:.3f}", r["support"]]
                for r in a["per_class"]]),
        "<h2>Confusion matrix</h2>", img_file(confusion, "confusion matrix"),
        "<p>Most confused: " + html.escape(", ".join(f"{p['true']} taken for {p['predicted']} ({p['count']})"
                                                     for p in a["most_confused"]) or "none") + "</p>",
        "<h2>Reliability</h2>", img_file(reliability, "reliability diagrams"),
        f"<h2>Test-time augmentation ({html.escape(tta['mode'])})</h2>",
        _compare_table("no TTA", "TTA", tta["without"], tta["with"]),
        *_rejection_section(folder, a, summary.get("val_split", True)),
        "<h2>Grad-CAM</h2>", "".join(img_file(g, g.stem) for g in galleries) or "<p>no images</p>",
        "<p class=note>The most confident right and wrong predictions; the heat-map explains the predicted "
        "class.</p>",
        "<h2>Top losses</h2>", img_file(losses, "top losses") if losses else "<p>no images</p>",
        "<h2>Configuration</h2>", f"<pre>{html.escape(config)}</pre>",
    ]
    return _write_page(folder, run, body, a)


def _write_page(folder: Path, run: Path, body: list[str], analysis: dict) -> Path:
    out = folder / rundir.REPORT_HTML
    page = html_page(f"imgcls report: {run.name}", analysis_mark(analysis) + "".join(body))
    rundir.atomic_write_bytes(out, page.encode())
    return out


def _rejection_section(folder: Path, analysis: dict, has_val: bool = True) -> list[str]:
    """Saying "unknown": the validation risk-coverage curve (stored by imgcls calibrate) with the --reject
    auto threshold, as the analysis found them, and the OOD table of the last `imgcls eval --ood`."""
    curve, rule = analysis.get("risk_coverage"), analysis.get("reject_rule")
    if curve is None and not has_val:
        return ["<h2>Rejection</h2>", "<p class=note>No --reject auto threshold: the run has no validation split "
                "to choose one on (trained with --val-fraction 0); pass a threshold such as --reject 0.8.</p>"]
    if curve is None:
        return ["<h2>Rejection</h2>", "<p class=note>Run imgcls calibrate to get the risk-coverage curve and the "
                "--reject auto threshold.</p>"]
    plot = figures.risk_coverage_plot(curve, rule["threshold"] if rule else None, folder / "risk_coverage.png")
    body = ["<h2>Rejection</h2>", img_file(plot, "risk-coverage")]
    ood = analysis.get("ood")  # checked by the analysis: this checkpoint's, numbers in range
    if ood and "stale" in ood:
        body.append(f"<p class=note>No OOD table: {html.escape(ood['stale'])}.</p>")
    elif ood:
        rows = [[name, f"{ood[key]['auroc']:.4f}", f"{ood[key]['fpr_at_95tpr']:.4f}"]
                for name, key in (("max-softmax", "msp"), ("energy", "energy"))]
        body += [f"<h3>Out-of-distribution: {html.escape(ood['folder'])} ({ood['n_ood']} images) against "
                 f"{ood['split']} ({ood['n_in']})</h3>", html_table(["score", "AUROC", "FPR at 95% TPR"], rows)]
        if ood.get("reject_auto"):
            r = ood["reject_auto"]
            body.append(f"<p>--reject auto (threshold {r['threshold']:.3f}) accepts {pct(r['ood_accepted'])} of "
                        f"the OOD images and {pct(r['in_coverage'])} of {ood['split']}.</p>")
    return body


def write_comparison_report(folder: Path, run_reports: dict[str, Path]) -> Path:
    """report.html for an `imgcls compare` folder: the results table, the charts, links to each run's report."""
    folder = Path(folder)
    # the table made again from the sealed results.json, as compare made results.md: an edit of either is no row
    results = rundir.read_sealed_json(folder / "results.json", "rerun imgcls compare with the same --out")
    markdown = to_markdown(aggregate(results.get("runs") or [])).strip().splitlines()
    header = [c.strip() for c in markdown[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in markdown[2:] if line.startswith("|")]
    note = " ".join(line for line in markdown[2:] if line and not line.startswith("|"))
    links = "".join(f'<li><a href="{html.escape(str(path.relative_to(folder)))}">{html.escape(name)}</a></li>'
                    for name, path in run_reports.items())
    charts = "".join(img_file(p, p.stem) for p in (folder / "accuracy_per_epoch.png", folder / "accuracy_vs_time.png")
                     if p.is_file())
    body = (f"<h1>Comparison: {html.escape(folder.name)}</h1>{html_table(header, rows)}"
            f"<p class=note>{html.escape(note)}</p><h2>Curves</h2>{charts}<h2>Runs</h2><ul>{links}</ul>")
    out = folder / rundir.REPORT_HTML
    rundir.atomic_write_bytes(out, html_page(f"imgcls comparison: {folder.name}", body).encode())
    return out
