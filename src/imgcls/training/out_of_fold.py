"""Out-of-fold probabilities: every labelled image scored by a model that never trained on it.

What confident learning (cleanlab, evaluation/label_issues.py) needs to tell a wrong label from a hard
image. The images are dealt into K folds, stratified by label and seeded (scikit-learn's
StratifiedKFold); each fold is scored by a model fitted on the other K - 1. Two recipes:

  linear   a pretrained backbone's pooled features of every image, computed once through the inference
           path training and predict use, then per fold a multinomial logistic regression on the other
           folds' standardised features (scikit-learn; its regularisation chosen by cross-validation on
           those folds): seconds on a CPU, and the default for photos.
  scratch  per fold a model trained from scratch on the other folds by `fit`, exactly as `imgcls train`
           trains (no validation split, so the final weights), then the held-out fold scored by the run's
           engine: the default for CIFAR-sized images, with fastnet.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgcls.config import build_config, read_recipe
from imgcls.data import Preprocessing, Split
from imgcls.data.datasets import Pool, load_pool, pool_dataset
from imgcls.errors import UserError
from imgcls.evaluation.label_issues import METHOD, MULTILABEL_METHOD, label_issues, multilabel_label_issues
from imgcls.evaluation.multilabel import mean_ap
from imgcls.kernels.apply import configure
from imgcls.kernels.measure import choose_kernels
from imgcls.models import create_model, model_spec
from imgcls.progress import Phase
from imgcls.runtime import resolve_device, seed_everything
from imgcls.training.transfer import cache_features

DEFAULT_FOLDS = 5
LINEAR_MODEL = "efficientnet_lite0"  # ImageNet weights from PyPI, so the default works offline
SCRATCH_MODEL = "fastnet_cifar_small"
SCRATCH_EPOCHS = 10
CIFAR_SIZED = 32  # images this small take the scratch recipe: a photo backbone sees little in 32 px
# The scratch recipe: the model's own defaults (AdamW, batch 128), as the quickstart trains it. The fast
# CIFAR-10 recipe's batch of 512 left 4,800 images of cifar10-mini 9 steps an epoch: 27% out-of-fold
# accuracy, and half the images flagged (bench/label_errors.py, docs/results.md).
SCRATCH_OPTIONS = {"model": SCRATCH_MODEL}
# The head's inverse regularisation C, chosen per fold by log-loss on the fold's own training images: on
# Cats vs Dogs with 5% of labels flipped the fixed default C=1 fitted the flips (precision of the flagged
# images 55%), the chosen C=0.001 did not (89%, recall 98%; bench/label_errors.py, docs/results.md).
# What a --label-recipe may not set: the audit decides it (see the refusal in _scratch).
AUDIT_DECIDES = ("data", "data_dir", "out", "val_fraction", "patience", "exclude", "seed", "label_smoothing", "task",
                 "quiet", "device")
MAX_SEED = 2**32 - 1  # scikit-learn's StratifiedKFold takes a 32-bit seed


def check_label_options(folds: int, epochs: int | None, seed: int) -> None:
    """The audit's own options, checked before any work, in their own names."""
    if not 2 <= folds <= 50:
        raise UserError(f"--folds must be from 2 to 50 (got {folds}); 5 is the usual choice")
    if epochs is not None and not 1 <= epochs <= 100_000:
        raise UserError(f"--label-epochs must be from 1 to 100000 (got {epochs}); e.g. --label-epochs {SCRATCH_EPOCHS}")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be from 0 to {MAX_SEED} (got {seed}); e.g. --seed 0")


LOGISTIC_CS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass(frozen=True)
class OutOfFold:
    pool: Pool
    probs: np.ndarray  # float64 N x K, each row from the model of the fold that held the image out
    folds: np.ndarray  # int N: the fold of each image
    recipe: dict  # how the probabilities were made, for the audit's record


def choose_recipe(data: str, model: str | None, recipe_file: str | None, img_size: int | None) -> str:
    """linear or scratch: scratch for a recipe file, a model without pretrained weights, or CIFAR-sized images."""
    if recipe_file is not None:
        return "scratch"
    if model is not None:
        return "linear" if model_spec(model).pretrained is not None else "scratch"
    small = data in ("cifar10", "cifar10-mini") and (img_size or 32) <= CIFAR_SIZED or (img_size or 64) <= CIFAR_SIZED
    return "scratch" if small else "linear"


