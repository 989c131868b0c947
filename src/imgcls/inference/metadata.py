"""What an export says about itself: one schema for model.json and for the ONNX file's metadata, written
and read only here, and checked on every read before an image is touched.

Both files carry the same JSON document (model.json is that document; the ONNX file holds it under
`imgcls.export`, beside flat convenience keys for readers without imgcls). An export is input like any
other: every field is checked against the bounds the flags have, and against the graph or the weights it
describes, with one line that names the file and the field.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from imgcls.config import AUGMENTATIONS, FIELDS, MAX_IMG_SIZE
from imgcls.data.folder import class_names_problem
from imgcls.data.preprocessing import INPUT_LAYOUT, RESIZE_RULE, Preprocessing
from imgcls.data.presets import PixelRecipe
from imgcls.errors import UserError, first_line
from imgcls.inference.reject import curve_problem
from imgcls.inference.scaling import Scaling, parse_scaling
from imgcls.rundir import strict_json

# Pixel statistics of images scaled to [0, 1] lie in these ranges (a std is at most 0.5 there); outside them the
# float32 normalisation overflows or flushes to zero (std 1e-50, mean 1e39), so the numbers cannot be real.
STAT_RANGES = {"mean": (0.0, 1.0), "std": (1e-3, 1.0)}
MIN_CROP_PCT = 0.25  # the centre crop of any model's eval transform keeps far more; 1e-300 would resize to infinity

FORMAT = "imgcls-export-2"
OLDER_FORMATS = ("imgcls-export-1",)  # model.json without recipe or weights digest; read with defaults
ONNX_KEY = "imgcls.export"
MIN_IMG_SIZE = FIELDS["img_size"].metadata["low"]


@dataclass(frozen=True)
class ExportSpec:
    model: str
    head: str
    classes: list[str]
    preprocessing: Preprocessing
    recipe: PixelRecipe
    scaling: Scaling | None
    fingerprint: dict  # the training data's, as dataset.json holds it
    weights: str  # sha256 of the checkpoint exported
    reject_rule: dict | None = None  # --reject auto's threshold at the default target, when it was reachable
    risk_coverage: dict | None = None
    versions: dict | None = None  # of imgcls, torch and timm that wrote it
    thresholds: list[float] | None = None  # a multi-label model's per-class thresholds (tuned on val); else None

    @property
    def multilabel(self) -> bool:
        return self.thresholds is not None

    @property
    def identity(self) -> dict:
        return {"model": self.model, "data": self.fingerprint.get("content_sha256"), "weights": self.weights[:16]}

    def to_dict(self) -> dict:
        return {"format": FORMAT, "model": self.model, "head": self.head, "classes": self.classes,
                "preprocessing": self.preprocessing.as_dict(), "recipe": self.recipe.as_dict(),
                "scaling": self.scaling.as_dict() if self.scaling is not None else None,
                "fingerprint": self.fingerprint, "weights": self.weights, "reject_rule": self.reject_rule,
                "risk_coverage": self.risk_coverage, "versions": self.versions,
                "task": "multilabel" if self.multilabel else "multiclass", "thresholds": self.thresholds}

    def onnx_properties(self) -> dict[str, str]:
        """metadata_props (strings only): the document, and flat keys for readers without imgcls."""
        prep = self.preprocessing
        return {ONNX_KEY: json.dumps(self.to_dict()), "imgcls.classes": json.dumps(self.classes),
                "imgcls.img_size": str(prep.img_size), "imgcls.crop_pct": str(prep.crop_pct),
                "imgcls.resize": RESIZE_RULE, "imgcls.input": INPUT_LAYOUT,
                "imgcls.mean": json.dumps(list(prep.mean)), "imgcls.std": json.dumps(list(prep.std)),
                "imgcls.model": self.model, "imgcls.task": "multilabel" if self.multilabel else "multiclass",
                **({"imgcls.thresholds": json.dumps(self.thresholds)} if self.multilabel else {})}


EXPORT_FIX = "the export is damaged or edited: export the run again"


class _Reader:
    """Field checks that name the file and the field in their one line, with the file's own remedy."""

    def __init__(self, where: str, fix: str = EXPORT_FIX):
        self.where, self.fix = where, fix

    def fail(self, field: str, problem: str):
        raise UserError(f"{self.where}: {field} {problem}; {self.fix}")

    def number(self, field: str, v, low: float | None = None, high: float | None = None, open_low=False) -> float:
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            self.fail(field, f"is {v!r}, not a finite number")
        if (low is not None and (v <= low if open_low else v < low)) or (high is not None and v > high):
            self.fail(field, f"is {v!r}, outside {'(' if open_low else '['}{low}, {high}]")
        return float(v)

    def text(self, field: str, v, choices=None) -> str:
        if not isinstance(v, str) or not v or (choices is not None and v not in choices):
            self.fail(field, f"is {v!r}, not " + (f"one of {', '.join(choices)}" if choices else "a name"))
        return v

    def mapping(self, field: str, v) -> dict:
        if not isinstance(v, dict):
            self.fail(field, f"is {type(v).__name__}, not a mapping")
        return v


