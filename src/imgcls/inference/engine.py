"""The inference engine: the one path from uint8 images to calibrated probabilities.

Every command that scores images goes through an `Engine`: validation during training, eval,
calibrate, report, TTA, predict, export parity, OOD and Grad-CAM. It holds the
backend (the run's model in PyTorch, or an exported ONNX file), the preprocessing, the calibration,
the validation risk-coverage curve the reject rule reads, the TTA recipe, and the batch policy. Its
input is the export's contract: uint8 RGB, N x H x W x 3.

An engine keeps no state between calls, and its model is configured (kernels, layout) before it is
built, never around a call: several threads may call one engine at once. The backend computes
float32 logits; calibration and the softmax are applied here, in float64, the same for every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from imgcls.data import Split
from imgcls.data.preprocessing import Preprocessing
from imgcls.data.presets import PixelRecipe, tta_view_count, tta_view_weights, tta_views
from imgcls.errors import UserError
from imgcls.inference.graph import InferenceModel
from imgcls.inference.reject import resolve_threshold
from imgcls.inference.scaling import Scaling
from imgcls.kernels.choice import KernelChoice
from imgcls.progress import Phase
from imgcls.runtime import autocast

Backend = Callable[[torch.Tensor], torch.Tensor]  # uint8 N x H x W x 3 -> float32 N x K logits, on the CPU


class TorchBackend:
    """The model in PyTorch: the export's graph (normalisation and model), at `precision`, under inference_mode."""

    def __init__(self, graph: InferenceModel, device: torch.device, precision: str):
        self.graph, self.device, self.precision = graph.eval(), device, precision

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast(self.device, self.precision):
            return self.graph.logits(images.to(self.device)).float().cpu()


@dataclass(frozen=True)
class Scores:
    logits: torch.Tensor  # float32 N x K: the plain view's, uncalibrated (energy scores read these)
    probs: torch.Tensor  # float64 N x K: calibrated softmax, averaged over the TTA views


def require_finite(values: torch.Tensor, where: str) -> None:
    """Refuse NaN or Inf model outputs in one line: every metric or probability after them is meaningless."""
    if not bool(torch.isfinite(values).all()):
        raise UserError(f"model outputs are not finite (NaN or Inf) on {where}; the checkpoint is damaged or the "
                        "run diverged: use another checkpoint (--checkpoint last) or train again with a lower --lr")


