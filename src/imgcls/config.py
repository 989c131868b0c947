"""Training configuration: one plain dataclass, filled from defaults, a YAML recipe, then flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from imgcls.data.datasets import NORMALIZATIONS
from imgcls.data.presets import AUGMENTATIONS
from imgcls.errors import UserError


@dataclass
class TrainConfig:
    # data
    data: str = "cifar10-mini"  # cifar10, cifar10-mini, or a path to an image folder
    data_dir: str | None = None  # folder that holds cifar-10-batches-py/ (cifar10 only)
    img_size: int | None = None  # None: the model's native input size
    val_fraction: float = 0.1  # carved from train (stratified) when the data has no val split
    split_seed: int = 0  # fixed apart from `seed`, so every run of a comparison sees one split
    data_mode: str = "auto"  # auto | memory | stream
    workers: int = 2  # DataLoader workers, streaming mode only
    # model
    model: str = "resnet18_cifar"
    # transfer learning
    pretrained: bool | str = False  # True: the model's own weights (imgcls models); or a weights file
    strategy: str = "auto"  # auto: finetune with pretrained weights, else scratch
    head: str = "linear"  # linear | mlp
    cache_features: bool = False  # feature-extract only: train the head on features computed once
    layer_decay: float | None = None  # finetune/gradual: each group's rate is D times the one above
    group_lrs: list[float] | None = None  # finetune/gradual: one rate per layer group, bottom to top
    unfreeze_every: int | None = None  # gradual: unfreeze the next group down every K epochs
    unfreeze_at: list[int] | None = None  # gradual: ... or after these epochs
    # optimisation
    epochs: int = 10
    batch_size: int = 128  # the global batch: split evenly across processes under torchrun
    optimizer: str = "adamw"  # adamw | sgd (Nesterov momentum)
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    ema: float = 0.0  # decay per step of an exponential moving average of the weights; 0 is off
    whiten: bool = False  # initialise the stem from the training images' patch covariance (fastnet_*)
    # augmentation and regularisation
    aug: str = "basic"  # none | basic | standard | randaugment | trivialaugment | autoaugment
    random_erasing: float | None = None  # probability; None: the recipe's own (0.2 in standard)
    mixup: float = 0.0  # Beta alpha; 0 is off
    cutmix: float = 0.0  # Beta alpha; 0 is off
    mix_prob: float = 1.0  # chance a batch is mixed at all
    mix_switch_prob: float = 0.5  # with both on: chance a mixed batch uses CutMix
    label_smoothing: float = 0.0
    normalize: str = "auto"  # auto (the dataset's own) | cifar | imagenet
    # run
    seed: int = 0
    out: str | None = None
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the training forward pass
    sync_bn: bool = False  # torchrun on GPUs: BatchNorm statistics over the global batch
    eval_batch_size: int = 512
    quiet: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
STRATEGIES = ("auto", "scratch", "feature-extract", "finetune", "gradual")


def read_recipe(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe: a mapping of TrainConfig fields (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist; pass a YAML file to --recipe")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path} must be a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise UserError(
            f"recipe {path}: unknown option(s) {', '.join(unknown)}; "
            f"valid options are {', '.join(sorted(FIELDS))}"
        )
    return values


def build_config(recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe, then explicit overrides (None means 'not given')."""
    values: dict[str, Any] = {}
    if recipe is not None:
        values.update(read_recipe(recipe))
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    _validate(cfg)
    return cfg


def _validate(cfg: TrainConfig) -> None:
    choices = {
        "data_mode": ("auto", "memory", "stream"),
        "device": ("auto", "cpu", "cuda"),
        "precision": ("auto", "fp32", "bf16", "fp16"),
        "optimizer": ("adamw", "sgd"),
        "aug": AUGMENTATIONS,
        "normalize": ("auto", *NORMALIZATIONS),
    }
    choices["strategy"] = STRATEGIES
    choices["head"] = ("linear", "mlp")
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
    positive = ("epochs", "batch_size", "eval_batch_size")
    for name in positive:
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer")
    if cfg.img_size is not None and cfg.img_size < 8:
        raise UserError("--img-size must be at least 8 pixels")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise UserError("--val-fraction must be between 0 and 1 (exclusive)")
    if cfg.lr <= 0:
        raise UserError("--lr must be positive")
    if not 0.0 <= cfg.ema < 1.0:
        raise UserError("--ema is a decay per step: give a value in [0, 1), e.g. 0.999 (0 is off)")
    if cfg.ema and cfg.cache_features:
        raise UserError("--ema averages the whole model, --cache-features trains the head alone; drop one")
    if not 0.0 <= cfg.momentum < 1.0:
        raise UserError("--momentum must be in [0, 1)")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise UserError("--label-smoothing must be in [0, 1)")
    for name in ("random_erasing", "mix_prob", "mix_switch_prob"):
        value = getattr(cfg, name)
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} is a probability: give a value in [0, 1]")
    if cfg.mixup < 0 or cfg.cutmix < 0:
        raise UserError("--mixup and --cutmix take a Beta alpha > 0 (or 0 for off)")
    _validate_transfer(cfg)