def fold_of(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each image's fold, stratified by label (multi-hot labels: dealt at random, seeded, as label sets are too
    many to stratify by); a class with fewer images than folds is refused in one line."""
    from sklearn.model_selection import KFold, StratifiedKFold

    multilabel = labels.ndim == 2
    counts = labels.sum(axis=0) if multilabel else np.bincount(labels)
    if not 2 <= folds <= 50:
        raise UserError(f"--folds must be from 2 to 50 (got {folds}); 5 is the usual choice")
    present = counts[counts > 0]
    if present.min() < folds:
        raise UserError(f"a class has only {present.min()} image(s), fewer than --folds {folds}: every fold needs "
                        "one of each class; lower --folds or add images")
    out = np.empty(len(labels), dtype=np.int64)
    splitter = (KFold if multilabel else StratifiedKFold)(n_splits=folds, shuffle=True, random_state=seed)
    for k, (_, held) in enumerate(splitter.split(np.zeros(len(labels)), None if multilabel else labels)):
        out[held] = k
    return out


def _linear_head():
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegressionCV(Cs=LOGISTIC_CS, cv=3, scoring="neg_log_loss",
                                                                max_iter=3000))


def _fit_fold(features: np.ndarray, labels: np.ndarray, train: np.ndarray, held: np.ndarray,
              probs: np.ndarray) -> list[float]:
    """Fit the linear head on the `train` images and write its probabilities of the `held` ones into `probs`;
    returns the C chosen (one per label for multi-hot labels, each label its own binary head)."""
    if labels.ndim == 1:
        head = _linear_head().fit(features[train], labels[train])
        probs[np.ix_(held, head.classes_)] = head.predict_proba(features[held])
        return [float(head[-1].C_[0])]
    chosen = []
    for k in range(labels.shape[1]):
        y = labels[train, k]
        if y.min() == y.max():  # the label on every training image of the fold, or on none: nothing to fit
            probs[held, k] = float(y[0])
            continue
        head = _linear_head().fit(features[train], y)
        probs[held, k] = head.predict_proba(features[held])[:, list(head.classes_).index(1)]
        chosen.append(float(head[-1].C_[0]))
    return chosen


def out_of_fold(data: str, data_dir: str | None = None, folds: int = DEFAULT_FOLDS, model: str | None = None,
                recipe_file: str | None = None, epochs: int | None = None, img_size: int | None = None,
                seed: int = 0, device: str = "auto", progress: bool = True) -> OutOfFold:
    """Out-of-fold probabilities of every image of `data` (all splits), by the recipe choose_recipe picks."""
    check_label_options(folds, epochs, seed)
    recipe = choose_recipe(data, model, recipe_file, img_size)
    if recipe == "linear":
        if epochs is not None:
            raise UserError("--label-epochs is for models trained from scratch; the linear recipe fits in one pass: "
                            "drop it, or pass --label-model fastnet_cifar_small")
        return _linear(data, data_dir, folds, model or LINEAR_MODEL, img_size, seed, device, progress)
    return _scratch(data, data_dir, folds, model, recipe_file, epochs, img_size, seed, device, progress)


def _linear(data, data_dir, folds, model_name, img_size, seed, device_name, progress) -> OutOfFold:
    spec = model_spec(model_name)
    native = spec.preprocessing
    size = img_size or native.img_size
    pool = load_pool(data, data_dir, size, native.crop_pct)
    labels = pool.labels.numpy()
    fold = fold_of(labels, folds, seed)  # before the slow part: a bad --folds fails at once
    device = resolve_device(device_name)
    backbone = create_model(model_name, len(pool.classes), pretrained=True).to(device)
    # Inference kernels measured as for any run's evaluation (precision included), and cached.
    kernels = choose_kernels(backbone, (64, 3, size, size), device, train=False, name=model_name,
                             data_size=len(labels))
    configure(backbone, kernels.attention_eval, kernels.depthwise_eval, kernels.memory_format)
    prep = Preprocessing(size, native.mean, native.std, native.crop_pct)
    features = cache_features(backbone, Split(pool.labels, images=pool.images), prep, device, kernels.precision_eval,
                              kernels.eval_batch_size, f"features: {model_name}", progress).images.double().numpy()
    probs, chosen = np.zeros((len(labels), len(pool.classes))), []
    with Phase("fitting a linear head per fold", folds, enabled=progress) as phase, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's notices of coming API changes
        for k in range(folds):
            chosen += _fit_fold(features, labels, fold != k, fold == k, probs)
            phase.advance(1)
    return OutOfFold(pool, probs, fold, {"recipe": "linear", "model": model_name, "pretrained": True,
                                         "precision": kernels.precision_eval,
                                         "img_size": size, "folds": folds, "seed": seed,
                                         "head": "logistic regression on standardised features"
                                                 f"{' (one binary head per label)' if labels.ndim == 2 else ''}, "
                                                 "C by 3-fold log-loss within each fold's training images: "
                                                 f"{chosen}"})


def _scratch(data, data_dir, folds, model_name, recipe_file, epochs, img_size, seed, device, progress) -> OutOfFold:
    from imgcls.inference.run import load_run, run_engine
    from imgcls.training.train import fit

    if recipe_file is not None:
        decided = sorted(set(read_recipe(recipe_file)) & set(AUDIT_DECIDES))
        if decided:
            raise UserError(f"--label-recipe {recipe_file} sets {', '.join(decided)}, which audit --labels decides "
                            "(every fold but one trains, with no validation split; --seed seeds the folds; label "
                            "smoothing would cap the probabilities it ranks): remove them from the recipe")
        options = {}
    else:
        options = dict(SCRATCH_OPTIONS)
    if model_name is not None:
        options["model"] = model_name
    if epochs is not None or recipe_file is None:
        options["epochs"] = SCRATCH_EPOCHS if epochs is None else epochs
    cfg = build_config(recipe_file, **options, data=data, data_dir=data_dir, img_size=img_size, val_fraction=0.0,
                       seed=seed, device=device, quiet=True)
    epochs = cfg.epochs
    size = cfg.img_size or model_spec(cfg.model).img_size
    pool = load_pool(data, data_dir, size)
    labels = pool.labels.numpy()
    fold = fold_of(labels, folds, seed)
    probs = np.zeros((len(labels), len(pool.classes)))
    with tempfile.TemporaryDirectory(prefix="imgcls-folds-") as scratch, \
            Phase(f"training {cfg.model} on {folds} folds", folds, enabled=progress) as phase:
        for k in range(folds):
            train, held = torch.from_numpy(fold != k), torch.from_numpy(fold == k)
            dataset = pool_dataset(pool, torch.nonzero(train).flatten(), f"{data}, all folds but {k + 1} of {folds}")
            seed_everything(seed + k)
            run = fit(cfg.replace(out=str(Path(scratch) / f"fold-{k + 1}")), dataset=dataset)
            engine = run_engine(load_run(run))
            scores = engine.score(pool.images[held].permute(0, 2, 3, 1), where=f"fold {k + 1}")
            probs[held.numpy()] = scores.probs.numpy()
            phase.advance(1)
    return OutOfFold(pool, probs, fold, {"recipe": "scratch", "model": cfg.model, "pretrained": False,
                                         "img_size": size, "folds": folds, "seed": seed, "epochs": epochs,
                                         "options": "recipe file" if recipe_file else "built-in"})


SUSPECT_THUMB = 96  # pixels of each suspect's picture in the audit page


def label_audit(data: str, data_dir: str | None = None, folds: int = DEFAULT_FOLDS, model: str | None = None,
                recipe_file: str | None = None, epochs: int | None = None, img_size: int | None = None,
                seed: int = 0, progress: bool = True) -> tuple[dict, list[np.ndarray]]:
    """(the audit's label_issues section, a thumbnail per suspect): out-of-fold probabilities, then cleanlab."""
    start = time.perf_counter()
    oof = out_of_fold(data, data_dir, folds, model, recipe_file, epochs, img_size, seed, progress=progress)
    labels = oof.pool.labels.numpy()
    if oof.pool.multilabel:
        issues = multilabel_label_issues(labels, oof.probs, oof.pool.classes, oof.pool.names)
        quality = {"out_of_fold_map": mean_ap(torch.from_numpy(oof.probs), torch.from_numpy(labels).double())}
        by_class = {"by_doubtful_label": {c: sum(c in i["doubtful"].split(";") for i in issues)
                                          for c in oof.pool.classes}}
    else:
        issues = label_issues(labels, oof.probs, oof.pool.classes, oof.pool.names)
        quality = {"out_of_fold_accuracy": float((oof.probs.argmax(axis=1) == labels).mean())}
        by_class = {"by_given_class": {c: sum(i["given"] == c for i in issues) for c in oof.pool.classes}}
    thumbs = [_thumb(oof.pool.images[issue["index"]]) for issue in issues]
    for issue in issues:
        del issue["index"]  # a position in this pool; the path names the image
    section = {"method": MULTILABEL_METHOD if oof.pool.multilabel else METHOD, **oof.recipe, "images": len(labels),
               **quality, "count": len(issues), **by_class, "seconds": time.perf_counter() - start,
               "issues": issues}
    return section, thumbs


def _thumb(image: torch.Tensor) -> np.ndarray:
    """H x W x 3 uint8 at SUSPECT_THUMB px, from a 3 x S x S uint8 image."""
    resized = torch.nn.functional.interpolate(image[None].float(), size=SUSPECT_THUMB, mode="bilinear",
                                              antialias=True, align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
