"""Training configuration: one plain dataclass whose fields carry their own help, choices and bounds.

The schema is the dataclass: every field says what it means (`help`), what values it takes
(`choices`, `low`/`high`) and, through its annotation, its type. The CLI's flags are generated from
it and YAML recipes are coerced and checked by it, so a value is parsed and validated in one place
whichever way it arrives. This module imports no torch, so `imgcls --help` starts at once.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls.errors import UserError
from imgcls.options import DEVICES, decimal, integer

# Defined here (not in data/) so that building the CLI needs no torch.
AUGMENTATIONS = ("none", "basic", "standard", "randaugment", "trivialaugment", "autoaugment")
NORMALIZATIONS = {  # name -> (mean, std) of RGB in [0, 1]
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
}
STRATEGIES = ("auto", "scratch", "feature-extract", "finetune", "gradual")
RUN_PRECISIONS = ("fp32", "bf16", "fp16")
PRECISIONS = ("auto", *RUN_PRECISIONS)
# The kernel choices (imgcls.kernels): sdpa is scaled_dot_product_attention with torch's own backend choice,
# manual the attention written out; depthwise convolutions at the autocast precision or in float32.
ATTENTION_KERNELS = ("sdpa", "manual")
DEPTHWISE_PRECISIONS = ("autocast", "float32")
MEMORY_FORMATS = ("channels_last", "contiguous")
# The recipes that start with a random crop (and so have a --crop-padding), and the erasing each applies
# unless --random-erasing says otherwise.
CROP_RECIPES = ("basic", "randaugment", "trivialaugment", "autoaugment")
DEFAULT_ERASING = {"standard": 0.2}
LEGACY_ATTENTION = ("math", "flash", "efficient")  # pinned SDPA backends of older runs: now "sdpa"
SAMPLERS = ("uniform", "balanced", "sqrt")
MONITORS = {"val_acc": "max", "val_loss": "min", "balanced_acc": "max", "macro_f1": "max",
            "map": "max"}  # name -> better; map: multi-label runs' mean average precision
MAX_IMG_SIZE = 1024  # a 1024 px batch of 128 already needs ~1.6 GB as uint8; beyond that is a typo
BUILTIN_DATA = ("cifar10", "cifar10-mini")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


def opt(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
        high: float | None = None, open_low: bool = False, open_high: bool = False, const: Any = None,
        metavar: str | None = None, hint: str = ""):
    """A config field: its default and the schema the CLI and the recipe reader share.

    `low`/`high` bound numbers (inclusive unless `open_low`/`open_high`); `const` is the value a flag
    given without an argument takes (e.g. `--mixup` alone means 0.2); `hint` follows an out-of-bounds error."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "open_low": open_low,
            "open_high": open_high, "const": const, "metavar": metavar, "hint": hint}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    # data
    data: str = opt("cifar10-mini", "cifar10, cifar10-mini (bundled, the default), a path to an image folder, a "
                    "manifest (.csv/.jsonl) or WebDataset shards written by imgcls shard (their folder, or a brace "
                    "pattern of their tar files)")
    data_dir: str | None = opt(None, "for cifar10: the folder that holds cifar-10-batches-py/ (default "
                                     "$IMGCLS_DATA/cifar10, else ~/.cache/imgcls/cifar10)")
    img_size: int | None = opt(None, "input size in pixels (default: the model's native size, 32 for the CIFAR "
                                     "models; ViT position embeddings are interpolated for other sizes)",
                               low=8, high=MAX_IMG_SIZE)
    val_fraction: float = opt(0.1, "fraction of train held out for validation when the data has no val split; 0 "
                                   "trains on all of it, with no validation (best.pt is the final epoch)",
                              low=0.0, high=1.0, open_high=True)
    split_seed: int = opt(0, "seed of the train/val split, fixed apart from --seed so runs share one split",
                          low=0, high=MAX_SEED)
    data_mode: str = opt("auto", "auto (in memory when it fits in 4 GiB decoded), memory, or stream from disk",
                         choices=("auto", "memory", "stream"))
    workers: int = opt(2, "DataLoader workers when streaming", low=0, high=64)
    exclude: str | None = opt(None, "leave the images this file names out of train and val: the label-issues CSV "
                                    "of imgcls audit --labels, or one name per line (train/cat/x.jpg, train/4711)",
                              metavar="FILE")
    task: str = opt("auto", "multiclass (one label per image) or multilabel (any number: sigmoid outputs, binary "
                            "cross-entropy, mAP); auto: multilabel for a manifest that gives some image no label or "
                            "several", choices=("auto", "multiclass", "multilabel"))
    pos_weight: str = opt("none", "multilabel: weigh each class's positive images in the loss: none, or auto (its "
                                  "negatives / positives in train, capped at 100: rare labels count)",
                          choices=("none", "auto"))
    # model
    model: str = opt("resnet18_cifar", "a registered model (see imgcls models) or timm/<name>")
    # transfer learning
    pretrained: bool | str = opt(False, "start from pretrained weights: alone, the model's own (efficientnet_lite0-2 "
                                        "from their PyPI packages, timm/<name> and convnext_* from timm's hub, "
                                        "online); or a .safetensors/.pth file (the head is replaced when the class "
                                        "count differs); brings the weights' mean/std and crop",
                                 const=True, metavar="FILE")
    strategy: str = opt("auto", "auto (finetune with --pretrained, else scratch), scratch, feature-extract (frozen "
                                "backbone, BatchNorm statistics too; new head), finetune (all layers, per-group "
                                "rates) or gradual (feature-extract, then unfreeze groups from the top down)",
                        choices=STRATEGIES)
    head: str = opt("linear", "classifier head: linear, or mlp (Linear-256, ReLU, Dropout 0.3, Linear)",
                    choices=("linear", "mlp"))
    cache_features: bool = opt(False, "feature-extract only: run the frozen backbone once over the unaugmented "
                                      "images and train the head on those features; disables image augmentation")
    layer_decay: float | None = opt(None, "finetune/gradual: the head trains at --lr, each layer group below at D "
                                          "times the rate above", low=0.0, high=1.0, open_low=True, metavar="D")
    group_lrs: list[float] | None = opt(None, "finetune/gradual: one rate per layer group, bottom (stem) to top "
                                              "(head), comma-separated", open_low=True, low=0.0, metavar="LR,LR,...")
    unfreeze_every: int | None = opt(None, "gradual: unfreeze the next layer group down every K epochs (default 1)",
                                     low=1, metavar="K")
    unfreeze_at: list[int] | None = opt(None, "gradual: unfreeze the next layer group down after each of these "
                                              "epochs, e.g. 2,4,6", low=1, metavar="EPOCH,EPOCH,...")
    # optimisation
    epochs: int = opt(10, "number of epochs", low=1, high=100_000)
    batch_size: int = opt(128, "training batch size; under torchrun the global batch, split evenly across "
                               "processes", low=1, high=65_536)
    optimizer: str = opt("adamw", "adamw, or sgd with Nesterov momentum; give sgd its own --lr and --weight-decay, "
                                  "e.g. 0.1 and 5e-4", choices=("adamw", "sgd"))
    lr: float = opt(1e-3, "peak learning rate", low=0.0, open_low=True)
    momentum: float = opt(0.9, "SGD momentum", low=0.0, high=1.0, open_high=True)
    weight_decay: float = opt(0.05, "weight decay, not applied to biases, norms and embeddings; decoupled in AdamW",
                              low=0.0)
    warmup_epochs: float = opt(1.0, "linear warm-up length in epochs before cosine decay (at most half the run)",
                               low=0.0)
    ema: float = opt(0.0, "evaluate and save an exponential moving average of the weights with this decay per step, "
                          "e.g. 0.99: validation, best.pt, last.pt's weights and the summary use it (0, off)",
                     low=0.0, high=1.0, open_high=True, hint="it is a decay per step, e.g. 0.999 (0 is off)")
    whiten: bool = opt(False, "fastnet_* only: initialise the 2x2 stem as a whitening filter of the training "
                              "images' patches (airbench)")
    whiten_bias_epochs: int | None = opt(None, "with --whiten: keep the whitening filter fixed and train only its "
                                               "bias, for the first N epochs (airbench: 3); default: the stem trains "
                                               "like any layer", low=0, metavar="N")
    init: str = opt("default", "weight initialisation: default (the model's own) or dirac (every 3x3 convolution's "
                               "first in-channels filters start as the identity, airbench)",
                    choices=("default", "dirac"))
    lookahead: bool = opt(False, "airbench's lookahead: every 5 optimizer steps, pull the weights (and BatchNorm "
                                 "statistics) to an average of themselves whose decay rises as (progress)^3 to 0.77, "
                                 "and copy the average back; the final weights are the average")
    bn_bias_lr_scale: float = opt(1.0, "BatchNorm biases train at this multiple of the rate, with their weight "
                                       "decay divided by it, so they decay as much per step (airbench: 64)",
                                  low=0.0, open_low=True, metavar="S")
    freeze_bn_scale: bool = opt(False, "keep BatchNorm scales (weights) fixed at their initial 1 (airbench)")
    decay_all: bool = opt(False, "apply --weight-decay to every parameter, biases and norms included (airbench)")
    # loss, sampling and the metric that picks best.pt (imbalanced data)
    class_weights: str = opt("none", "per-class weights in the loss: none; auto (inverse class frequency, "
                                     "normalised so the average image weighs 1); effective:BETA (Cui et al.'s "
                                     "effective number of samples, e.g. effective:0.999); one positive weight per "
                                     "class, comma-separated; or a .json file mapping class names to weights",
                             metavar="none|auto|effective:B|W,W,..|FILE")
    sampler: str = opt("uniform", "how each epoch draws its images: uniform (a permutation), balanced (every class "
                                  "equally often, with replacement) or sqrt (classes by the square root of their size)",
                       choices=SAMPLERS)
    loss: str = opt("ce", "ce (cross-entropy) or focal (Lin et al.: down-weights easy images by (1-p)^gamma)",
                    choices=("ce", "focal"))
    focal_gamma: float = opt(2.0, "focal loss exponent gamma (0 is cross-entropy)", low=0.0, high=10.0)
    monitor: str = opt("auto", "validation metric that chooses best.pt and drives --patience and --schedule "
                               "plateau: val_acc, val_loss, balanced_acc or macro_f1; auto: balanced_acc when the "
                               "training classes are imbalanced (the largest 1.5x the smallest or more), else "
                               "val_acc. A tie is broken by the lower val loss (under torchrun give it in a "
                               "--recipe: torchrun takes --monitor for its own --monitor-interval)",
                       choices=("auto", *MONITORS))
    # training controls
    patience: int | None = opt(None, "early stopping: end the run after N epochs without an improvement of --monitor "
                                     "(off by default)", low=1, metavar="N")
    min_delta: float = opt(0.0, "smallest change of --monitor that counts as an improvement", low=0.0)
    schedule: str = opt("cosine", "learning-rate schedule after the warm-up: cosine (decays to 0 at --epochs, even "
                                  "when --patience stops earlier), linear (to --final-lr-factor at --epochs; "
                                  "airbench's) or plateau (ReduceLROnPlateau on --monitor)",
                        choices=("cosine", "linear", "plateau"))
    warmup_start_factor: float = opt(0.0, "the warm-up starts at this fraction of --lr (airbench: 0.2)", low=0.0,
                                     high=1.0, open_high=True, metavar="F")
    final_lr_factor: float = opt(0.0, "--schedule linear ends at this fraction of --lr (airbench: 0.07)", low=0.0,
                                 high=1.0, metavar="F")
    plateau_patience: int = opt(2, "--schedule plateau: epochs without improvement before the rate is cut", low=0)
    plateau_factor: float = opt(0.1, "--schedule plateau: the factor each cut multiplies the rate by", low=0.0,
                                high=1.0, open_low=True, open_high=True)
    accum_steps: int = opt(1, "gradient accumulation: one optimizer step every K micro-batches of --batch-size (the "
                              "effective batch is K x --batch-size)", low=1, high=1024, metavar="K")
    clip_grad: float | None = opt(None, "clip gradients: the global norm (--clip-mode norm), each value (value), or "
                                        "the ratio of gradient to weight norms (agc)", low=0.0, open_low=True,
                                  metavar="MAX")
    clip_mode: str = opt("norm", "how --clip-grad clips: norm, value or agc (timm's adaptive clipping)",
                         choices=("norm", "value", "agc"))
    tensorboard: bool = opt(False, "write TensorBoard event files into RUN/tb (needs the tensorboard package)")
    # augmentation and regularisation
    aug: str = opt("basic", "training augmentation: none; basic = random crop (padding size/8) + flip; standard = "
                            "RandomResizedCrop(0.8-1) + flip + ColorJitter + rotation 15 + erasing 0.2; randaugment "
                            "(2 ops, magnitude 9), trivialaugment, autoaugment, each after crop + flip",
                   choices=AUGMENTATIONS)
    crop_padding: int | None = opt(None, "random-crop padding in pixels for basic and the crop-based recipes "
                                         "(default: size/8, 4 at 32; airbench: 2; a run's config records none for "
                                         "recipes without a random crop)", low=0, metavar="PX")
    crop_fill: str = opt("zeros", "what the crop padding holds: zeros, or reflect (the image mirrored; airbench)",
                         choices=("zeros", "reflect"))
    alt_flip: bool = opt(False, "airbench's alternating flip instead of a random one: each image is flipped at "
                                "random once, then mirrored every other epoch, so it is seen both ways in turn")
    random_erasing: float | None = opt(None, "random erasing probability on top of any recipe (default: 0.2 for "
                                             "standard, else 0)", low=0.0, high=1.0, metavar="P")
    mixup: float = opt(0.0, "Mixup with Beta(ALPHA, ALPHA); the flag alone means 0.2 (0, off)", low=0.0,
                       const=0.2, metavar="ALPHA")
    cutmix: float = opt(0.0, "CutMix with Beta(ALPHA, ALPHA); the flag alone means 1.0 (0, off)", low=0.0,
                        const=1.0, metavar="ALPHA")
    mix_prob: float = opt(1.0, "probability that a batch is mixed at all", low=0.0, high=1.0, metavar="P")
    mix_switch_prob: float = opt(0.5, "with both Mixup and CutMix: probability a mixed batch uses CutMix",
                                 low=0.0, high=1.0, metavar="P")
    label_smoothing: float = opt(0.0, "label smoothing epsilon, applied once, also to mixed targets",
                                 low=0.0, high=1.0, open_high=True)
    normalize: str = opt("auto", "normalisation statistics: auto (CIFAR's for CIFAR, ImageNet's for folders, the "
                                 "weights' own with --pretrained), " + ", ".join(NORMALIZATIONS),
                         choices=("auto", *NORMALIZATIONS))
    # run
    seed: int = opt(0, "seed for initialisation, order and augmentation", low=0, high=MAX_SEED)
    out: str | None = opt(None, "run folder (default runs/<data>-<model>, numbered if taken); an existing run is "
                                "never overwritten")
    device: str = opt("auto", "auto, cpu or cuda", choices=DEVICES)
    precision: str = opt("auto", "training precision: auto (the precisions this device runs timed on the model's "
                                 "training step; a lower one only when at least 10% faster than fp32), fp32, bf16 "
                                 "or fp16 (CUDA, with loss scaling)", choices=PRECISIONS)
    eval_precision: str = opt("auto", "precision of inference (validation, eval, predict): auto (timed on the "
                                      "model's inference when --precision is auto too; else --precision's), fp32, "
                                      "bf16 or fp16; exports are always fp32", choices=PRECISIONS)
    compile: str = opt("off", "torch.compile the training forward pass: off, on (the flag alone), or auto (time "
                              "both on this machine and keep the faster; a warm-up of tens of seconds)",
                       choices=("off", "on", "auto"), const="on")
    attention: str = opt("auto", "training attention kernel for ViTs and timm models: auto (timed on this machine), "
                                 "sdpa (scaled_dot_product_attention, torch's own backend choice) or manual (matmul, "
                                 "softmax, matmul written out); a run's config records none for models without "
                                 "attention", choices=("auto", *ATTENTION_KERNELS, "none"))
    eval_attention: str = opt("auto", "inference attention kernel, as --attention (auto: timed for inference)",
                              choices=("auto", *ATTENTION_KERNELS, "none"))
    depthwise_precision: str = opt("auto", "training precision of depthwise convolutions (those that are plain "
                                           "nn.Conv2d: ConvNeXt's, EfficientNet's stride-1 ones) under bf16 or fp16: "
                                           "auto (timed), autocast (the run's precision) or float32; none where "
                                           "there is nothing to choose",
                                   choices=("auto", *DEPTHWISE_PRECISIONS, "none"))
    eval_depthwise_precision: str = opt("auto", "inference precision of depthwise convolutions, as "
                                                "--depthwise-precision (auto: timed for inference)",
                                        choices=("auto", *DEPTHWISE_PRECISIONS, "none"))
    memory_format: str = opt("auto", "tensor layout for images: auto (timed), channels_last or contiguous",
                             choices=("auto", *MEMORY_FORMATS))
    prefetch: str = opt("auto", "prepare the next batch while the current one computes: auto (on for CUDA, off on "
                                "the CPU, where a thread measured no faster), on or off", choices=("auto", "on", "off"))
    sync_bn: bool = opt(False, "under torchrun on GPUs: BatchNorm statistics over the global batch (torch's "
                               "SyncBatchNorm)")
    eval_batch_size: int | None = opt(None, "images per inference pass (validation, eval, predict; TTA views "
                                            "count): default, the fastest batch size timed on this machine "
                                            "(imgcls.kernels.measure: 32 to 512, at most 2M pixels a batch)",
                                      low=1, high=65_536)
    quiet: bool = opt(False, "no progress bar or per-epoch lines, only the final summary")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
