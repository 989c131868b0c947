"""The options of every command but train, and the constants they default to, each declared once.

train's flags (and lr-find's, and augment-preview's subset) are the TrainConfig schema (config.py). The
other commands share flags such as --checkpoint and --device: they are declared here, once, and each
command's parser lists which it takes (cli.py). Like config.py this imports no torch, so `imgcls --help`
answers at once; the library modules import their defaults from here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ONNX_OPSET = 18  # torch's dynamo exporter writes opset 18 and up
ONNX_OPSET_MIN = 18
EXPORT_FORMATS = ("onnx", "safetensors", "all")
NEAR_DUPLICATE_BITS = 4  # audit: dHash bits of 64 that may differ for a near-duplicate pair
DEVICES = ("auto", "cpu", "cuda")
CAM_METHODS = ("gradcam", "gradcam++")
DEFAULT_TARGET_ACCURACY = 0.95  # --reject auto: the accuracy accepted images keep on validation
DEFAULT_CONFIDENCE = 0.9  # --reject auto: how sure that accuracy is, given the number of validation images
EXPORT_BATCH = 64  # images per call for exported files, which carry no measured batch size


# Numbers as a person writes them in decimal: Python's int() and float() also read '1_000', '0.5_0', ' 5 ' and
# full-width digits, which no option means; every numeric flag and recipe value goes through these.
_INTEGER = re.compile(r"[-+]?[0-9]+")
_DECIMAL = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def integer(text: str) -> int:
    """A whole number in ASCII decimal digits; ValueError otherwise (argparse's type=, the recipe reader)."""
    if not isinstance(text, str) or not _INTEGER.fullmatch(text):
        raise ValueError(f"not a decimal integer: {text!r}")
    return int(text)


def decimal(text: str) -> float:
    """A number written in ASCII decimal (1, 0.5, 1e-3); ValueError otherwise."""
    if not isinstance(text, str) or not _DECIMAL.fullmatch(text):
        raise ValueError(f"not a decimal number: {text!r}")
    return float(text)


@dataclass(frozen=True)
class Option:
    flag: str
    help: str
    kwargs: dict = field(default_factory=dict)  # argparse's: default, choices, type, action, metavar, ...


OPTIONS = {o.flag: o for o in (
    Option("--checkpoint", "best (chosen on val), last, or a checkpoint file (best)", {"default": "best"}),
    Option("--device", "auto, cpu or cuda (auto: a GPU when one is visible)", {"default": "auto", "choices": DEVICES}),
    Option("--allow-data-change", "use the run's data even though it changed since training (by default refused)",
           {"action": "store_true"}),
    Option("--tta", "test-time augmentation: flip (2 views), flip-crop (flip and two shifted crops, 6 views) or N "
                    "random views of the training recipe; probabilities are averaged (none)",
           {"default": "none", "metavar": "MODE"}),
    Option("--quiet", "no progress bar", {"action": "store_true"}),
    Option("--data-dir", "as in train, for --data cifar10"),
    Option("--topk", "classes to show per image (3)", {"type": integer, "default": 3}),
    Option("--json", "print JSON instead of text", {"action": "store_true"}),
    Option("--list", "a text file of image paths, one per line; blank lines and lines starting with # are skipped "
                     "(a missing file is an error row)",
           {"metavar": "FILE"}),
    Option("--reject", "label 'unknown' when the top-1 probability is under P, or under the threshold chosen on "
                       "val (auto; needs imgcls calibrate); off accepts everything", {"metavar": "auto|P|off"}),
    Option("--target-accuracy", f"--reject auto: accuracy the accepted images keep, shown on val with "
                                f"{DEFAULT_CONFIDENCE:.0%} confidence ({DEFAULT_TARGET_ACCURACY})",
           {"type": decimal}),
    Option("--coverage", "--reject auto: share of val images to accept instead", {"type": decimal}),
    Option("--batch-size", f"images per forward pass (default: the run's measured inference batch, {EXPORT_BATCH} "
                           "for exports)", {"type": integer}),
    Option("--workers", "DataLoader workers decoding images (2)", {"type": integer, "default": 2}),
    Option("--format", f"export format: {', '.join(EXPORT_FORMATS)} (all)", {"default": "all",
                                                                            "choices": EXPORT_FORMATS}),
    Option("--opset", f"ONNX opset ({ONNX_OPSET})", {"type": integer, "default": ONNX_OPSET}),
    Option("--quantize", "also write model.int8.onnx: onnxruntime's static int8 quantization, its ranges from "
                         "validation images; refused unless it agrees with fp32 on 99% of validation and loses at "
                         "most 1 point of accuracy", {"choices": ("int8",)}),
    Option("--class", "class to explain (default: the predicted)", {"dest": "class_name", "metavar": "NAME"}),
    Option("--method", f"CAM method: {', '.join(CAM_METHODS)} (gradcam)", {"default": "gradcam",
                                                                         "choices": CAM_METHODS}),
    Option("--max-distance", f"near-duplicates: dHash bits of 64 that may differ ({NEAR_DUPLICATE_BITS})",
           {"type": integer, "default": NEAR_DUPLICATE_BITS}),
    Option("--html", "also write an HTML page with thumbnails beside --out", {"action": "store_true"}),
)}


def add_options(parser, *flags: str, **overrides: dict) -> None:
    """Add the declared options `flags` to an argparse parser. `overrides` (by dest name) change a
    declaration's help or default where one command means something narrower, e.g. report's --tta."""
    for name in flags:
        option = OPTIONS[name]
        kwargs = {"help": option.help, **option.kwargs, **overrides.get(name.lstrip("-").replace("-", "_"), {})}
        kwargs["help"] = kwargs["help"].replace("%", "%%")  # argparse formats help texts with %
        parser.add_argument(option.flag, **kwargs)