def _preprocessing(r: _Reader, d, prefix: str = "preprocessing.") -> Preprocessing:
    d = r.mapping(prefix.rstrip(".") or "the document", d)
    size = d.get("img_size")
    if not isinstance(size, int) or isinstance(size, bool) or not MIN_IMG_SIZE <= size <= MAX_IMG_SIZE:
        r.fail(f"{prefix}img_size",
               f"is {size!r:.40}, not a whole number of pixels from {MIN_IMG_SIZE} to {MAX_IMG_SIZE}")
    stats = {}
    for key, (low, high) in STAT_RANGES.items():
        v = d.get(key)
        if not (isinstance(v, list) and len(v) == 3 and all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and low <= x <= high
                for x in v)):
            r.fail(f"{prefix}{key}", f"is {v!r}, not three numbers (R, G, B) from {low} to {high}")
        stats[key] = tuple(float(x) for x in v)
    crop = r.number(f"{prefix}crop_pct", d.get("crop_pct", 1.0), MIN_CROP_PCT, 1.0)
    if d.get("resize", RESIZE_RULE) != RESIZE_RULE or d.get("input", INPUT_LAYOUT) != INPUT_LAYOUT:
        r.fail(f"{prefix}resize/input", "names a resize rule or input layout this imgcls does not know")
    return Preprocessing(size, stats["mean"], stats["std"], crop)


def read_run_data(info, where: str, fix: str) -> Preprocessing:
    """A run's dataset.json (classes, img_size, mean, std, crop_pct, fingerprint) checked with the export's own
    field checks; its preprocessing."""
    r = _Reader(where, fix)
    info = r.mapping("the document", info)
    _classes(r, info.get("classes"))
    if not isinstance(info.get("fingerprint"), dict) or not isinstance(info["fingerprint"].get("sizes"), dict):
        r.fail("fingerprint", "is not a mapping that holds the split sizes ('sizes')")
    return _preprocessing(r, info, prefix="")


def _recipe(r: _Reader, d, aug: str | None, img_size: int) -> PixelRecipe:
    if d is None:  # an older export kept the recipe's name alone
        return PixelRecipe(r.text("aug", aug or "basic", AUGMENTATIONS))
    d = r.mapping("recipe", d)
    padding = d.get("crop_padding")
    if padding is not None and (not isinstance(padding, int) or isinstance(padding, bool)
                                or not 0 <= padding < img_size):  # a border as wide as the image leaves no pixel
        r.fail("recipe.crop_padding", f"is {padding!r:.40}, not a number of pixels from 0 to {img_size - 1} or null")
    return PixelRecipe(r.text("recipe.aug", d.get("aug"), AUGMENTATIONS), padding,
                       r.text("recipe.crop_fill", d.get("crop_fill", "zeros"), ("zeros", "reflect")))


def _curve(r: _Reader, d) -> dict | None:
    problem = None if d is None else curve_problem(d)
    if problem:
        r.fail("risk_coverage", problem)
    return d