TYPES = typing.get_type_hints(TrainConfig)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------- coercion: one path for flags and YAML


def _number(name: str, value: Any, kind: type) -> int | float:
    """int or float from a number or a string ('1e-3'); bools and non-finite values are refused."""
    what = "an integer" if kind is int else "a number"
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError
        if kind is int:  # 1e3 is refused as a flag, so it is in a recipe too
            number = integer(value) if isinstance(value, str) else value
            if not isinstance(number, int):
                raise ValueError
        else:
            number = decimal(value) if isinstance(value, str) else float(value)
            if not math.isfinite(number):
                raise ValueError
        return number
    except (TypeError, ValueError):
        raise UserError(f"{flag(name)} takes {what}, not {value!r}; e.g. {flag(name)} "
                        f"{FIELDS[name].default if FIELDS[name].default is not None else 1}") from None


def _number_list(name: str, value: Any, kind: type) -> list:
    items = value if isinstance(value, list) else str(value).split(",")
    if not items or any(isinstance(v, str) and not v.strip() for v in items):
        raise UserError(f"{flag(name)} takes comma-separated numbers, e.g. 2,4,6 (got {value!r})")
    return [_number(name, v.strip() if isinstance(v, str) else v, kind) for v in items]


def _boolean(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "on", "1"):
        return True
    if text in ("false", "no", "off", "0"):
        return False
    raise UserError(f"{flag(name)} is on or off: give true or false (got {value!r})")