def parse_list(value: Any, kind: type, flag: str) -> list | None:
    """'1e-5,2e-5' or [1e-5, 2e-5] -> [1e-05, 2e-05]."""
    if value is None or isinstance(value, list) and all(isinstance(v, int | float) for v in value):
        return None if value is None else [kind(v) for v in value]
    try:
        return [kind(v) for v in str(value).split(",")]
    except ValueError:
        raise UserError(f"--{flag} takes comma-separated numbers, e.g. 2,4,6") from None


def _validate_transfer(cfg: TrainConfig) -> None:
    cfg.group_lrs = parse_list(cfg.group_lrs, float, "group-lrs")
    cfg.unfreeze_at = parse_list(cfg.unfreeze_at, int, "unfreeze-at")
    strategy = resolved_strategy(cfg)
    if strategy == "scratch" and cfg.pretrained:
        raise UserError("--strategy scratch trains from random weights; drop --pretrained or use "
                        "feature-extract, finetune or gradual")
    if strategy != "scratch" and not cfg.pretrained:
        raise UserError(f"--strategy {strategy} starts from pretrained weights: add --pretrained (the model's own) "
                        "or --pretrained path/to/weights.safetensors")

    def given(*names: str) -> list[str]:
        return [n for n in names if getattr(cfg, n) not in (None, False)]

    wrong = {
        "feature-extract": given("layer_decay", "group_lrs", "unfreeze_every", "unfreeze_at"),
        "finetune": given("cache_features", "unfreeze_every", "unfreeze_at"),
        "gradual": given("cache_features"),
        "scratch": given("cache_features", "layer_decay", "group_lrs", "unfreeze_every", "unfreeze_at"),
    }[strategy]
    if wrong:
        flags = ", ".join("--" + n.replace("_", "-") for n in wrong)
        raise UserError(f"{flags} do(es) not apply to --strategy {strategy}; drop it or change the strategy")
    if cfg.layer_decay is not None and cfg.group_lrs is not None:
        raise UserError("give either --layer-decay or --group-lrs, not both")
    if cfg.layer_decay is not None and not 0.0 < cfg.layer_decay <= 1.0:
        raise UserError("--layer-decay must be in (0, 1]: each group's rate is that fraction of the one above")
    if cfg.group_lrs is not None and any(lr <= 0 for lr in cfg.group_lrs):
        raise UserError("--group-lrs must all be positive")
    if cfg.unfreeze_every is not None and cfg.unfreeze_at is not None:
        raise UserError("give either --unfreeze-every or --unfreeze-at, not both")
    if cfg.unfreeze_every is not None and cfg.unfreeze_every < 1:
        raise UserError("--unfreeze-every must be a positive number of epochs")
    if cfg.unfreeze_at is not None and (sorted(cfg.unfreeze_at) != cfg.unfreeze_at or min(cfg.unfreeze_at) < 1):
        raise UserError("--unfreeze-at takes increasing epoch numbers >= 1, e.g. 2,4,6")
    if cfg.cache_features and (cfg.mixup or cfg.cutmix or cfg.random_erasing):
        raise UserError("--cache-features trains on fixed features; drop --mixup, --cutmix and --random-erasing")


def resolved_strategy(cfg: TrainConfig) -> str:
    if cfg.strategy == "auto":
        return "finetune" if cfg.pretrained else "scratch"
    return cfg.strategy


def load_config(path: str | Path) -> TrainConfig:
    """Read a run's resolved config.yaml back into a TrainConfig."""
    values = yaml.safe_load(Path(path).read_text())
    return TrainConfig(**values)
