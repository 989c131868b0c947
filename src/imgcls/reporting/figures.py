"""Figures written as PNG files (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def image_grid(rows: list[list[np.ndarray]], captions: list[list[str]], row_titles: list[str], out: Path) -> Path:
    """Rows of H x W x 3 uint8 images with a caption under each and a title at each row's left."""
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def comparison_charts(records: list[dict], out: Path) -> list[Path]:
    """Validation accuracy per epoch, and against cumulative training time, for every variant
    (mean over its seeds), each chart in one PNG."""
    by_variant: dict[str, list[list[dict]]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r["metrics"])
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
        path = Path(out) / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