def coerce(name: str, value: Any) -> Any:
    """`value` (from a flag, a YAML recipe or Python) as the type field `name` declares."""
    if name not in FIELDS:
        raise UserError(f"unknown option {name!r}; valid options are {', '.join(sorted(FIELDS))}")
    kind = TYPES[name]
    args = set(typing.get_args(kind))
    if value is None:
        if type(None) in args:
            return None
        raise UserError(f"{flag(name)} needs a value (it has no 'none'); leave it out for the default")
    if name == "pretrained":  # True (the model's own weights), False, or a file path
        return value if isinstance(value, bool) else str(value)
    if name == "compile" and isinstance(value, bool):  # runs and recipes written when it was a switch
        return "on" if value else "off"
    if name in ("attention", "eval_attention") and value in LEGACY_ATTENTION:
        return "sdpa"  # older runs pinned an SDPA backend; torch now dispatches (same numbers to rounding)
    if kind is bool:
        return _boolean(name, value)
    base = next((a for a in args if a is not type(None)), kind) if args else kind
    if typing.get_origin(base) is list:
        return _number_list(name, value, typing.get_args(base)[0])
    if base in (int, float):
        return _number(name, value, base)
    if isinstance(value, list | dict | bool):
        raise UserError(f"{flag(name)} takes a single value, not {value!r}")
    return str(value)


