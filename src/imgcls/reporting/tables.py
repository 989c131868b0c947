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
    """Group runs by variant; the first variant is the baseline for the gain column."""
    rows: dict[str, dict] = {}
    for r in records:
        rows.setdefault(r["variant"], {"variant": r["variant"], "runs": []})["runs"].append(r["summary"])
    out, baseline = [], None
    for row in rows.values():
        runs = row["runs"]
        acc, acc_sd = _mean_std([s["test_acc"] for s in runs])
        final, final_sd = _mean_std([s["test_acc_final"] for s in runs])
        ece, ece_sd = _mean_std([s.get("test_ece") for s in runs])
        val, val_sd = _mean_std([s["best_val_acc"] for s in runs])
        baseline = acc if baseline is None else baseline
        out.append({
            "variant": row["variant"],
            "model": runs[0]["model"],
            "params": runs[0]["params"],
            "gflops": runs[0].get("gflops"),
            "seeds": len(runs),
            "val_acc": val, "val_acc_std": val_sd,
            "test_acc": acc, "test_acc_std": acc_sd,
            "test_acc_final": final, "test_acc_final_std": final_sd,
            "gain": acc - baseline,
            "test_ece": ece, "test_ece_std": ece_sd,
            "train_time_s": statistics.fmean(s["train_time_s"] for s in runs),
            "train_images_per_s": statistics.fmean(s["train_images_per_s"] for s in runs),
            "inference_images_per_s": _mean_std([s.get("inference_images_per_s") for s in runs])[0],
        })
    return out


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _pm(mean: float, sd: float, scale: float = 100.0, digits: int = 2) -> str:
    return f"{scale * mean:.{digits}f} ± {scale * sd:.{digits}f}"


def _num(value, digits: int) -> str:
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def to_markdown(rows: list[dict]) -> str:
    lines = [
        "| variant | model | params | GFLOPs/img | test acc % (val-selected) | test acc % (final epoch) | "
        "gain vs first | ECE % | train time s | train img/s | inference img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['model']} | {r['params'] / 1e6:.2f}M | {_num(r['gflops'], 3)} | "
            f"{_pm(r['test_acc'], r['test_acc_std'])} | {_pm(r['test_acc_final'], r['test_acc_final_std'])} | "
            f"{100 * r['gain']:+.2f} | {_pm(r['test_ece'], r['test_ece_std'])} | {r['train_time_s']:.0f} | "
            f"{r['train_images_per_s']:.0f} | {_num(r['inference_images_per_s'], 0)} |"
        )
    seeds = sorted({r["seeds"] for r in rows})
    lines.append("")
    lines.append(f"Mean ± standard deviation over {'/'.join(map(str, seeds))} seed(s). The val-selected column is "
                 "the checkpoint with the best validation accuracy; the test split never selects anything.")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], out: Path) -> None:
    atomic_write_bytes(Path(out) / "results.csv", to_csv(rows).encode())
    atomic_write_bytes(Path(out) / "results.md", to_markdown(rows).encode())