@dataclass
class Engine:
    backend: Backend
    classes: list[str]
    preprocessing: Preprocessing
    batch_size: int  # images per backend call; the TTA views of an image count as images
    recipe: PixelRecipe = field(default_factory=PixelRecipe)  # what --tta N redraws
    scaling: Scaling | None = None
    risk_coverage: dict | None = None  # the validation curve `--reject auto` reads
    precision: str = "fp32"
    kernels: KernelChoice | None = None
    source: str = ""  # what the engine was built from: a run folder, an export folder, an ONNX file
    identity: dict = field(default_factory=dict)  # model name, data fingerprint, weights digest
    module: torch.nn.Module | None = None  # the bare PyTorch model (Grad-CAM); None for ONNX
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    thresholds: torch.Tensor | None = None  # a multi-label model's, one per class: sigmoid outputs, not softmax
    # False for training's validation: non-finite outputs there are the run diverging, which the loop says
    # in its own line, on every rank alike (a refusal here would leave the other ranks in a collective)
    outputs_checked: bool = True

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    def __post_init__(self):
        if self.batch_size < 1:
            raise UserError(f"the batch size must be at least 1 (got {self.batch_size}); pass --batch-size 64")

    # ---------------------------------------------------------------- scoring

    def logits(self, images: torch.Tensor, where: str = "these images") -> torch.Tensor:
        """float32 logits of uint8 N x H x W x 3 `images`, `batch_size` at a time."""
        chunks = [self.backend(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size)]
        logits = torch.cat(chunks) if chunks else torch.empty(0, len(self.classes))
        if self.outputs_checked:
            require_finite(logits, where)
        return logits

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated softmax in float64 (a multi-label model's: each class's sigmoid)."""
        logits = logits.double()
        scaled = self.scaling.apply(logits) if self.scaling is not None else logits
        return scaled.sigmoid() if self.multilabel else scaled.softmax(dim=1)

    def score(self, images: torch.Tensor, tta: str | int = "none", gen: torch.Generator | None = None,
              where: str = "these images") -> Scores:
        """Scores of uint8 N x H x W x 3 `images`: the views of each image (see presets.tta_views) run in the
        same backend call; probabilities averaged over them with the views' weights. `--tta N`'s views are all
        random, so the plain image goes into the call too, for its logits alone (what energy reads)."""
        gen = gen if gen is not None else torch.Generator().manual_seed(0)
        n_views, weights = tta_view_count(tta), tta_view_weights(tta).view(-1, 1, 1)
        extra = int(isinstance(tta, int))  # the plain view, outside the average
        per_call = max(1, self.batch_size // n_views)  # as the callers batch: each chunk draws its views alike
        plain, probs = [], []
        for start in range(0, len(images), per_call):
            chunk = images[start : start + per_call].permute(0, 3, 1, 2)  # the views are made on N x 3 x H x W
            views = torch.cat([chunk] * extra + tta_views(chunk, tta, self.recipe, gen)).permute(0, 2, 3, 1)
            logits = self.logits(views, where).view(n_views + extra, len(chunk), -1)
            plain.append(logits[0])
            averaged = logits[extra:].flatten(0, 1)
            probs.append((self.probabilities(averaged).view(n_views, len(chunk), -1) * weights).sum(0))
        if not plain:
            empty = torch.empty(0, len(self.classes))
            return Scores(empty, empty.double())
        return Scores(torch.cat(plain), torch.cat(probs))

    def score_batches(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], tta: str | int = "none",
                      seed: int = 0, where: str = "the split",
                      advance: Callable[[int], None] | None = None) -> tuple[Scores, torch.Tensor]:
        """(scores, labels) over (uint8 N x 3 x H x W, labels) batches, e.g. a Split's; one random stream
        for the whole pass, so `--tta N` views differ from batch to batch but not from run to run.
        `advance(n)` is told each batch's image count (a progress bar)."""
        gen = torch.Generator().manual_seed(seed)
        scores, labels = [], []
        for images, batch_labels in batches:
            if len(images):
                scores.append(self.score(images.permute(0, 2, 3, 1), tta, gen, where))
                labels.append(batch_labels)
            if advance is not None:
                advance(len(batch_labels))
        if not scores:
            raise UserError(f"none of the images of {where} could be read; check the data folder")
        return (Scores(torch.cat([s.logits for s in scores]), torch.cat([s.probs for s in scores])),
                torch.cat(labels))

    def score_split(self, split: Split, tta: str | int = "none", seed: int = 0, where: str = "the split",
                    progress: bool = True) -> tuple[Scores, torch.Tensor]:
        """score_batches over `split` in order, with a progress bar (`progress`) labelled by `where`."""
        per_call = max(1, self.batch_size // tta_view_count(tta))
        views = tta_view_count(tta)
        label = f"scoring {where}" + (f" ({views} views each)" if views > 1 else "")
        with Phase(label, len(split), enabled=progress) as phase:
            return self.score_batches(split.batches(torch.arange(len(split)), per_call), tta, seed, where,
                                      phase.advance)

    # ---------------------------------------------------------------- decisions and inputs

    def threshold(self, reject: str | None, target_accuracy: float | None = None,
                  coverage: float | None = None) -> float | None:
        """--reject as a probability threshold (None: accept everything), read off this model's curve."""
        return resolve_threshold(reject, self.risk_coverage, target_accuracy, coverage)

    def model_input(self, images: torch.Tensor) -> torch.Tensor:
        """The bare model's float input for uint8 N x H x W x 3 `images`, on its device (for Grad-CAM)."""
        return self.preprocessing.normalize(images.permute(0, 3, 1, 2).to(self.device)).contiguous(
            memory_format=torch.channels_last)

    def describe(self) -> str:
        """One line: what scores, how, where."""
        kernels = f"; {self.kernels.describe()}" if self.kernels is not None else ""
        return (f"{self.identity.get('model', 'model')} from {self.source}: {len(self.classes)} classes, "
                f"{self.preprocessing.img_size}px, {self.device.type} {self.precision}, batch {self.batch_size}"
                f"{kernels}")