def _classes(r: _Reader, v) -> list[str]:
    if not isinstance(v, list) or len(v) < 2 or not all(isinstance(c, str) and c for c in v):
        r.fail("classes", f"is {v!r:.80}, not a list of two or more class names")
    if len(set(v)) != len(v):
        r.fail("classes", f"lists {next(c for c in v if v.count(c) > 1)!r} twice")
    problem = class_names_problem(v)
    if problem:
        r.fail("classes", f"is refused: {problem}")
    return list(v)


def _thresholds(r: _Reader, task, thresholds, k: int) -> list[float] | None:
    """A multi-label export's one threshold per class in [0, 1]; a multiclass export has none."""
    task = r.text("task", task, ("multiclass", "multilabel"))
    if task == "multiclass":
        if thresholds is not None:
            r.fail("thresholds", "are given for a multiclass export, which decides by the largest probability")
        return None
    if not isinstance(thresholds, list) or len(thresholds) != k:
        r.fail("thresholds", f"is not a list of {k} numbers, one per class")
    return [r.number(f"thresholds[{i}]", t, 0.0, 1.0) for i, t in enumerate(thresholds)]


def parse_spec(d, where: str) -> ExportSpec:
    """The checked ExportSpec of a model.json document or of an ONNX file's `imgcls.export` property."""
    r = _Reader(where)
    d = r.mapping("the document", d)
    if d.get("format") not in (FORMAT, *OLDER_FORMATS):
        r.fail("format", f"is {d.get('format')!r}, not {FORMAT}")
    classes = _classes(r, d.get("classes"))
    scaling = d.get("scaling")
    if scaling is not None:
        scaling = parse_scaling(scaling, len(classes), f"{where} (field scaling)", "export the run again",
                                multilabel=d.get("task") == "multilabel")
    rule = d.get("reject_rule")
    if rule is not None:
        r.number("reject_rule.threshold", r.mapping("reject_rule", rule).get("threshold"), 0.0, 1.0)
    fingerprint = r.mapping("fingerprint", d.get("fingerprint", {}))
    if not all(isinstance(v, str | int | float | dict) and not isinstance(v, bool) for v in fingerprint.values()):
        r.fail("fingerprint", "holds a value that is not a digest, a number or a mapping of split sizes")
    weights = d.get("weights", "")
    if not isinstance(weights, str) or (weights and not re.fullmatch(r"[0-9a-f]{16,64}", weights)):
        r.fail("weights", f"is {weights!r:.40}, not a sha256 digest")
    prep = _preprocessing(r, d.get("preprocessing"))
    thresholds = _thresholds(r, d.get("task", "multiclass"), d.get("thresholds"), len(classes))
    return ExportSpec(r.text("model", d.get("model")), r.text("head", d.get("head", "linear"), ("linear", "mlp")),
                      classes, prep, _recipe(r, d.get("recipe"), d.get("aug"), prep.img_size),
                      scaling, fingerprint, weights, rule, _curve(r, d.get("risk_coverage")),
                      d.get("versions") if isinstance(d.get("versions"), dict) else None, thresholds)


def read_onnx_spec(properties: dict[str, str], where: str) -> ExportSpec:
    """The spec from an ONNX file's metadata_props: the document, with every flat key that is present agreeing
    with it (a reader without imgcls trusts those)."""
    text = properties.get(ONNX_KEY)
    if text is None:
        raise UserError(f"{where} has no imgcls metadata ({ONNX_KEY}); pass a .onnx file written by imgcls export")
    try:
        document = strict_json(text)
    except ValueError as e:
        raise UserError(f"{where}: the {ONNX_KEY} metadata is not JSON ({first_line(e)}); export the run again") \
            from None
    spec = parse_spec(document, where)
    for key, want in spec.onnx_properties().items():
        have = properties.get(key)
        if key != ONNX_KEY and have is not None and _meaning(have) != _meaning(want):
            raise UserError(f"{where}: the metadata key {key} is {have!r:.60} but {ONNX_KEY} says {want!r:.60}; "
                            f"{EXPORT_FIX}")
    return spec


def _meaning(text: str):
    """A flat key's value as JSON when it is JSON (so spacing does not matter), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text
