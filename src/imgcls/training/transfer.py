"""Transfer-learning strategies as plain data: which layer groups train from which epoch, at what rate.

The model's parameters fall into layer groups from the input up (stem, each stage, head; see
`models.surface.layer_groups`). A strategy is then a learning rate and an unfreeze epoch per group:
  scratch, finetune  every group trains from epoch 0 (finetune: optionally at per-group rates)
  feature-extract    only the head trains; the backbone, BatchNorm statistics included, never changes
  gradual            the head first, then one group further down every K epochs (or at listed epochs)
Every group is in the optimizer from the start; a frozen group has no gradients, so AdamW leaves it
and its (empty) state alone until it unfreezes — joining at its own rate, the others' state intact.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch

import torch
import torch.nn as nn

from imgcls.config import TrainConfig, resolved_strategy
from imgcls.data import Split
from imgcls.data.mixing import soft_targets
from imgcls.data.preprocessing import Preprocessing
from imgcls.errors import UserError
from imgcls.inference.engine import TorchBackend
from imgcls.inference.graph import InferenceModel
from imgcls.models.contract import whitening
from imgcls.models.surface import layer_groups
from imgcls.progress import Phase

NEVER = math.inf


@dataclass
class LayerGroup:
    name: str
    params: list[str]
    lr: float
    unfreeze_epoch: float  # first epoch (0-based) in which it trains; NEVER for a frozen backbone
    fixed_from: dict[str, float] = field(default_factory=dict)  # parameter -> first epoch it stops training

    def trains(self, name: str, epoch: int) -> bool:
        return self.unfreeze_epoch <= epoch < self.fixed_from.get(name, NEVER)

    def record(self) -> dict:
        d = asdict(self)
        d["params"] = len(self.params)
        d["fixed_from"] = {k: int(v) for k, v in self.fixed_from.items()}
        d["unfreeze_epoch"] = None if self.unfreeze_epoch == NEVER else int(self.unfreeze_epoch)
        return d


def plan_groups(model: nn.Module, cfg: TrainConfig) -> list[LayerGroup]:
    """Layer groups with the rate and unfreeze epoch the run's strategy gives each."""
    strategy = resolved_strategy(cfg)
    fixed = fixed_parameters(model, cfg)
    try:
        groups = layer_groups(model)
    except ValueError as e:
        if strategy == "scratch":  # plain training needs no structure: one group
            return [LayerGroup("all", [n for n, _ in model.named_parameters()], cfg.lr, 0, fixed)]
        raise UserError(f"{cfg.model}: {e}; use --strategy scratch") from e
    names = [name for name, _ in groups]
    lrs = _group_rates(cfg, names)
    top = len(groups) - 1
    if strategy == "feature-extract":
        starts = [NEVER] * top + [0]
    elif strategy == "gradual":
        if cfg.unfreeze_at is not None:
            at = cfg.unfreeze_at
        else:  # the plan resolves --unfreeze-every (1 unless given) for gradual runs
            at = [cfg.unfreeze_every * k for k in range(1, top + 1)]
        # The k-th group below the head unfreezes after at[k - 1] epochs; groups beyond the list stay frozen.
        starts = [NEVER] * top + [0]
        for k, epoch in enumerate(at[:top], start=1):
            starts[top - k] = epoch
    else:
        starts = [0] * len(groups)
    return [LayerGroup(name, params, lr, start, {n: fixed[n] for n in params if n in fixed})
            for (name, params), lr, start in zip(groups, lrs, starts, strict=True)]


def batchnorm_parameters(model: nn.Module, kind: str) -> list[str]:
    """Names of the BatchNorm layers' `kind` ("weight" or "bias") parameters."""
    return [f"{name}.{kind}" for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and getattr(m, kind) is not None]


def fixed_parameters(model: nn.Module, cfg: TrainConfig) -> dict[str, float]:
    """Parameters that stop training at some epoch (0: never train), whatever their group's strategy:
    BatchNorm scales under --freeze-bn-scale; the whitening stem under --whiten-bias-epochs N (its filter
    always, its bias from epoch N)."""
    fixed = dict.fromkeys(batchnorm_parameters(model, "weight"), 0) if cfg.freeze_bn_scale else {}
    stem = whitening(model)
    if cfg.whiten_bias_epochs is not None and stem is not None:
        conv = stem.conv
        fixed[f"{conv}.weight"] = 0
        if getattr(model.get_submodule(conv), "bias", None) is not None:
            fixed[f"{conv}.bias"] = cfg.whiten_bias_epochs
    return fixed


