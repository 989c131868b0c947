"""Inference: logits over a split, and a trained run loaded back for evaluation or prediction."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgcls import rundir
from imgcls.config import MAX_IMG_SIZE, TrainConfig, given_eval_batch_size, load_config
from imgcls.data import Split, normalize
from imgcls.data.decode import FORMAT_NAMES, DecodeError
from imgcls.data.folder import load_image
from imgcls.data.presets import tta_view_count, tta_view_weights, tta_views
from imgcls.errors import UserError
from imgcls.evaluation.calibration import Scaling, read_scaling
from imgcls.kernels import KernelChoice, attach_lazy, attached, choose_kernels
from imgcls.models import create_model
from imgcls.models.checkpoint import load_checkpoint, restore_weights
from imgcls.runtime import autocast, resolve_precision


def require_finite(outputs: torch.Tensor | np.ndarray, where: str) -> None:
    """Refuse NaN or Inf model outputs in one line: every metric or probability after them is meaningless."""
    finite = np.isfinite(outputs).all() if isinstance(outputs, np.ndarray) else torch.isfinite(outputs).all()
    if not finite:
        raise UserError(f"model outputs are not finite (NaN or Inf) on {where}; the checkpoint is damaged or the "
                        "run diverged: use another checkpoint (--checkpoint last) or train again with a lower --lr")


def forward_batch(model, images: torch.Tensor, mean, std, device, precision: str,
                  layout: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """`model`(x) for a uint8 batch (model: any callable, e.g. a feature extractor): normalise,
    in `layout` (channels-last unless the kernel choice says otherwise), autocast. Call under inference_mode."""
    x = normalize(images.to(device), mean, std).contiguous(memory_format=layout)
    with autocast(device, precision):
        return model(x)


def eval_batch_size(requested: int, img_size: int) -> int:
    """`requested`, capped at about 2M pixels a batch: 512 CIFAR images are fine, but 512 at 224 px
    make activations of gigabytes that run several times slower than small batches on a CPU."""
    return max(1, min(requested, 2**21 // (img_size * img_size)))


def _inference_kernels(model, kernels: KernelChoice | None, batch_size: int):
    """(batch size, layout, kernel context): those of `kernels`, by default the choice attached to `model`
    by training or `load_run` (imgcls.kernels; its batch size is the user's --eval-batch-size when given);
    without one, `batch_size`, channels-last and torch's own attention and depthwise kernels."""
    kernels = kernels if kernels is not None else attached(model)
    if kernels is None:
        return batch_size, torch.channels_last, contextlib.nullcontext()
    return kernels.eval_batch_size, kernels.layout, kernels.context(model, train=False)


@torch.inference_mode()
def predict_logits(model, split: Split, mean, std, device, precision: str, batch_size: int = 512,
                   kernels: KernelChoice | None = None):
    """(logits float32, labels) for every image of `split`, in order, on the CPU, with the inference
    kernels (see `_inference_kernels`)."""
    model.eval()
    all_logits, all_labels = [], []
    batch_size, layout, kernel_context = _inference_kernels(model, kernels, batch_size)
    batch_size = eval_batch_size(batch_size, split.img_size)
    with kernel_context:
        for images, labels in split.batches(torch.arange(len(split)), batch_size):
            if len(images) == 0:
                continue
            all_logits.append(forward_batch(model, images, mean, std, device, precision, layout).float().cpu())
            all_labels.append(labels)
    return torch.cat(all_logits), torch.cat(all_labels)


@torch.inference_mode()
def predict_probs(model, split: Split, mean, std, device, precision: str, batch_size: int = 512,
                  tta: str | int = "none", aug: str = "basic", scaling: Scaling | None = None, seed: int = 0,
                  kernels: KernelChoice | None = None):
    """(probabilities float64, labels) for every image of `split`: softmax of the (scaled) logits,
    averaged over the test-time views (weighted, see `tta_view_weights`). A batch's views run as one forward pass."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    n_views, weights = tta_view_count(tta), tta_view_weights(tta).view(-1, 1, 1)
    batch_size, layout, kernel_context = _inference_kernels(model, kernels, batch_size)
    batch_size = max(1, eval_batch_size(batch_size, split.img_size) // n_views)
    all_probs, all_labels = [], []
    with kernel_context:  # one context for all batches: a sdpa_kernel context cannot be entered twice
        for images, labels in split.batches(torch.arange(len(split)), batch_size):
            if len(images) == 0:
                continue
            views = torch.cat(tta_views(images, tta, aug, gen))
            logits = forward_batch(model, views, mean, std, device, precision, layout).double().cpu()
            if scaling is not None:
                logits = scaling.apply(logits)
            probs = (logits.softmax(dim=1).view(n_views, len(images), -1) * weights).sum(dim=0)
            all_probs.append(probs)
            all_labels.append(labels)
    return torch.cat(all_probs), torch.cat(all_labels)


@dataclass
class TrainedRun:
    path: Path
    config: TrainConfig
    dataset: dict  # dataset.json: classes, img_size, mean, std, crop_pct, fingerprint
    model: torch.nn.Module
    checkpoint: Path
    scaling: Scaling | None = None  # from calibration.json, once `imgcls calibrate` has run
    allow_data_change: bool = False  # score the run's data even if it differs from what it was trained on

    @property
    def classes(self) -> list[str]:
        return self.dataset["classes"]


DATASET_KEYS = ("classes", "img_size", "mean", "std", "fingerprint")  # what evaluation reads from dataset.json


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _dataset_problem(info: dict) -> str | None:
    """What is wrong with a dataset.json's values, if anything: a damaged file must not reach the
    model as a negative image size or a two-value mean (or, in predict, as one error row per image)."""
    classes, size, crop = info["classes"], info["img_size"], info.get("crop_pct", 1.0)
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        return f"classes is {classes!r}, not a list of two or more class names"
    if len(set(classes)) != len(classes):
        return f"classes lists {sorted({c for c in classes if classes.count(c) > 1})[0]!r} twice"
    if not isinstance(size, int) or isinstance(size, bool) or not 8 <= size <= MAX_IMG_SIZE:
        return f"img_size is {size!r}, not a whole number of pixels from 8 to {MAX_IMG_SIZE}"
    for key in ("mean", "std"):
        v = info[key]
        if not isinstance(v, list) or len(v) != 3 or not all(map(_is_number, v)) or (key == "std" and min(v) <= 0):
            return f"{key} is {v!r}, not three {'positive ' if key == 'std' else ''}numbers (R, G, B)"
    if not _is_number(crop) or not 0 < crop <= 1:
        return f"crop_pct is {crop!r}, not a number in (0, 1]"
    fingerprint = info["fingerprint"]
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("sizes"), dict):
        return "fingerprint is not a mapping that holds the split sizes ('sizes')"
    return None


def check_dataset_info(info, path: Path) -> None:
    """Refuse a run's dataset.json that lacks a key evaluation reads or holds a value it cannot use."""
    absent = [k for k in DATASET_KEYS if not isinstance(info, dict) or k not in info]
    if absent:
        raise UserError(f"{path} lacks {', '.join(absent)}; the file is damaged: restore it or train again")
    problem = _dataset_problem(info)
    if problem:
        raise UserError(f"{path} is damaged: {problem}; restore it from a backup or train the run again")


def load_run(path: str | Path, checkpoint: str = "best", device: torch.device | None = None,
             allow_data_change: bool = False) -> TrainedRun:
    """A run's config and model with weights from `checkpoint` ("best", "last" or a file path).
    Its own data, when loaded through `run_split`, must match the recorded fingerprint unless
    `allow_data_change`."""
    path = rundir.require_run(path)
    cfg = load_config(path / rundir.CONFIG)
    info_path = path / rundir.DATASET
    if not info_path.is_file():
        raise UserError(f"{path} has no {rundir.DATASET}; the run never started training, train it again")
    info = rundir.read_json(info_path)
    check_dataset_info(info, info_path)
    ckpt_path = {"best": path / rundir.BEST, "last": path / rundir.LAST}.get(checkpoint, Path(checkpoint))
    ckpt = load_checkpoint(ckpt_path, cfg.model, len(info["classes"]))
    model = create_model(cfg.model, len(info["classes"]), head=cfg.head)
    restore_weights(model, ckpt, ckpt_path)
    model = model.to(device or torch.device("cpu"), memory_format=torch.channels_last).eval()
    attach_lazy(model, lambda m: _run_kernels(path, cfg, info, m))
    calibration = path / rundir.CALIBRATION
    scaling = read_scaling(calibration, len(info["classes"])) if calibration.is_file() else None
    return TrainedRun(path, cfg, info, model, ckpt_path, scaling, allow_data_change)


def _run_kernels(path: Path, cfg: TrainConfig, info: dict, model: torch.nn.Module) -> KernelChoice:
    """The inference kernels of a loaded run on this machine, chosen when it first predicts (imgcls.kernels,
    cached). The config holds the kernels training ran with; those the user gave as flags (summary.json's
    `kernels.source`) are kept, the others are measured for inference here. Puts the model in the chosen layout."""
    requested = {"attention": cfg.attention, "depthwise_precision": cfg.depthwise_precision,
                 "memory_format": cfg.memory_format}
    fields = {"attention": "attention_eval", "depthwise_precision": "depthwise_eval", "memory_format": "memory_format"}
    try:
        source = rundir.read_json(path / rundir.SUMMARY)["kernels"]["source"]
        measured = {option: source.get(f) not in ("flag", None) for option, f in fields.items()}
    except (UserError, KeyError, TypeError, AttributeError):
        measured = {}  # an unfinished run or an older imgcls: the config's values stand
    for option in fields:
        if measured.get(option):
            requested[option] = "auto"
    device = next(model.parameters()).device
    choice = choose_kernels(model, (cfg.batch_size, 3, info["img_size"], info["img_size"]), device,
                            resolve_precision(cfg.precision, device), **requested, compile="off",
                            eval_batch_size=given_eval_batch_size(cfg),
                            name=cfg.model, train=False)
    # chosen lazily, from inside predict's inference_mode: re-laid-out weights made there would be inference
    # tensors, which Grad-CAM (report, cam) cannot backpropagate through
    with torch.inference_mode(False):
        model.to(memory_format=choice.layout)
    return choice


def load_images(paths: list[str | Path], img_size: int, crop_pct: float = 1.0) -> torch.Tensor:
    """Files -> uint8 N x 3 x S x S with the same decoding, resize and crop that training data got."""
    arrays = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise UserError(f"image {p} does not exist; check the path")
        try:
            arrays.append(load_image(p, img_size, crop_pct))
        except DecodeError as e:
            raise UserError(f"cannot read image {p}: {e}; pass a readable {FORMAT_NAMES} file") from e
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
