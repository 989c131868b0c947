"""Prediction at folder scale, with one preprocessing shared by PyTorch and ONNX.

The input every path takes is what a user has: uint8 RGB images, N x H x W x 3 (NHWC), at the
run's image size, decoded by `imgcls.data.folder.load_image` (resize the shorter side to
size / crop_pct, bicubic, centre crop). Normalisation and calibration live inside
`InferenceModel`, the very module that `imgcls export` writes to ONNX, so a run and its exported
file see the same numbers. Files stream through a DataLoader in batches: memory stays flat however
many images there are, and an unreadable file becomes a row with an error, never a crash.
"""

from __future__ import annotations

import csv
import glob
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgcls.data.folder import load_image
from imgcls.data.presets import tta_view_count, tta_view_weights, tta_views
from imgcls.errors import UserError
from imgcls.evaluation.predict import require_finite

RESIZE_RULE = "shorter side to img_size / crop_pct (bicubic), centre crop img_size x img_size"
INPUT_LAYOUT = "uint8 RGB, N x H x W x 3 (NHWC), H = W = img_size"
OUT_FORMATS = (".csv", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes the model's input; the single definition used by run, safetensors and ONNX."""

    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float = 1.0

    def load(self, path: str | Path) -> np.ndarray:
        """The file as the exported graph's input: H x W x 3 uint8 RGB."""
        return load_image(Path(path), self.img_size, self.crop_pct)

    def __call__(self, path: str | Path) -> torch.Tensor:
        """timm style: the file as a normalised float32 3 x H x W tensor for the bare model."""
        x = torch.from_numpy(np.array(self.load(path))).permute(2, 0, 1).float()
        mean = torch.tensor(self.mean).view(3, 1, 1) * 255
        std = torch.tensor(self.std).view(3, 1, 1) * 255
        return (x - mean) / std

    def as_dict(self) -> dict:
        return {"img_size": self.img_size, "mean": list(self.mean), "std": list(self.std),
                "crop_pct": self.crop_pct, "resize": RESIZE_RULE, "input": INPUT_LAYOUT}

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(int(d["img_size"]), tuple(d["mean"]), tuple(d["std"]), float(d.get("crop_pct", 1.0)))


class InferenceModel(nn.Module):
    """uint8 N x H x W x 3 RGB -> (logits, probabilities): normalisation, the model, and the run's
    calibration (logits * scale + bias before the softmax) in one graph. Logits stay uncalibrated."""

    def __init__(self, model: nn.Module, mean, std, scale: list[float] | None = None,
                 bias: list[float] | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("scale", torch.tensor(scale if scale is not None else [1.0], dtype=torch.float32))
        self.register_buffer("bias", torch.tensor(bias if bias is not None else [0.0], dtype=torch.float32))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std  # NCHW view with channels-last strides
        logits = self.model(x).float()
        return logits, (logits * self.scale + self.bias).softmax(dim=1)


@dataclass
class Predictor:
    """Anything that scores uint8 NHWC batches: a run in PyTorch or an exported ONNX file."""

    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # images -> (logits, probabilities)
    classes: list[str]
    preprocessing: Preprocessing
    aug: str = "basic"  # the training recipe, for --tta N random views
    risk_coverage: dict | None = None  # from calibrate, for --reject auto
    source: str = ""


def torch_predictor(module: InferenceModel, classes, prep: Preprocessing, aug="basic", risk_coverage=None,
                    source="", precision: str = "fp32") -> Predictor:
    from imgcls.runtime import autocast

    device = next(module.parameters()).device
    module.eval()

    @torch.inference_mode()
    def run(images: np.ndarray):
        with autocast(device, precision):
            logits, probs = module(torch.from_numpy(images).to(device))
        return logits.float().cpu().numpy(), probs.float().cpu().numpy()

    return Predictor(run, classes, prep, aug, risk_coverage, source)


def run_predictor(trained, precision: str | None = None) -> Predictor:
    """A trained run (`load_run`) as a Predictor, with its calibration and risk-coverage curve. On the
    CPU it runs in fp32 (as its ONNX export does, so both give the same rows); on a GPU in the run's
    precision unless `precision` is given."""
    from imgcls.evaluation.rejection import read_risk_coverage
    from imgcls.runtime import resolve_precision

    info = trained.dataset
    scaling = trained.scaling
    module = InferenceModel(trained.model, info["mean"], info["std"], scaling.scale if scaling else None,
                            scaling.bias if scaling else None).to(next(trained.model.parameters()).device)
    prep = Preprocessing(info["img_size"], tuple(info["mean"]), tuple(info["std"]), info.get("crop_pct", 1.0))
    device = next(trained.model.parameters()).device
    if precision is None:
        precision = "fp32" if device.type == "cpu" else resolve_precision(trained.config.precision, device)
    return torch_predictor(module, trained.classes, prep, trained.config.aug, read_risk_coverage(trained.path),
                           str(trained.path), precision)


def onnx_predictor(path: str | Path, threads: int | None = None) -> Predictor:
    """An ONNX file written by `imgcls export`, run by onnxruntime with the file's own metadata."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("onnxruntime is not installed; pip install 'imgcls[export]'") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable files
        raise UserError(f"cannot load {path} as ONNX ({str(e).splitlines()[0][:100]}); "
                        "pass a .onnx file written by imgcls export") from e
    meta = session.get_modelmeta().custom_metadata_map
    if "imgcls.classes" not in meta:
        raise UserError(f"{path} has no imgcls metadata; pass a .onnx file written by imgcls export")
    prep = Preprocessing.from_dict(json.loads(meta["imgcls.preprocessing"]))
    curve = json.loads(meta["imgcls.risk_coverage"]) if "imgcls.risk_coverage" in meta else None

    def run(images: np.ndarray):
        logits, probs = session.run(["logits", "probabilities"], {"images": images})
        return logits, probs

    return Predictor(run, json.loads(meta["imgcls.classes"]), prep, meta.get("imgcls.aug", "basic"), curve, str(path))


def collect_paths(inputs: Iterable[str], list_file: str | None = None) -> list[Path]:
    """Files as given, every file under folders (recursively, hidden ones skipped), glob matches, and
    the lines of `list_file`; in the given order, folders sorted. A name that matches nothing is an error."""
    names = list(inputs)
    if list_file:
        listed = Path(list_file)
        if not listed.is_file():
            raise UserError(f"--list {listed} does not exist; pass a text file with one image path per line")
        try:
            text = listed.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"--list {listed} is not a UTF-8 text file; pass one image path per line") from None
        names += [line.strip() for line in text.splitlines() if line.strip()]
    paths: list[Path] = []
    for name in names:
        found = [Path(p) for p in sorted(glob.glob(name, recursive=True))] if glob.has_magic(name) else [Path(name)]
        if not found or not found[0].exists():
            raise UserError(f"{name} matches no file or folder; check the path or quote the glob")
        for p in found:
            if p.is_dir():
                paths += sorted(f for f in p.rglob("*") if f.is_file()
                                and not any(part.startswith(".") for part in f.relative_to(p).parts))
            else:
                paths.append(p)
    if not paths:
        raise UserError("no files to predict; pass image files, folders, globs or --list FILE")
    return paths


class _Files(torch.utils.data.Dataset):
    def __init__(self, paths: list[Path], prep: Preprocessing):
        self.paths, self.prep = paths, prep

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, torch.from_numpy(np.array(self.prep.load(self.paths[i]))), None  # a writable copy
        except Exception as e:  # any decoder failure is this file's problem, never the run's
            return i, None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()


def _collate(items):
    images = [img for _, img, _ in items if img is not None]
    stacked = torch.stack(images) if images else None
    return [i for i, _, _ in items], stacked, [err for _, _, err in items]


def batch_probs(predictor: Predictor, images: torch.Tensor, tta: str | int = "none",
                gen: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(logits of the plain view, probabilities averaged over the TTA views) for uint8 NHWC `images`."""
    n_views = tta_view_count(tta)
    nchw = images.permute(0, 3, 1, 2)
    views = torch.cat(tta_views(nchw, tta, predictor.aug, gen or torch.Generator().manual_seed(0)))
    batch = np.ascontiguousarray(views.permute(0, 2, 3, 1).numpy())
    logits, probs = predictor.run(batch)
    require_finite(probs, "these images")  # the PyTorch and the ONNX path alike: never a NaN row
    weights = tta_view_weights(tta).numpy().reshape(-1, 1, 1)
    probs = (probs.reshape(n_views, len(images), -1) * weights).sum(axis=0)
    return logits[: len(images)], probs


def _row(path: Path, probs: np.ndarray | None, classes: list[str], topk: int, threshold: float | None,
         error: str | None) -> dict:
    if probs is None:
        return {"path": str(path), "label": None, "confidence": None, "rejected": None, "top": [], "error": error}
    order = np.argsort(-probs, kind="stable")[:topk]
    confidence = float(probs[order[0]])
    rejected = threshold is not None and confidence < threshold
    return {"path": str(path), "label": "unknown" if rejected else classes[order[0]], "confidence": confidence,
            "rejected": rejected, "top": [{"class": classes[i], "probability": float(probs[i])} for i in order],
            "error": None}


def _loader(predictor: Predictor, paths: list[Path], batch_size: int, workers: int):
    workers = min(workers, max(0, (len(paths) - 1) // batch_size))  # no worker processes for a handful
    return torch.utils.data.DataLoader(_Files(paths, predictor.preprocessing), batch_size=batch_size,
                                       num_workers=workers, collate_fn=_collate)


def predict_paths(predictor: Predictor, paths: list[Path], topk: int = 3, tta: str | int = "none",
                  threshold: float | None = None, batch_size: int = 64, workers: int = 2,
                  progress: bool = False) -> Iterator[dict]:
    """One row per path, in order: top-k classes and (calibrated) probabilities, the rejection decision
    (`threshold` on the top-1 probability; rejected rows are labelled 'unknown' and keep their scores),
    and an error for files that cannot be decoded. Streams: only one batch of images is in memory."""
    k = min(topk, len(predictor.classes))
    gen = torch.Generator().manual_seed(0)
    with _Progress(len(paths), progress) as bar:
        for indices, images, errors in _loader(predictor, paths, batch_size, workers):
            probs = iter(batch_probs(predictor, images, tta, gen)[1]) if images is not None else iter(())
            for i, err in zip(indices, errors, strict=True):
                yield _row(paths[i], next(probs) if err is None else None, predictor.classes, k, threshold, err)
            bar.advance(len(indices))


def predict_arrays(predictor: Predictor, paths: list[Path], batch_size: int = 64, workers: int = 2):
    """(logits, probabilities) of the readable files as float64 tensors, and the number that were not."""
    logits, probs, unreadable = [], [], 0
    for _, images, errors in _loader(predictor, paths, batch_size, workers):
        unreadable += sum(err is not None for err in errors)
        if images is not None:
            out = predictor.run(np.ascontiguousarray(images.numpy()))
            require_finite(out[1], "these images")
            logits.append(out[0])
            probs.append(out[1])
    if not probs:
        return torch.empty(0), torch.empty(0), unreadable
    return (torch.from_numpy(np.concatenate(logits)).double(), torch.from_numpy(np.concatenate(probs)).double(),
            unreadable)


def split_nhwc(split, batch_size: int = 256):
    """A split's (uint8 NHWC numpy images, labels) batches, in order: the exported graph's input."""
    for images, labels in split.batches(torch.arange(len(split)), batch_size):
        if len(images):
            yield np.ascontiguousarray(images.permute(0, 2, 3, 1).numpy()), labels


class _Progress:
    """A progress bar with images/s on stderr, or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.start = total, enabled, 0, time.perf_counter()

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                console=Console(stderr=True))
            self.bar.start()
            self.task = self.bar.add_task("predict", total=self.total, rate="")
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self.enabled:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.0f} images/s")

    def __exit__(self, *exc):
        if self.enabled:
            self.bar.stop()


def flat_row(row: dict, topk: int) -> dict:
    """A row as table columns: path, label, confidence, rejected, top1..topk and their probabilities, error."""
    flat = {"path": row["path"], "label": row["label"], "confidence": row["confidence"], "rejected": row["rejected"]}
    for n in range(topk):
        top = row["top"][n] if n < len(row["top"]) else {"class": None, "probability": None}
        flat[f"top{n + 1}"], flat[f"top{n + 1}_prob"] = top["class"], top["probability"]
    flat["error"] = row["error"]
    return flat


def write_rows(rows: Iterable[dict], out: str | Path, topk: int) -> dict:
    """Stream rows into a .csv, .jsonl or .parquet file; returns counts (images, errors, rejected)."""
    out = Path(out)
    if out.suffix not in OUT_FORMATS:
        raise UserError(f"--out {out} has an unknown format; end it with .csv, .jsonl or .parquet")
    if out.suffix == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("writing .parquet needs pyarrow; pip install pyarrow, or use --out preds.csv") from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder {out.parent} ({e.strerror}); choose another --out") from None
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'preds.csv'}")
    counts = {"images": 0, "errors": 0, "rejected": 0}

    def counted():
        for row in rows:
            counts["images"] += 1
            counts["errors"] += row["error"] is not None
            counts["rejected"] += bool(row["rejected"])
            yield row

    {".csv": _write_csv, ".jsonl": _write_jsonl, ".parquet": _write_parquet}[out.suffix](counted(), out, topk)
    return counts


def _write_csv(rows, out: Path, topk: int) -> None:
    with open(out, "w", newline="") as f:
        writer = None
        for row in rows:
            flat = flat_row(row, topk)
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(flat))
                writer.writeheader()
            writer.writerow({k: "" if v is None else v for k, v in flat.items()})


def _write_jsonl(rows, out: Path, topk: int) -> None:
    with open(out, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _write_parquet(rows, out: Path, topk: int, chunk: int = 4096) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [("path", pa.string()), ("label", pa.string()), ("confidence", pa.float64()), ("rejected", pa.bool_())]
    for n in range(1, topk + 1):
        fields += [(f"top{n}", pa.string()), (f"top{n}_prob", pa.float64())]
    schema = pa.schema(fields + [("error", pa.string())])  # fixed, so a chunk of errors alone has the same types
    with pq.ParquetWriter(out, schema) as writer:
        buffer = []
        for row in rows:
            buffer.append(flat_row(row, topk))
            if len(buffer) == chunk:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                buffer = []
        writer.write_table(pa.Table.from_pylist(buffer, schema=schema))


def format_row(row: dict) -> str:
    """One console line: 'path: cat 0.912, dog 0.051', 'path: unknown (cat 0.41, ...)' or 'path: error: ...'."""
    if row["error"]:
        return f"{row['path']}: error: {row['error']}"
    ranked = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in row["top"])
    return f"{row['path']}: unknown ({ranked})" if row["rejected"] else f"{row['path']}: {ranked}"
