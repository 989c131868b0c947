"""What `imgcls audit` prints and writes: a one-screen summary, the JSON file, an HTML page with thumbnails."""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image
from rich.table import Table

from imgcls import rundir
from imgcls.data.audit import Audit
from imgcls.errors import UserError, shown
from imgcls.evaluation.label_issues import CSV_COLUMNS, MULTILABEL_CSV_COLUMNS
from imgcls.reporting.console import console
from imgcls.reporting.page import html_page, html_table, png_img
from imgcls.rundir import atomic_write_bytes

SHOWN_PAIRS = 24  # thumbnails per kind of finding in the HTML page; the JSON lists more
SHOWN_ISSUES = 10  # label issues printed; the CSV, JSON and HTML page list them all


def _ratio(r: float) -> str:
    return "a class has no readable image" if math.isinf(r) else f"{r:.1f} : 1"


def print_audit(audit: Audit) -> None:
    """The counts table, the duplicate and file findings in a line each, the warnings and the suggestion."""
    r = audit.report
    splits = list(r["counts"])
    table = Table("class", *splits, title=f"{r['data']}: {r['images']} images, {len(r['classes'])} classes")
    for c in r["classes"]:
        table.add_row(c, *[str(r["counts"][s][c]) for s in splits])
    console.print(table)
    smallest = ", ".join(f"{c} ({n})" for c, n in r["smallest_classes"])
    console.print(f"imbalance (train, largest / smallest): {_ratio(r['imbalance_ratio'])}; smallest: {smallest}",
                  soft_wrap=True)
    for kind in ("exact", "near"):
        d = r[f"{kind}_duplicates"]
        within = f" (dHash within {r['near_duplicate_max_distance']} of 64 bits)" if kind == "near" else ""
        console.print(f"{kind} duplicates{within}: {d['count']} pair(s), {d['leakage']} across splits (leakage), "
                      f"{d['label_conflicts']} with different labels", soft_wrap=True)
    if r["files"]:
        f = r["files"]
        modes = ", ".join(f"{k} {n}" for k, n in sorted(f["channel_modes"].items(), key=lambda kv: -kv[1]))
        console.print(f"files: {f['unreadable']['count']} unreadable, {f['small']['count']} under {f['min_side']} px, "
                      f"{f['extreme_aspect']['count']} beyond {f['aspect_limit']:g}:1, {f['exif_rotated']['count']} "
                      f"EXIF-rotated; modes: {modes or 'none'}", soft_wrap=True)
    console.print(f"hashed {r['images']} images in {r['seconds']['read_and_hash']:.1f} s "
                  f"({r['images_per_s']:.0f} images/s)")
    for w in r["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", soft_wrap=True, highlight=False)
    console.print(f"suggested: {r['suggested_command']}", soft_wrap=True, highlight=False)
    if "label_issues" in r:
        _print_label_issues(r["label_issues"])


def _out_of_fold_score(section: dict) -> str:
    """How good the out-of-fold model was: accuracy, or a multi-label audit's mAP."""
    if "out_of_fold_map" in section:
        return f"out-of-fold mAP {section['out_of_fold_map']:.1%}"
    return f"out-of-fold accuracy {section['out_of_fold_accuracy']:.1%}"


def _print_label_issues(section: dict) -> None:
    how = (f"{section['folds']}-fold {section['recipe']} {section['model']}" +
           (f", {section['epochs']} epochs" if "epochs" in section else ""))
    console.print(f"label issues: {section['count']} of {section['images']} images probably mislabelled "
                  f"({how}; {_out_of_fold_score(section)}; {section['seconds']:.0f} s)", soft_wrap=True,
                  highlight=False)
    multilabel = "out_of_fold_map" in section
    table = Table("image", "given", "suggested", *(["doubtful"] if multilabel else []), "label quality",
                  title="most certainly wrong first")
    for issue in section["issues"][:SHOWN_ISSUES]:
        table.add_row(shown(issue["path"]), issue["given"], issue["suggested"],
                      *([issue["doubtful"]] if multilabel else []), f"{issue['label_quality']:.4f}")
    if section["issues"]:
        console.print(table)


def check_out(out: Path, suffix: str, within: tuple = (), flag: str = "--out") -> Path:
    """`out`, or a one-line error when it has the wrong suffix, cannot be written, or lies inside `within`
    (the data audited: a file there could become a training image). `flag`: how the message names it."""
    out = Path(out)
    if out.suffix.lower() != suffix:
        raise UserError(f"--out {out} should end in {suffix}; e.g. --out audit{suffix}")
    if out.is_dir() or not out.parent.is_dir():
        why = "it is a folder" if out.is_dir() else "its folder does not exist"
        raise UserError(f"cannot write {out} ({flag}): {why}; pass a file path in an existing folder")
    rundir.refuse_run_file(out, flag, within=within)
    return out