FLOAT32_MAX, FLOAT32_TINY = 3.4028234663852886e38, 1.401298464324817e-45  # largest, smallest positive (subnormal)


def check_float32(name: str, v: float, zero_allowed: bool = True) -> None:
    """A float option is used in float32 (the optimizer's rates, the loss's factors): refused when it would
    become infinite there, or 0 when it is not 0."""
    if abs(v) > FLOAT32_MAX:
        raise UserError(f"{flag(name)} {v:g} is beyond float32's range (about 3.4e38), the precision it is used in; "
                        "give a smaller value")
    if v != 0 and abs(v) < FLOAT32_TINY / 2:
        raise UserError(f"{flag(name)} {v:g} is 0 in float32, the precision it is used in; give "
                        + ("0 or " if zero_allowed else "") + "a value above 1e-45")


def _check_bounds(name: str, value: Any) -> None:
    meta = FIELDS[name].metadata
    if meta["choices"] and value not in meta["choices"]:
        raise UserError(f"{flag(name)} must be one of {', '.join(meta['choices'])} (got {value!r})")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        low, high = meta["low"], meta["high"]
        used = v
        if isinstance(v, float):
            check_float32(name, v, zero_allowed=low is None or low < 0 or (low == 0 and not meta["open_low"]))
            used = struct.unpack("f", struct.pack("f", v))[0]  # the value training computes with
        if not any(_outside(x, low, high, meta) for x in (v, used)):
            continue
        lo = "" if low is None else f"{'>' if meta['open_low'] else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if meta['open_high'] else '<='} {high:g}"
        hint = f"; {meta['hint']}" if meta["hint"] else ""
        got = f"{v!r:.30}" + (f", which is {used!r} in float32, the precision it is used in" if
                              not _outside(v, low, high, meta) else "")
        raise UserError(f"{flag(name)} must be {' and '.join(p for p in (lo, hi) if p)} (got {got}){hint}")