def _group_rates(cfg: TrainConfig, names: list[str]) -> list[float]:
    """--group-lrs as given, or --layer-decay from the head's --lr down, or --lr everywhere."""
    if cfg.group_lrs is not None:
        if len(cfg.group_lrs) != len(names):
            raise UserError(f"--group-lrs has {len(cfg.group_lrs)} rates but {cfg.model} has {len(names)} layer groups "
                            f"({', '.join(names)}); give one rate per group, bottom to top")
        return list(cfg.group_lrs)
    decay = cfg.layer_decay if cfg.layer_decay is not None else 1.0
    return [cfg.lr * decay ** (len(names) - 1 - i) for i in range(len(names))]


def optimizer_param_groups(model: nn.Module, groups: list[LayerGroup], weight_decay: float,
                           bn_bias_lr_scale: float = 1.0, decay_all: bool = False) -> list[dict]:
    """Optimizer parameter groups: each layer group at its rate, split into decayed weights and
    undecayed biases/norms (timm's rule: 1-d tensors, biases and the model's no_weight_decay(); with
    `decay_all` everything decays). With `bn_bias_lr_scale` S != 1 the BatchNorm biases get a group of
    their own at S times the rate and 1/S the decay, so that their decay per step (rate x decay) is the
    other parameters' (airbench's "bias scaler")."""
    params = dict(model.named_parameters())
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    scaled = set(batchnorm_parameters(model, "bias")) if bn_bias_lr_scale != 1.0 else set()
    out = []
    for group in groups:
        bn_bias, decay, no_decay = [], [], []
        for name in group.params:
            p = params[name]
            exempt = p.ndim <= 1 or name.endswith(".bias") or any(fnmatch(name, pat) for pat in skip)
            (bn_bias if name in scaled else no_decay if exempt and not decay_all else decay).append(p)
        bn_decay = weight_decay / bn_bias_lr_scale if decay_all else 0.0
        for members, lr, wd in ((bn_bias, group.lr * bn_bias_lr_scale, bn_decay), (decay, group.lr, weight_decay),
                                (no_decay, group.lr, 0.0)):
            if members:
                out.append({"params": members, "lr": lr, "weight_decay": wd, "group": group.name})
    return out


def apply_schedule(model: nn.Module, groups: list[LayerGroup], epoch: int) -> None:
    """Set requires_grad for `epoch` (0-based): a group trains once its unfreeze epoch is reached, and each
    parameter until its `fixed_from` epoch."""
    params = dict(model.named_parameters())
    for group in groups:
        for name in group.params:
            params[name].requires_grad_(group.trains(name, epoch))


def train_mode(model: nn.Module) -> None:
    """model.train(), except that fully frozen submodules stay in eval mode, so their BatchNorm
    statistics and stochastic depth do not change what a frozen backbone computes."""
    model.train()
    _eval_frozen(model)


def _eval_frozen(module: nn.Module) -> None:
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.eval()
        else:
            _eval_frozen(child)


class PooledFeatures(nn.Module):
    """A model's pooled features, the head's input: forward_head(forward_features(x), pre_logits=True)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


def cache_features(model: nn.Module, split: Split, prep: Preprocessing, device, precision: str,
                   batch_size: int, label: str = "features", progress: bool = True) -> Split:
    """The frozen backbone's pooled features for every image of `split`, unaugmented, through the inference
    path the engine uses (the export's graph and backend) with the model in eval mode."""
    model.eval()
    backend = TorchBackend(InferenceModel(PooledFeatures(model), prep), device, precision)
    chunks, labels = [], []
    with Phase(label, len(split), enabled=progress) as phase:
        for images, y in split.batches(torch.arange(len(split)), batch_size):
            if len(images):
                chunks.append(backend(images.permute(0, 2, 3, 1)))
                labels.append(y)
            phase.advance(len(y))
    return Split(torch.cat(labels), images=torch.cat(chunks))


class FeatureTargets:
    """The training transform for cached features: no pixels to augment, only (smoothed) targets."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        self.num_classes, self.smoothing = num_classes, label_smoothing

    def __call__(self, features: torch.Tensor, labels: torch.Tensor, gen: torch.Generator):
        ones = torch.ones(len(labels))
        return features, soft_targets(labels, labels, ones, self.num_classes, self.smoothing)