def write_audit_json(audit: Audit, out: Path) -> Path:
    """The whole report as JSON (an infinite imbalance ratio, from a class with no readable image, as null)."""
    out = check_out(out, ".json")
    report = dict(audit.report, imbalance_ratio=None if math.isinf(audit.report["imbalance_ratio"])
                  else audit.report["imbalance_ratio"])
    atomic_write_bytes(out, (json.dumps(report, indent=1) + "\n").encode())
    return out


def label_issues_path(out: Path) -> Path:
    """Where the label issues of an audit written to `out` go: audit.json -> audit-label-issues.csv."""
    return Path(out).with_name(f"{Path(out).stem}-label-issues.csv")


def write_label_issues_csv(audit: Audit, out: Path) -> Path:
    """One row per probable label error, most certainly wrong first; `train --exclude` reads its path column."""
    out = check_out(out, ".csv")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    section = audit.report["label_issues"]
    columns = MULTILABEL_CSV_COLUMNS if "out_of_fold_map" in section else CSV_COLUMNS
    writer.writerow(columns)
    for issue in section["issues"]:
        writer.writerow([issue[c] for c in columns])
    atomic_write_bytes(out, buffer.getvalue().encode())
    return out


def _label_issues_section(audit: Audit) -> str:
    section = audit.report.get("label_issues")
    if section is None:
        return ""
    multilabel = "out_of_fold_map" in section
    rows = [[png_img(_thumb_png(picture, scale=1), "suspect", issue["path"]),
             html.escape(issue["path"]), html.escape(issue["given"]), html.escape(issue["suggested"]),
             *([html.escape(issue["doubtful"])] if multilabel else []), f"{issue['label_quality']:.4f}"]
            for issue, picture in zip(section["issues"], audit.suspects, strict=True)]
    header = ["image", "file", "given", "suggested", *(["doubtful labels"] if multilabel else []), "label quality"]
    body = _raw_table(header, rows) if rows else "<p>none</p>"
    return (f"<h2>Probable label errors: {section['count']} of {section['images']} images</h2>"
            f"<p>{html.escape(section['method'])}; out-of-fold probabilities from {section['folds']} folds of "
            f"{html.escape(section['recipe'])} {html.escape(section['model'])} ({_out_of_fold_score(section)}). "
            f"Lowest label quality first.</p>{body}")


def _thumb_png(image: np.ndarray, scale: int = 3) -> bytes:
    img = Image.fromarray(image).resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    img.save(buffer, "PNG")
    return buffer.getvalue()


def _label(item: dict) -> str:
    return f"{item['split']} #{item['index']} {item['class']}" + (f"\n{item['file']}" if "file" in item else "")


def _pairs_section(audit: Audit, kind: str) -> str:
    d = audit.report[f"{kind}_duplicates"]
    rows = []
    for p in d["pairs"][:SHOWN_PAIRS]:
        where = "leakage" if p["cross_split"] else "within a split"
        extra = f", {p['distance']} bits apart" if "distance" in p else ""
        conflict = "" if p["same_label"] else ", labels differ"
        rows.append([png_img(_thumb_png(audit.thumb(p["a"])), "a", _label(p["a"])) +
                     png_img(_thumb_png(audit.thumb(p["b"])), "b", _label(p["b"])),
                     html.escape(f"{where}{extra}{conflict}"),
                     html.escape(_label(p["a"])).replace("\n", "<br>"),
                     html.escape(_label(p["b"])).replace("\n", "<br>")])
    shown = f" (first {len(rows)})" if d["count"] > len(rows) else ""
    body = _raw_table(["images", "finding", "first", "second"], rows) if rows else "<p>none</p>"
    return f"<h2>{kind.capitalize()} duplicates: {d['count']} pair(s){shown}</h2>{body}"


def _raw_table(header: list[str], rows: list[list[str]]) -> str:
    """A table whose cells are already HTML (thumbnails), unlike html_table's text cells."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_audit_html(audit: Audit, out: Path) -> Path:
    """One self-contained page: counts, warnings, the suggested command, thumbnails of duplicate pairs and a
    list of each file finding."""
    out = check_out(out, ".html")
    r = audit.report
    splits = list(r["counts"])
    body = [f"<h1>Audit of {html.escape(r['data'])}</h1>",
            html_table(["class", *splits], [[c, *[r["counts"][s][c] for s in splits]] for c in r["classes"]]),
            f"<p>Imbalance (train): {html.escape(_ratio(r['imbalance_ratio']))}</p>",
            "<ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in r["warnings"]) + "</ul>",
            f"<p>Suggested: <code>{html.escape(r['suggested_command'])}</code></p>",
            _label_issues_section(audit), _pairs_section(audit, "exact"), _pairs_section(audit, "near")]
    for key, finding in (r["files"] or {}).items():
        if isinstance(finding, dict) and "files" in finding and finding["count"]:
            rows = [[f["file"], ", ".join(f"{k} {v}" for k, v in f.items() if k != "file")]
                    for f in finding["files"][:200]]
            body.append(f"<h2>{html.escape(key.replace('_', ' '))}: {finding['count']}</h2>"
                        + html_table(["file", "detail"], rows))
    atomic_write_bytes(out, html_page(f"imgcls audit: {r['data']}", "".join(body)).encode())
    return out