def _outside(v: float, low, high, meta: dict) -> bool:
    too_low = low is not None and (v <= low if meta["open_low"] else v < low)
    too_high = high is not None and (v >= high if meta["open_high"] else v > high)
    return too_low or too_high


# ---------------------------------------------------------------- building and checking a config


def underscored(raw: dict, where: str) -> dict[str, Any]:
    """Options of a file by their field names (label-smoothing is label_smoothing); one given under both
    spellings is refused in one line, as YAML's own repeated keys are."""
    options: dict[str, Any] = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name in options:
            raise UserError(f"{where} gives {name} twice (as - and _); keep one")
        options[name] = value
    return options


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe: a mapping of TrainConfig fields (dashes or underscores), coerced by the schema."""
    from imgcls.yamlio import load_yaml_mapping

    values = underscored(load_yaml_mapping(path, "recipe"), f"recipe {path}")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"recipe {path}: unknown option(s) {', '.join(unknown)}; "
                        f"valid options are {', '.join(sorted(FIELDS))}")
    try:
        coerced = {k: coerce(k, v) for k, v in values.items()}
        for k, v in coerced.items():
            _check_bounds(k, v)
    except UserError as e:
        raise UserError(f"recipe {path}: {e}") from None
    return coerced


def build_config(recipe: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the recipe, then explicit overrides (None means 'not given'); checked as a whole."""
    values: dict[str, Any] = {}
    if recipe is not None:
        values.update(read_recipe(recipe))
    values.update({k: coerce(k, v) for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Every field within its schema, then the rules that tie fields together."""
    for name in FIELDS:
        _check_bounds(name, getattr(cfg, name))
    parse_class_weights(cfg.class_weights)
    if cfg.clip_mode != "norm" and cfg.clip_grad is None:
        raise UserError(f"--clip-mode {cfg.clip_mode} says how to clip; add --clip-grad MAX to clip at all")
    if cfg.ema and cfg.cache_features:
        raise UserError("--ema averages the whole model, --cache-features trains the head alone; drop one")
    if cfg.val_fraction == 0 and cfg.data in BUILTIN_DATA:  # folders with a val/ of their own keep it
        require_no_validation(cfg)
    _validate_transfer(cfg)
    _validate_fast_recipe(cfg)
    _validate_derived_rates(cfg)


def _validate_derived_rates(cfg: TrainConfig) -> None:
    """The rates and decays the optimizer computes from several options, checked in float32 as it uses them:
    --bn-bias-lr-scale 1e-40 with --decay-all made the BatchNorm biases' decay 5e38, inf, and the run diverged
    with advice to lower --lr."""
    scale = cfg.bn_bias_lr_scale
    derived = {"--lr x --bn-bias-lr-scale": cfg.lr * scale}
    if cfg.decay_all:
        derived["--weight-decay / --bn-bias-lr-scale"] = cfg.weight_decay / scale
    for what, value in derived.items():
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX or (value != 0 and abs(value) < FLOAT32_TINY / 2):
            raise UserError(f"{what} is {value:g}, outside float32's range, the precision the optimizer uses; "
                            "bring --bn-bias-lr-scale nearer 1 (airbench: 64)")


def _validate_fast_recipe(cfg: TrainConfig) -> None:
    """Rules for the pieces ported from airbench94 (each an option of its own)."""
    if cfg.init == "dirac" and cfg.pretrained:
        raise UserError("--init dirac initialises new weights; --pretrained loads them: drop one")
    if cfg.whiten_bias_epochs is not None and not cfg.whiten:
        raise UserError("--whiten-bias-epochs says how long the whitening stem's bias trains; add --whiten")
    if cfg.final_lr_factor and cfg.schedule != "linear":
        raise UserError(f"--final-lr-factor is where --schedule linear ends; --schedule {cfg.schedule} ignores it, "
                        "drop it or add --schedule linear")
    if cfg.lookahead and cfg.ema:
        raise UserError("--lookahead and --ema both average the weights; choose one")
    if cfg.alt_flip and cfg.aug == "none":
        raise UserError("--alt-flip replaces the recipe's random flip; --aug none has none: choose --aug basic")
    if cfg.crop_padding is not None and cfg.aug in ("none", "standard"):
        raise UserError(f"--crop-padding sets the random crop of basic and the crop-based recipes; --aug {cfg.aug} "
                        "has none: drop it or choose --aug basic")


MULTICLASS_ONLY = (("loss", "ce", "--loss focal"), ("class_weights", "none", "--class-weights"),
                   ("sampler", "uniform", "--sampler"))


def check_task(cfg: TrainConfig, task: str) -> None:
    """Refuse the options that only one task has, once the data has said which task it is."""
    if task == "multilabel":
        given = [what for name, default, what in MULTICLASS_ONLY if getattr(cfg, name) != default]
        if given:
            raise UserError(f"{given[0]} weighs or draws images by their one class; a multi-label run has several: "
                            "use --pos-weight auto for rare labels")
        if cfg.monitor in ("val_acc", "balanced_acc"):
            raise UserError(f"--monitor {cfg.monitor} is for one label per image; a multi-label run monitors map "
                            "(the default), macro_f1 or val_loss")
    elif cfg.pos_weight != "none":
        raise UserError("--pos-weight weighs each label's positives in a multi-label run; this data gives one label "
                        "per image: drop it (--class-weights auto weighs rare classes)")
    if task == "multiclass" and cfg.monitor == "map":
        raise UserError("--monitor map is for multi-label runs; use val_acc, balanced_acc, macro_f1 or val_loss")


def require_no_validation(cfg: TrainConfig) -> None:
    """Refuse the options that need a validation split, for a run that has none (--val-fraction 0)."""
    needs = [f for f, on in (("--patience", cfg.patience is not None),
                             ("--schedule plateau", cfg.schedule == "plateau"),
                             (f"--monitor {cfg.monitor}", cfg.monitor not in ("auto", "val_acc"))) if on]
    if needs:
        drop = " and ".join(f.split()[0] for f in needs)
        raise UserError(f"{' and '.join(needs)} need{'s' if len(needs) == 1 else ''} a validation split; "
                        f"--val-fraction 0 leaves none: give --val-fraction 0.1 or drop {drop}")


def _validate_transfer(cfg: TrainConfig) -> None:
    strategy = resolved_strategy(cfg)
    if strategy == "scratch" and cfg.pretrained:
        raise UserError("--strategy scratch trains from random weights; drop --pretrained or use "
                        "feature-extract, finetune or gradual")
    if strategy != "scratch" and not cfg.pretrained:
        raise UserError(f"--strategy {strategy} starts from pretrained weights: add --pretrained (the model's own) "
                        "or --pretrained path/to/weights.safetensors")
    wrong = [n for n in _NOT_FOR[strategy] if getattr(cfg, n) not in (None, False)]
    if wrong:
        raise UserError(f"{', '.join(map(flag, wrong))} do(es) not apply to --strategy {strategy}; drop it or "
                        "change the strategy")
    if cfg.layer_decay is not None and cfg.group_lrs is not None:
        raise UserError("give either --layer-decay or --group-lrs, not both")
    if cfg.unfreeze_every is not None and cfg.unfreeze_at is not None:
        raise UserError("give either --unfreeze-every or --unfreeze-at, not both")
    if cfg.unfreeze_at is not None and sorted(set(cfg.unfreeze_at)) != cfg.unfreeze_at:
        raise UserError("--unfreeze-at takes increasing epoch numbers >= 1, e.g. 2,4,6")
    if cfg.cache_features and (cfg.mixup or cfg.cutmix or cfg.random_erasing):
        raise UserError("--cache-features trains on fixed features; drop --mixup, --cutmix and --random-erasing")


_NOT_FOR = {  # options that mean nothing under a strategy
    "feature-extract": ("layer_decay", "group_lrs", "unfreeze_every", "unfreeze_at"),
    "finetune": ("cache_features", "unfreeze_every", "unfreeze_at"),
    "gradual": ("cache_features",),
    "scratch": ("cache_features", "layer_decay", "group_lrs", "unfreeze_every", "unfreeze_at"),
}


def _absolute_if_file(class_weights: str) -> str:
    """--class-weights with a file made absolute, so that a resume from another folder still finds it."""
    parsed = parse_class_weights(class_weights)
    return str(parsed.expanduser().resolve()) if isinstance(parsed, Path) else class_weights


def parse_class_weights(value: str) -> str | float | list[float] | Path:
    """'none', 'auto', the beta of 'effective:BETA', a list of weights, or the path of a .json file."""
    if value in ("none", "auto"):
        return value
    if value.startswith("effective:"):
        beta = _number("class_weights", value.split(":", 1)[1], float)
        if not 0.0 < beta < 1.0:
            raise UserError(f"--class-weights effective:BETA takes a beta in (0, 1), e.g. effective:0.999 (got {beta})")
        return beta
    if value.endswith(".json"):
        return Path(value).expanduser()
    weights = _number_list("class_weights", value, float)
    if not all(w > 0 for w in weights):
        raise UserError(f"--class-weights takes positive weights (got {value}): a weight of 0 means a class is never "
                        "learned; to drop a class, remove its images")
    if any(w < FLOAT32_TINY / 2 for w in weights):
        raise UserError(f"--class-weights {value}: a weight is 0 in float32, the precision the loss computes in "
                        "(below about 1e-45); scale the weights up (only their ratios matter)")
    if any(w > FLOAT32_MAX for w in weights):
        raise UserError(f"--class-weights {value}: a weight is beyond float32's range (about 3.4e38), the precision "
                        "the loss computes in; scale the weights down (only their ratios matter)")
    return weights


def resolved_strategy(cfg: TrainConfig) -> str:
    if cfg.strategy == "auto":
        return "finetune" if cfg.pretrained else "scratch"
    return cfg.strategy


def data_location(data: str) -> str:
    """A built-in dataset's name, or a folder's absolute path (so a run never depends on the cwd)."""
    return data if data in BUILTIN_DATA else str(Path(data).expanduser().resolve())


@dataclass(frozen=True)
class Facts:
    """What the plan needs that the config cannot know: found on the machine, in the data and by timing."""

    device: str  # cpu | cuda
    precision: str  # training's: fp32 | bf16 | fp16
    eval_precision: str
    img_size: int
    normalization: str  # a key of NORMALIZATIONS
    data_mode: str  # memory | stream
    prefetch: str  # on | off
    monitor: str  # a key of MONITORS
    kernels: dict[str, Any]  # attention, eval_attention, depthwise_precision, eval_depthwise_precision,
    #                          memory_format, compile, eval_batch_size: the kernel choice (imgcls.kernels)
    task: str = "multiclass"  # the data's: multiclass | multilabel


KERNEL_FIELDS = ("attention", "eval_attention", "depthwise_precision", "eval_depthwise_precision", "memory_format",
                 "compile", "eval_batch_size")


def check_crop_padding(padding: int | None, img_size: int) -> None:
    """A random crop's padding narrower than the image (else the crop would be padding alone, or, reflected,
    impossible): what train and augment-preview both check once the image size is known."""
    if (padding or 0) >= img_size:
        raise UserError(f"--crop-padding {padding} needs a border narrower than the {img_size}px image; give at most "
                        f"{img_size - 1} (by default {default_crop_padding(img_size)})")


def default_crop_padding(img_size: int) -> int:
    return max(1, img_size // 8)  # 4 pixels at 32x32, the classic CIFAR recipe


def erasing_probability(aug: str, random_erasing: float | None) -> float:
    """--random-erasing, or the recipe's own (0.2 for standard, else 0)."""
    return DEFAULT_ERASING.get(aug, 0.0) if random_erasing is None else random_erasing


def resolve(cfg: TrainConfig, facts: Facts) -> TrainConfig:
    """The run plan: `cfg` with every 'auto' and every default that depends on the data, the machine or
    a measurement replaced by its value, and paths made absolute. What is None afterwards does not apply
    (a recipe without a random crop has no crop padding). A new object; `cfg` is left as it was.
    Resolving a resolved config changes nothing, so a resumed run runs the plan it recorded."""
    strategy = resolved_strategy(cfg)
    aug = "none" if cfg.cache_features else cfg.aug  # the features are computed once, from unaugmented images
    padding = cfg.crop_padding if cfg.crop_padding is not None else default_crop_padding(facts.img_size)
    gradual_every = (cfg.unfreeze_every or 1) if strategy == "gradual" and cfg.unfreeze_at is None else None
    return cfg.replace(
        data=data_location(cfg.data),
        data_dir=str(Path(cfg.data_dir).expanduser().resolve()) if cfg.data_dir else None,
        exclude=str(Path(cfg.exclude).expanduser().resolve()) if cfg.exclude else None,
        class_weights=_absolute_if_file(cfg.class_weights),
        out=str(Path(cfg.out).resolve()) if cfg.out else None,
        img_size=facts.img_size, normalize=facts.normalization, strategy=strategy, aug=aug,
        crop_padding=padding if aug in CROP_RECIPES else None,
        random_erasing=erasing_probability(aug, cfg.random_erasing),
        unfreeze_every=gradual_every,
        device=facts.device, precision=facts.precision, eval_precision=facts.eval_precision,
        data_mode=facts.data_mode, prefetch=facts.prefetch, monitor=facts.monitor, task=facts.task,
        **{k: facts.kernels[k] for k in KERNEL_FIELDS},
    )


# The fields whose "auto" (or None) the plan decides; for the others "auto" is a value (--class-weights auto).
RESOLVED_FIELDS = ("img_size", "normalize", "strategy", "device", "precision", "eval_precision", "data_mode",
                   "prefetch", "monitor", "task", *KERNEL_FIELDS)


def unresolved(cfg: TrainConfig) -> list[str]:
    """The fields of a plan still left to decide: empty for a resolved config."""
    return [name for name in RESOLVED_FIELDS if getattr(cfg, name) in ("auto", None)]


# What may differ between the config a run was trained with and the one it is read with: where it and its data
# are now, and the machine (a run may be resumed or evaluated elsewhere).
PLACE_FIELDS = ("out", "quiet", "data", "data_dir", "device", "workers")


def config_record(cfg: TrainConfig) -> dict:
    """The options a checkpoint records: what its weights were trained with (see `config_change`)."""
    return {k: v for k, v in cfg.to_dict().items() if k not in PLACE_FIELDS}


def config_change(recorded: dict | None, cfg: TrainConfig) -> str | None:
    """'lr 0.5 against 0.001' when `cfg` (a run's config.yaml) is not what a checkpoint was trained with (None:
    the same, or a checkpoint of an older run that did not say): an edit would be reported as the run's recipe,
    or train the rest of a resumed run with other options than its start."""
    if not isinstance(recorded, dict):
        return None
    now = config_record(cfg)
    changed = next((k for k in sorted(set(now) | set(recorded)) if now.get(k) != recorded.get(k)), None)
    return None if changed is None else f"{changed} {now.get(changed)!r} against {recorded.get(changed)!r}"


def load_config(path: str | Path) -> TrainConfig:
    """Read a run's resolved config.yaml back into a TrainConfig (checked like any recipe)."""
    from imgcls.yamlio import load_yaml_mapping

    values = load_yaml_mapping(path, "run config")
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise UserError(f"{path} has option(s) {', '.join(unknown)} that this imgcls does not know; "
                        "use the imgcls version that wrote the run")
    try:
        return TrainConfig(**{k: coerce(k, v) for k, v in values.items()})
    except UserError as e:
        raise UserError(f"{path}: {e}; the run's config was edited or damaged") from None
