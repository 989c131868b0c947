"""matplotlib helpers shared by the reports (reporting/), TensorBoard and lr-find (training/) and the
server's Grad-CAM (serving/): a headless backend, saving a figure with one-line errors, the
confusion-matrix panel and the heat-map overlay."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: every figure goes to a file or an event log
matplotlib.rcParams["text.parse_math"] = False  # class names are text: a folder named "$x$" is not math
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from imgcls.errors import UserError  # noqa: E402
from imgcls.rundir import atomic_path  # noqa: E402

__all__ = ["cam_overlay", "draw_matrix", "make_folder", "plt", "save_figure"]


def make_folder(folder: Path) -> Path:
    """`folder`, created with its parents; a one-line error when a file is in the way or it cannot be made."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot create the folder {folder}: a file is in the way; choose another --out") from None
    except OSError as e:
        raise UserError(f"cannot create the folder {folder} ({e.strerror}); choose another --out") from None
    return folder


def save_figure(fig, out: Path) -> Path:
    """Write `fig` to `out` (its folder made if needed), whole or not at all (rundir.atomic_path), and close
    it; a one-line error if that fails. The format is `out`'s suffix."""
    out = Path(out)
    try:
        make_folder(out.parent)
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".") or "png")
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror}); choose another --out") from None
    finally:
        plt.close(fig)
    return out


def draw_matrix(ax, data: np.ndarray, classes: list[str], fmt: str = "{:.0f}") -> None:
    """A class x class matrix (rows true, columns predicted) as a heat-map, values written in up to 20 classes."""
    k = len(classes)
    ax.imshow(data, cmap="Blues")
    ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                dark = data[i, j] > 0.6 * data.max()
                ax.text(j, i, fmt.format(data[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if dark else "black")


def cam_overlay(image: np.ndarray, cam: np.ndarray, display: int = 160) -> np.ndarray:
    """An H x W x 3 uint8 image with its [0, 1] heat-map blended on top (jet colours), enlarged to
    about `display` pixels so that 32x32 inputs stay readable."""
    from PIL import Image

    scale = max(1, display // image.shape[0])
    size = (image.shape[1] * scale, image.shape[0] * scale)
    big = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.NEAREST), dtype=np.float32)
    heat = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR))
    colours = plt.get_cmap("jet")(heat / 255.0)[..., :3] * 255
    return (0.55 * big + 0.45 * colours).clip(0, 255).astype(np.uint8)
