"""Figures written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from imgcls.errors import UserError
from imgcls.plotting import cam_overlay, draw_matrix, make_folder, plt, save_figure


def image_grid(rows: list[list[np.ndarray]], captions: list[list[str]], row_titles: list[str], out: Path) -> Path:
    """Rows of H x W x 3 uint8 images with a caption under each and a title at each row's left."""
    _check_png(out)
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.5 * n_cols + 1.2, 1.75 * n_rows), squeeze=False)
    for i, (row, caps) in enumerate(zip(rows, captions, strict=True)):
        for j in range(n_cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.axis("off")
                continue
            ax.imshow(row[j], interpolation="nearest")
            ax.set_xlabel(caps[j], fontsize=7)
        axes[i][0].set_ylabel(row_titles[i], fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def comparison_charts(records: list[dict], out: Path) -> list[Path]:
    """Validation accuracy per epoch, and against cumulative training time, for every variant
    (mean over its seeds), each chart in one PNG; none for runs without a validation split."""
    by_variant: dict[str, list[list[dict]]] = {}
    for r in records:
        if r["metrics"] and all("val_acc" in e for e in r["metrics"]):  # not with --val-fraction 0
            by_variant.setdefault(r["variant"], []).append(r["metrics"])
    if not by_variant:
        return []
    paths = []
    for name, x_key, x_label in (("accuracy_per_epoch.png", "epoch", "epoch"),
                                 ("accuracy_vs_time.png", "seconds", "training time (s)")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for variant, runs in by_variant.items():
            n = min(len(m) for m in runs)
            acc = np.mean([[e["val_acc"] for e in m[:n]] for m in runs], axis=0)
            seconds = np.mean([np.cumsum([e["epoch_time"] for e in m[:n]]) for m in runs], axis=0)
            xs = np.arange(1, n + 1) if x_key == "epoch" else seconds
            ax.plot(xs, 100 * acc, marker="o", markersize=3, label=variant)
        ax.set_xlabel(x_label)
        if x_key == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(save_figure(fig, Path(out) / name))
    return paths


def _check_png(out: Path) -> None:
    """Refuse an --out that is not a .png file: matplotlib would append .png to a name without one
    (or write another format), so the file would not be where we say we wrote it."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; pass a PNG file name, e.g. --out {out / 'preview.png'}")
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out} must name a .png file; e.g. --out {out.with_suffix('.png').name}")


def training_curves(metrics: list[dict], out: Path) -> Path:
    """Loss and accuracy per epoch, train against validation."""
    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.4))
    shown = (("train", "train"), ("val", "validation")) if all("val_acc" in m for m in metrics) else \
        (("train", "train"),)  # a run without a validation split (--val-fraction 0)
    for key, label in shown:
        ax_loss.plot(epochs, [m[f"{key}_loss"] for m in metrics], marker="o", markersize=3, label=label)
        ax_acc.plot(epochs, [100 * m[f"{key}_acc"] for m in metrics], marker="o", markersize=3, label=label)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out)


def confusion_heatmaps(cm: list[list[int]], classes: list[str], out: Path) -> Path:
    """The confusion matrix as counts and row-normalised (recall per true class), side by side."""
    counts = np.asarray(cm, dtype=float)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    side = max(3.5, 0.5 * k + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side))
    for ax, data, title, fmt in ((axes[0], counts, "counts", "{:.0f}"), (axes[1], rows, "row-normalised", "{:.2f}")):
        draw_matrix(ax, data, classes, fmt)
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def risk_coverage_plot(curve: dict, threshold: float | None, out: Path) -> Path:
    """Accuracy of the accepted images against the share accepted (validation), the --reject auto point marked."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.plot(curve["coverage"], curve["accuracy"], linewidth=1.5)
    if threshold is not None:
        i = int(np.argmin(np.abs(np.asarray(curve["threshold"]) - threshold)))
        ax.plot(curve["coverage"][i], curve["accuracy"][i], "o", color="red",
                label=f"--reject auto: p >= {threshold:.2f}")
        ax.legend(fontsize=8, loc="lower left")
    ax.set_xlim(0, 1)
    ax.set_xlabel("coverage (share of val images accepted)")
    ax.set_ylabel("accuracy of the accepted")
    ax.set_title(f"risk-coverage on val (AURC {curve['aurc']:.3f})", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out)


def reliability_diagrams(diagrams: list[tuple[str, dict, float]], out: Path, x_label: str = "confidence",
                         y_label: str = "accuracy") -> Path:
    """One panel per (title, reliability_bins(...), ECE): accuracy against confidence per bin, the gap to
    the diagonal shaded, the bin counts printed above the bars (a multi-label model's: the share of (image,
    label) pairs that hold against their predicted probability, with the labels given)."""
    fig, axes = plt.subplots(1, len(diagrams), figsize=(4.2 * len(diagrams), 4.2), squeeze=False)
    for ax, (title, bins, ece) in zip(axes[0], diagrams, strict=True):
        edges = np.asarray(bins["edges"])
        width = edges[1] - edges[0]
        centres = edges[:-1] + width / 2
        acc = np.nan_to_num(np.asarray(bins["accuracy"], dtype=float))
        conf = np.asarray(bins["confidence"], dtype=float)
        filled = np.asarray(bins["count"]) > 0
        ax.bar(centres[filled], acc[filled], width=width, edgecolor="black", linewidth=0.5, label=y_label)
        gap_low, gap_high = np.minimum(acc, conf), np.maximum(acc, conf)
        ax.bar(centres[filled], (gap_high - gap_low)[filled], bottom=gap_low[filled], width=width,
               color="red", alpha=0.3, hatch="//", label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        for x, a, n in zip(centres[filled], acc[filled], np.asarray(bins["count"])[filled], strict=True):
            ax.text(x, min(a, 1.0) + 0.02, str(n), ha="center", fontsize=6, rotation=90)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.12)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        ax.set_title(f"{title}: ECE {100 * ece:.2f}%", fontsize=10)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return save_figure(fig, out)


def precision_recall_curves(curves: dict[str, dict], aps: dict[str, float], out: Path) -> Path:
    """Each class's precision against recall (evaluation/multilabel.precision_recall_curve), its AP in the legend."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name, curve in curves.items():
        ax.step(curve["recall"], curve["precision"], where="post", linewidth=1.2,
                label=f"{name} (AP {aps[name]:.2f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(curves) > 6 else 1, loc="lower left")
    fig.tight_layout()
    return save_figure(fig, out)


def save_cam_overlays(images: np.ndarray, cams: np.ndarray, captions: list[str], stems: list[str],
                      out: Path) -> list[Path]:
    """One PNG per image: the image beside its heat-map overlay, with a caption. Images that share a
    file stem (a/cat.jpg, b/cat.png) get numbered names, so no overlay overwrites another."""
    make_folder(out)
    paths = []
    for image, cam, caption, path in zip(images, cams, captions, cam_overlay_paths(stems, out), strict=True):
        fig, (left, right) = plt.subplots(1, 2, figsize=(6, 3.3))
        left.imshow(image, interpolation="nearest")
        right.imshow(cam_overlay(image, cam))
        for ax in (left, right):
            ax.axis("off")
        fig.suptitle(caption, fontsize=9)
        fig.tight_layout()
        paths.append(save_figure(fig, path))
    return paths


def cam_overlay_paths(stems: list[str], out: Path) -> list[Path]:
    """Where save_cam_overlays writes each image's overlay: OUT/<stem>-cam.png, repeated stems numbered."""
    return [Path(out) / f"{stem}-cam.png" for stem in _unique(stems)]


def _unique(stems: list[str]) -> list[str]:
    """`stems` with repeats numbered (cat, cat-2, cat-3), skipping numbers another stem already uses."""
    used: set[str] = set()
    out = []
    for stem in stems:
        name, n = stem, 1
        while name in used:
            n += 1
            name = f"{stem}-{n}"
        used.add(name)
        out.append(name)
    return out
