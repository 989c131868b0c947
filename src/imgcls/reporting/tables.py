"""The comparison table: one row per variant, mean and spread over seeds, as CSV and Markdown."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from imgcls.rundir import atomic_write_bytes


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(records: list[dict]) -> list[dict]:
    """Group runs by variant; the first variant is the baseline for the gain column (test accuracy; a multi-label
    comparison's test mAP)."""
    rows: dict[str, list[dict]] = {}
    for r in records:
        rows.setdefault(r["variant"], []).append(r)
    out, baseline = [], None
    for variant, group in rows.items():
        runs = [r["summary"] for r in group]
        tests = [r.get("test") or {} for r in group]  # balanced accuracy and macro-F1 from the test predictions
        bal, bal_sd = _mean_std([t.get("balanced_accuracy") for t in tests])
        f1, f1_sd = _mean_std([t.get("macro_f1") for t in tests])
        acc, acc_sd = _mean_std([s["test_acc"] for s in runs])
        final, final_sd = _mean_std([s["test_acc_final"] for s in runs])
        ece, ece_sd = _mean_std([s.get("test_ece") for s in runs])
        val, val_sd = _mean_std([s["best_val_acc"] for s in runs])
        val_final, val_final_sd = _mean_std([s["final_val_acc"] for s in runs])
        mean_ap, mean_ap_sd = _mean_std([s.get("test_map") for s in runs])
        multilabel = runs[0].get("task") == "multilabel"
        has_test = runs[0]["test_split"] is not None
        has_val = runs[0].get("val_split", True)  # False: trained with --val-fraction 0
        headline = (mean_ap if multilabel else acc) if has_test else val_final  # what the gain column compares
        baseline = headline if baseline is None else baseline
        out.append({
            "variant": variant,
            "task": "multilabel" if multilabel else "multiclass",
            "model": runs[0]["model"],
            "strategy": runs[0].get("strategy", "scratch"),
            "params": runs[0]["params"],
            "trainable_params": runs[0].get("trainable_params", runs[0]["params"]),
            "gflops": runs[0].get("gflops"),
            "seeds": len(runs),
            "val_split": has_val,
            "val_acc": val, "val_acc_std": val_sd,
            "val_acc_final": val_final, "val_acc_final_std": val_final_sd,
            "test_acc": acc, "test_acc_std": acc_sd,
            "test_acc_final": final, "test_acc_final_std": final_sd,
            **({"test_map": mean_ap, "test_map_std": mean_ap_sd} if multilabel else {}),
            "gain": headline - baseline,
            "test_balanced_acc": bal, "test_balanced_acc_std": bal_sd,
            "test_macro_f1": f1, "test_macro_f1_std": f1_sd,
            **_significance_columns(group[0].get("vs_first"), "map" if multilabel else "acc"),
            "test_ece": ece, "test_ece_std": ece_sd,
            "train_time_s": statistics.fmean(s["train_time_s"] for s in runs),
            "train_images_per_s": statistics.fmean(s["train_images_per_s"] for s in runs),
            "inference_images_per_s": _mean_std([s.get("inference_images_per_s") for s in runs])[0],
        })
    return out


def _significance_columns(vs: dict | None, metric: str) -> dict:
    """The paired comparison against the first variant (evaluation/significance.py), flat for CSV: of accuracy
    (with McNemar's p) or of mAP (`metric` "map", which has no McNemar test)."""
    keys = [f"{metric}_diff", f"{metric}_diff_ci_low", f"{metric}_diff_ci_high"] + \
        (["mcnemar_p"] if metric == "acc" else []) + ["significant"]
    if not vs:
        return dict.fromkeys(keys)
    values = [vs[f"{metric}_diff"], vs["ci_low"], vs["ci_high"]] + ([vs["mcnemar_p"]] if metric == "acc" else []) + \
        [vs["significant"]]
    return dict(zip(keys, values, strict=True))


def _diff_key(r: dict) -> str:
    return "map_diff" if r.get("task") == "multilabel" else "acc_diff"


def _delta(r: dict) -> str:
    key = _diff_key(r)
    if r.get(key) is None:
        return "—"
    mark = " *" if r["significant"] else ""
    return (f"{100 * r[key]:+.2f} [{100 * r[f'{key}_ci_low']:+.2f}, "
            f"{100 * r[f'{key}_ci_high']:+.2f}]{mark}")


def _p(r: dict) -> str:
    p = r["mcnemar_p"]
    return "—" if p is None else ("< 0.0001" if p < 1e-4 else f"{p:.4f}")


SIGNIFICANCE_NOTE = (
    "Δ acc is the paired difference in test accuracy against the first variant (percentage points), run against "
    "run of the same seed on the same test images, with a 95% bootstrap interval that resamples the test images "
    "and the seeds; McNemar p is the exact two-sided test on the images one variant gets right and the other "
    "wrong, pooled over seeds. * marks p < 0.05 with an interval that excludes 0. They say whether this "
    "difference on this test set is larger than image-to-image and seed-to-seed noise; they do not say it "
    "would hold on other data, at another budget, or with more seeds than were run (with one seed the "
    "interval knows nothing of seed noise), and pooling seeds treats repeated images as independent, so p "
    "is optimistic when seeds disagree. Comparing many variants, expect about one in twenty to pass by chance.")


MAP_SIGNIFICANCE_NOTE = (
    "Δ mAP is the paired difference in test mAP against the first variant (percentage points), run against run "
    "of the same seed on the same test images, with a 95% bootstrap interval that resamples the test images and "
    "the seeds and recomputes both mAPs on each resample; * marks an interval that excludes 0 (mAP ranks all "
    "images at once, so McNemar's per-image test does not apply). The interval says whether this difference on "
    "this test set is larger than image-to-image and seed-to-seed noise; it does not say it would hold on other "
    "data, at another budget, or with more seeds than were run (with one seed it knows nothing of seed noise). "
    "Comparing many variants, expect about one in twenty to exclude 0 by chance.")


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _pm(mean: float, sd: float, seeds: int, scale: float = 100.0, digits: int = 2) -> str:
    """The mean, and the spread over seeds where there are seeds to make one (one seed: no "± 0.00")."""
    if mean != mean:  # NaN: no run had the figure (e.g. results from before it was recorded)
        return "n/a"
    spread = f" ± {scale * sd:.{digits}f}" if seeds > 1 else ""
    return f"{scale * mean:.{digits}f}{spread}"


def _spread(key: str):
    """The cell of figure `key`: its mean over seeds, and its standard deviation where there are seeds."""
    return lambda r: _pm(r[key], r[f"{key}_std"], r["seeds"])


def _num(value, digits: int) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def to_markdown(rows: list[dict]) -> str:
    """The results table. Without a test split the held-out figure is the final epoch's validation
    accuracy (the best epoch's is selected on that same split, so it is shown as optimistic)."""
    has_test = not all(r["test_acc"] != r["test_acc"] for r in rows)  # NaN when no run had a test split
    has_val = any(r.get("val_split", True) for r in rows)  # none with --val-fraction 0
    chosen = "val-selected" if has_val else "final epoch"
    transfer = any(r["strategy"] != "scratch" for r in rows)
    columns = [("variant", lambda r: r["variant"]), ("model", lambda r: r["model"])]
    if transfer:
        columns += [("strategy", lambda r: r["strategy"]),
                    ("trainable params", lambda r: f"{r['trainable_params'] / 1e6:.3g}M")]
    columns += [("params", lambda r: f"{r['params'] / 1e6:.2f}M"), ("GFLOPs/img", lambda r: _num(r["gflops"], 3))]
    if has_test and rows[0].get("task") == "multilabel":
        return _multilabel_markdown(rows, columns, chosen)
    if has_test and not has_val:  # best.pt is the final epoch: one column says it
        columns += [("test acc % (final epoch)", _spread("test_acc"))]
    elif has_test:
        columns += [("test acc % (val-selected)", _spread("test_acc")),
                    ("test acc % (final epoch)", _spread("test_acc_final"))]
    elif has_val:
        columns += [("val acc % (final epoch)", _spread("val_acc_final")),
                    ("val acc % (best epoch, optimistic)", _spread("val_acc"))]
    columns += [("gain vs first", lambda r: "n/a" if r["gain"] != r["gain"] else f"{100 * r['gain']:+.2f}")]
    significance = any(r.get("acc_diff") is not None for r in rows)
    if has_test:
        columns += [(f"balanced acc % ({chosen})",
                     _spread("test_balanced_acc")),
                    (f"macro-F1 % ({chosen})", _spread("test_macro_f1"))]
    if significance:
        columns += [(f"Δ acc vs {rows[0]['variant']} [95% CI]", _delta), ("McNemar p", _p)]
    if has_test:
        columns += [("ECE %", _spread("test_ece"))]
    columns += [("train time s", lambda r: f"{r['train_time_s']:.0f}"),
                ("train img/s", lambda r: f"{r['train_images_per_s']:.0f}"),
                ("inference img/s", lambda r: _num(r["inference_images_per_s"], 0))]
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    seeds = sorted({r["seeds"] for r in rows})
    lines.append("")
    if not has_val:
        note = ("The runs have no validation split (--val-fraction 0): each checkpoint is its final epoch"
                + ("." if has_test else ", and with no test split either there is no held-out figure."))
    elif has_test:
        note = ("The val-selected column is the checkpoint with the best validation score (--monitor, validation "
                "accuracy by default); the test split never selects anything.")
    else:
        note = "This dataset has no test split: the final epoch's validation accuracy is the held-out figure."
    lines.append(f"{_seeds_note(seeds)} {note}")
    if significance:
        lines += ["", SIGNIFICANCE_NOTE]
    return "\n".join(lines) + "\n"


def _multilabel_markdown(rows: list[dict], columns: list, chosen: str) -> str:
    """A multi-label comparison's table: test mAP first, then macro-F1 and subset accuracy at each run's
    thresholds (tuned on val), the paired Δ mAP with its interval, and the costs."""
    columns += [(f"test mAP % ({chosen})", _spread("test_map")),
                ("gain vs first", lambda r: f"{100 * r['gain']:+.2f}"),
                (f"macro-F1 % ({chosen})", _spread("test_macro_f1")),
                (f"subset acc % ({chosen})", _spread("test_acc"))]
    significance = any(r.get("map_diff") is not None for r in rows)
    if significance:
        columns += [(f"Δ mAP vs {rows[0]['variant']} [95% CI]", _delta)]
    columns += [("train time s", lambda r: f"{r['train_time_s']:.0f}"),
                ("train img/s", lambda r: f"{r['train_images_per_s']:.0f}"),
                ("inference img/s", lambda r: _num(r["inference_images_per_s"], 0))]
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    lines += ["", f"{_seeds_note(sorted({r['seeds'] for r in rows}))} Multi-label runs: mAP (macro) ranks each "
                  "label's test images by its probability; macro-F1 and subset accuracy decide each label at the "
                  "run's own threshold, tuned on val. The test split never selects anything."]
    if significance:
        lines += ["", MAP_SIGNIFICANCE_NOTE]
    return "\n".join(lines) + "\n"


def _seeds_note(seeds: list[int]) -> str:
    if seeds == [1]:
        return "1 seed per variant: each figure is one run's, with no spread across seeds."
    return f"Mean ± standard deviation over {'/'.join(map(str, seeds))} seeds (a variant of 1 seed shows no spread)."


TEXT_WIDTH = 100  # the printed comparison fits a log or a narrow terminal; results.md has every column


def to_text(rows: list[dict]) -> str:
    """The comparison as `imgcls compare` prints it: the figures a reader compares first (the held-out
    accuracy, the difference to the first variant and its interval), then as many of the others as fit
    TEXT_WIDTH columns. Plain aligned text: it reads the same in a terminal and in a log."""
    has_test = not all(r["test_acc"] != r["test_acc"] for r in rows)
    multilabel = has_test and rows[0].get("task") == "multilabel"
    if multilabel:
        headline = ("test mAP %", _spread("test_map"))
    elif has_test:
        headline = ("test acc %" if any(r.get("val_split", True) for r in rows) else "test acc % (final)",
                    _spread("test_acc"))
    else:
        headline = ("val acc % (final)", _spread("val_acc_final"))
    columns = [("variant", lambda r: r["variant"]), headline]
    if any(r.get(_diff_key(r)) is not None for r in rows):
        columns.append(("Δ vs first [95% CI]", _delta))
    else:
        columns.append(("gain vs first", lambda r: "n/a" if r["gain"] != r["gain"] else f"{100 * r['gain']:+.2f}"))
    if multilabel:
        optional = [("macro-F1 %", _spread("test_macro_f1")), ("subset acc %", _spread("test_acc"))]
    else:
        optional = [("bal. acc %", _spread("test_balanced_acc")), ("ECE %", _spread("test_ece"))] if has_test else []
    optional += [("train s", lambda r: f"{r['train_time_s']:.0f}"), ("params", lambda r: f"{r['params'] / 1e6:.2f}M"),
                 ("model", lambda r: r["model"]) if any(r["model"] != r["variant"] for r in rows) else None]
    table = [[header, [cell(r) for r in rows]] for header, cell in columns]
    for header, cell in filter(None, optional):
        candidate = [header, [cell(r) for r in rows]]
        if _text_width([*table, candidate]) <= TEXT_WIDTH:
            table.append(candidate)
    widths = [max(len(header), *map(len, cells)) for header, cells in table]
    lines = ["  ".join(h.ljust(w) for (h, _), w in zip(table, widths, strict=True)).rstrip()]
    for i in range(len(rows)):
        lines.append("  ".join(cells[i].ljust(w) for (_, cells), w in zip(table, widths, strict=True)).rstrip())
    lines.append(_seeds_note(sorted({r["seeds"] for r in rows})))
    return "\n".join(lines) + "\n"


def _text_width(table: list) -> int:
    return sum(max(len(header), *map(len, cells)) for header, cells in table) + 2 * (len(table) - 1)


def write_tables(rows: list[dict], out: Path) -> None:
    atomic_write_bytes(Path(out) / "results.csv", to_csv(rows).encode())
    atomic_write_bytes(Path(out) / "results.md", to_markdown(rows).encode())
