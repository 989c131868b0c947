"""Head-to-head experiments: every variant trained over the same seeds on the same data.

An experiment names a dataset, shared train options (the budget), seeds, and variants (a model
plus any train options). Each (variant, seed) is one ordinary run in OUT/<variant>/seed-<n>, and
OUT/<variant>/seed-<n>.options.json records the options it was made with. The whole experiment is
validated before anything trains. On a rerun, a finished run with the same options is kept and an
interrupted one resumed, so only what is left is done; a run made with other options, or on other
data or splits, is refused, never reused or averaged.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from imgcls import rundir
from imgcls.config import FIELDS, TrainConfig, build_config, underscored
from imgcls.data.datasets import data_source
from imgcls.errors import UserError
from imgcls.evaluation.analysis import training_record
from imgcls.evaluation.significance import compare_to_first, run_test_predictions, test_scores
from imgcls.models import model_spec
from imgcls.options import integer
from imgcls.rundir import file_digest
from imgcls.training.context import load_training_data
from imgcls.training.train import fit
from imgcls.yamlio import load_yaml_mapping

# What every variant must share, so that the comparison is fair.
SHARED_ONLY = {"data", "data_dir", "img_size", "epochs", "val_fraction", "split_seed"}
# What compare itself sets for each run; an experiment may not.
SET_BY_COMPARE = {"seed": "list seeds under seeds:", "out": "pass --out to imgcls compare",
                  "quiet": "pass --quiet to imgcls compare"}
TOP_LEVEL = ("name", "data", "train", "seeds", "variants")
MAX_SEED = 2**63 - 1  # torch seeds its generators with 64-bit integers; larger ones fail deep in training
RESULTS = rundir.COMPARISON_RESULTS
OPTIONS_SUFFIX = ".options.json"  # OUT/<variant>/seed-<n>.options.json: beside the run, which fit() creates
# A comparison's own files, which a variant's folder would shadow.
RESERVED = rundir.COMPARISON_FILES
# A variant name is a folder name: no separators, no leading dot, nothing the shell or HTML must escape.
SAFE_NAME = re.compile(r"[A-Za-z0-9_+=,-][A-Za-z0-9_.+=,-]{0,99}")
# Options that do not change what a run learns, so a rerun may differ in them. The data itself
# is guarded by the dataset fingerprint instead of data_dir.
UNKEYED = {"out", "quiet", "data_dir"}
WEIGHTS_DIGEST = "class_weights_sha256"  # a keyed option that is no flag: the --class-weights file's content
EXCLUDE_DIGEST = "exclude_sha256"  # and the --exclude file's


@dataclass
class Experiment:
    name: str
    train: dict  # shared options, including data
    seeds: list[int]
    variants: dict[str, dict] = field(default_factory=dict)


@dataclass
class Planned:
    """One (variant, seed) run, validated: its folder, config and the options that key it."""
    variant: str
    seed: int
    run: Path
    cfg: TrainConfig
    options: dict

    @property
    def record(self) -> Path:
        return self.run.with_name(self.run.name + OPTIONS_SUFFIX)


def check_variant_name(name, where: str) -> str:
    """A variant name becomes OUT/<name>: refuse anything that is not one plain, safe folder name."""
    if not isinstance(name, str):
        raise UserError(f"{where}: variant name {name!r} is not text; quote it in the YAML")
    if not SAFE_NAME.fullmatch(name) or name in RESERVED:
        raise UserError(f"{where}: variant name {name!r} is not allowed; use up to 100 letters, digits and "
                        "- _ . + = , (no leading dot, not a results file name)")
    return name


def check_seeds(seeds, where: str) -> list[int]:
    """A non-empty list of distinct integers from 0 to MAX_SEED."""
    if not isinstance(seeds, list) or not seeds:
        raise UserError(f"{where}: seeds must be a non-empty list of integers, e.g. [0, 1]")
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEED]
    if bad:
        raise UserError(f"{where}: seed {bad[0]!r} is not a non-negative integer up to {MAX_SEED}; "
                        "give seeds like [0, 1]")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise UserError(f"{where}: seed {repeated[0]} is given twice; list each seed once")
    return list(seeds)


def parse_seeds(text: str) -> list[int]:
    """--seeds '0,1,2' -> [0, 1, 2]."""
    try:
        seeds = [integer(s.strip()) for s in text.split(",")]  # ASCII digits, as every integer flag reads them
    except ValueError:
        raise UserError(f"--seeds takes comma-separated integers, e.g. 0,1,2 (got {text!r})") from None
    return check_seeds(seeds, "--seeds")


def _options(raw, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a mapping of train options (option: value), not a {type(raw).__name__}")
    options = underscored(raw, where)
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}; use imgcls train option names")
    for name, fix in SET_BY_COMPARE.items():
        if name in options:
            raise UserError(f"{where} sets {name}, which compare sets for each run; {fix}")
    return options


def _data(raw, train: dict, path: Path) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw.strip():
        raise UserError(f"{path}: data must be a dataset name or a folder path, e.g. data: cifar10-mini")
    if "data" in train:
        raise UserError(f"{path} gives data both at the top level and under train:; keep one")
    data = os.path.expandvars(raw)  # e.g. ${IMGCLS_DATA}/cats-vs-dogs
    unset = re.search(r"\$\{?(\w+)", data)
    if unset:
        raise UserError(f"{path}: data uses ${unset.group(1)}, which is not set; export it, "
                        f"e.g. {unset.group(1)}=/path/to/datasets")
    return data


def read_experiment(path: str | Path) -> Experiment:
    """Read an experiment YAML: name, data, train (shared options), seeds, variants."""
    path = Path(path)
    raw = load_yaml_mapping(path, "experiment file")
    unknown = sorted(str(k) for k in raw if k not in TOP_LEVEL)
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; an experiment has {', '.join(TOP_LEVEL)} "
                        "(train options go under train: or a variant)")
    if not isinstance(raw.get("variants"), dict) or not raw["variants"]:
        raise UserError(f"{path} needs a 'variants' mapping: name -> train options")
    train = _options(raw.get("train"), f"{path} train")
    data = _data(raw.get("data"), train, path)
    if data is not None:
        train["data"] = data
    variants, folded = {}, {}
    for name, opts in raw["variants"].items():
        check_variant_name(name, str(path))
        if name.lower() in folded:  # OUT/A and OUT/a are one folder on case-insensitive disks
            raise UserError(f"{path}: variants {folded[name.lower()]} and {name} differ only in case; rename one")
        folded[name.lower()] = name
        opts = _options(opts, f"{path} variant {name}")
        fixed = sorted(set(opts) & SHARED_ONLY)
        if fixed:
            raise UserError(f"{path} variant {name} sets {', '.join(fixed)}, which all variants must share; "
                            "move it under train:")
        variants[name] = opts
    seeds = check_seeds(raw.get("seeds", [0]), f"{path} seeds")
    return Experiment(str(raw.get("name", path.stem)), train, seeds, variants)


def experiment_from_flags(data: str, models: list[str], epochs: int | None, seeds: list[int],
                          extra: dict) -> Experiment:
    """The flag form: one variant per model, named after it ('/' in timm/<name> becomes '_')."""
    variants = {}
    for model in models:
        name = check_variant_name(model.strip().replace("/", "_"), "--models")
        if name in variants:
            raise UserError(f"--models lists {model.strip()} twice; list each model once")
        variants[name] = {"model": model.strip()}
    train = {"data": data, **({"epochs": epochs} if epochs is not None else {}), **extra}
    return Experiment("compare", train, check_seeds(seeds, "--seeds"), variants)


def _build(overrides: dict, where: str) -> TrainConfig:
    try:
        cfg = build_config(**overrides)
        spec = model_spec(cfg.model)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:  # e.g. lr: 2e-3, which YAML reads as text (write 2.0e-3)
        raise UserError(f"{where}: an option has a value of the wrong type ({e}); check the values "
                        "(YAML reads 2e-3 as text: write 2.0e-3)") from None
    if isinstance(cfg.pretrained, str) and not Path(cfg.pretrained).is_file():
        raise UserError(f"{where}: pretrained weights {cfg.pretrained} do not exist; check the path")
    return cfg.replace(img_size=cfg.img_size or spec.img_size)  # as fit() resolves it, so variants can be checked


def _keyed(options: dict) -> dict:
    """The options that key a run: JSON-plain, minus UNKEYED, with the data named as fingerprints name it, and
    a --class-weights or --exclude FILE by its content too (the path alone would key an edited file as the same
    run)."""
    options = json.loads(json.dumps(options, default=str))
    options = {k: v for k, v in options.items() if k not in UNKEYED}
    if isinstance(options.get("data"), str):
        options["data"] = data_source(options["data"])
    weights = options.get("class_weights")
    if isinstance(weights, str) and weights.endswith(".json") and Path(weights).expanduser().is_file():
        options[WEIGHTS_DIGEST] = file_digest(Path(weights).expanduser())
    exclude = options.get("exclude")
    if isinstance(exclude, str) and Path(exclude).expanduser().is_file():
        options[EXCLUDE_DIGEST] = file_digest(Path(exclude).expanduser())
    return options


def plan_runs(exp: Experiment, out: Path, data_dir: str | None = None, quiet: bool = False) -> list[Planned]:
    """Build and validate the config of every (variant, seed), before anything trains."""
    plans, sizes = [], {}
    for variant, options in exp.variants.items():
        for seed in exp.seeds:
            run = out / variant / f"seed-{seed}"
            overrides = {**exp.train, **options, "seed": seed, "out": str(run), "quiet": quiet}
            if data_dir:
                overrides["data_dir"] = data_dir
            cfg = _build(overrides, f"variant {variant}")
            plans.append(Planned(variant, seed, run, cfg, _keyed(cfg.to_dict())))
            sizes[variant] = cfg.img_size
    if len(set(sizes.values())) > 1:
        shown = ", ".join(f"{v} {s}px" for v, s in sizes.items())
        raise UserError(f"the variants would train at different image sizes ({shown}); set img-size under train: "
                        "so that every variant sees the same images")
    return plans


def _differences(recorded: dict, planned: dict, legacy: bool) -> list[str]:
    """'option: old -> new' for each keyed option that differs. A legacy config.yaml holds resolved
    values, so options this experiment leaves to auto/None are not compared against it."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    changes = []
    for key in sorted(set(planned) | set(recorded)):
        if (key not in FIELDS or key in UNKEYED) and key not in (WEIGHTS_DIGEST, EXCLUDE_DIGEST):
            continue
        new, old = planned.get(key, defaults.get(key)), recorded.get(key, defaults.get(key))
        if legacy and (new in (None, "auto") or key == "aug" and planned.get("cache_features")):
            continue
        if new != old:
            changes.append(f"{key} {json.dumps(old)} -> {json.dumps(new)}")
    return changes


def _started(run: Path) -> bool:
    """Whether `run` holds a finished or resumable run (anything less is cleared and started again)."""
    return rundir.is_run(run) and ((run / rundir.SUMMARY).exists() or (run / rundir.LAST).exists())


def _check_reusable(p: Planned, out: Path) -> None:
    """Refuse a started run whose recorded options (or, for runs made before records, config.yaml)
    differ from what the experiment now asks for."""
    if p.run.parent.exists() and not p.run.parent.is_dir():
        raise UserError(f"{p.run.parent} is a file, where variant {p.variant}'s runs go; move it away or use "
                        "a fresh --out")
    if not _started(p.run):
        return
    try:
        config = yaml.safe_load((p.run / rundir.CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        config = None
    config = _keyed(config) if isinstance(config, dict) else None
    recorded = _read_json(p.record, f"delete {p.record} and {p.run} and rerun") if p.record.exists() else None
    recorded = recorded.get("options") if isinstance(recorded, dict) else None
    if not isinstance(config, dict) or p.record.exists() and not isinstance(recorded, dict):
        raise UserError(f"cannot tell which options {p.run} was made with; use a fresh --out, or delete "
                        f"{out / p.variant}")
    # the record says what the run was asked for; its config.yaml what it was made with (a run folder moved or
    # copied under another variant or seed keeps its own): both must be the plan's
    changes = (_differences(recorded, p.options, False) if recorded is not None else []) or \
        _differences(config, p.options, True)
    if changes:
        shown = "; ".join(changes[:4]) + ("; ..." if len(changes) > 4 else "")
        raise UserError(f"{p.run} was made with other options ({shown}); use a fresh --out, or delete "
                        f"{out / p.variant} to train it again")


def run_experiment(exp: Experiment, out: str | Path, data_dir: str | None = None, quiet: bool = False) -> list[dict]:
    """Validate everything, train what is missing, then return one record per (variant, seed)."""
    out = Path(out)
    if out.exists() and not out.is_dir() or rundir.is_run(out):
        raise UserError(f"{out} is a file or a training run, not a comparison folder; choose another --out")
    plans = plan_runs(exp, out, data_dir, quiet)
    _check_planned_data(plans[0].cfg, out)
    for p in plans:
        _check_reusable(p, out)
    _check_current_data(plans, out)
    out.mkdir(parents=True, exist_ok=True)
    records, fingerprint, predictions = [], None, {}
    for p in plans:
        _train_or_resume(p)
        info = _read_json(p.run / rundir.DATASET, f"delete {p.run} and rerun")["fingerprint"]
        if fingerprint is None:
            fingerprint = info
        elif info != fingerprint:
            raise UserError(f"{p.run} was trained on different data or splits than the other runs in {out}; "
                            "use a fresh --out for a different dataset")
        summary, metrics = training_record(p.run)  # types, bounds and epochs checked: a damaged one is refused
        records.append({"variant": p.variant, "seed": p.seed, "run": f"{p.variant}/{p.run.name}",
                        "summary": summary, "metrics": metrics})
        found = run_test_predictions(p.run)  # per-image test predictions, for the significance columns
        if found is not None:
            predictions.setdefault(p.variant, {})[p.seed] = found
            records[-1]["test"] = test_scores(*found, summary.get("thresholds"))
            _check_summary(p.run, summary, records[-1]["test"])
    vs_first = compare_to_first(predictions) if predictions else {}
    for r in records:
        r["vs_first"] = vs_first.get(r["variant"])
    rundir.write_sealed_json(out / RESULTS, {"experiment": exp.name, "train": exp.train, "seeds": exp.seeds,
                                             "variants": exp.variants, "fingerprint": fingerprint, "runs": records})
    return records


def _check_summary(run: Path, summary: dict, test: dict) -> None:
    """summary.json's test accuracy (multi-label: mAP) is its best.pt's, as the test predictions (checked against
    best.pt) give it: the two come from the same checkpoint and kernels, so they differ by an image's flip at most
    (for mAP, by the float32 rounding of the stored probabilities)."""
    key, said, tolerance = ("map", summary.get("test_map"), 1e-3) if "map" in test else \
        ("accuracy", summary.get("test_acc"), 1.5 / test["n"])
    if said is not None and abs(said - test[key]) > tolerance:
        name = "mAP" if key == "map" else "accuracy"
        raise UserError(f"{run / rundir.SUMMARY} says test {name} {said:.2%}, but best.pt's test predictions give "
                        f"{test[key]:.2%}: it was edited; restore it, or delete {run} and rerun")


def _train_or_resume(p: Planned) -> None:
    """Keep a finished run, resume an interrupted one, else start afresh; record the options first."""
    p.run.parent.mkdir(parents=True, exist_ok=True)
    if not _started(p.run) and p.run.exists():  # never reached a checkpoint: nothing to keep
        _clear_unstarted(p.run)
    rundir.write_json(p.record, {"variant": p.variant, "seed": p.seed, "options": p.options})
    if (p.run / rundir.SUMMARY).exists():
        return
    if _started(p.run):
        fit(resume=p.run)
    else:
        fit(p.cfg)


def _read_json(path: Path, fix: str):
    try:
        return rundir.read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); {fix}") from None


def _existing_fingerprints(out: Path) -> dict[Path, dict]:
    found = {}
    for info_path in sorted(out.glob(f"*/seed-*/{rundir.DATASET}")):
        info = _read_json(info_path, f"delete {info_path.parent} and rerun")
        if not isinstance(info, dict) or not isinstance(info.get("fingerprint"), dict):
            raise UserError(f"{info_path} is not a dataset record imgcls wrote; delete {info_path.parent} and rerun")
        found[info_path.parent] = info["fingerprint"]
    return found


def _check_planned_data(cfg: TrainConfig, out: Path) -> None:
    """Refuse before training anything when runs already in `out` used other data or splits."""
    planned = {"source": data_source(cfg.data), "val_fraction": cfg.val_fraction, "split_seed": cfg.split_seed}
    for run, found in _existing_fingerprints(out).items():
        differs = [k for k, v in planned.items() if found.get(k) != v]
        if differs:
            raise UserError(f"{run} was trained on different data or splits ({', '.join(differs)}) "
                            f"than this experiment; use a fresh --out for a different dataset")


def _check_current_data(plans: list[Planned], out: Path) -> None:
    """When `out` holds runs already, refuse before anything trains or is tabled if the data on disk has
    changed since (images added, removed, relabelled or edited): new runs could not be compared with them,
    and finished ones would be tabled as results on data they never saw."""
    existing = _existing_fingerprints(out)
    if not existing:
        return
    cfg = plans[0].cfg
    # Loaded as fit() will load it (the mode decides which unreadable files are skipped); this costs one
    # extra read of the data when `out` holds runs.
    dataset = load_training_data(cfg, download=False)
    now = {k: dataset.fingerprint.get(k) for k in ("sizes", "labels_sha256", "excluded_sha256", "content_sha256")}
    for run, found in existing.items():
        if {k: found.get(k) for k in now} != now:
            raise UserError(f"the data in {cfg.data} has changed since {run} was trained (images added, removed, "
                            f"relabelled or edited); use a fresh --out, or restore the data")


def _clear_unstarted(run: Path) -> None:
    """Remove a run folder that holds no checkpoint (config and dataset files only)."""
    leftovers = {p.name for p in run.iterdir()} if run.is_dir() else {run.name}
    if leftovers - {rundir.CONFIG, rundir.DATASET, rundir.METRICS}:
        raise UserError(f"{run} holds files imgcls did not expect; move them away and rerun")
    for p in run.iterdir():
        p.unlink()
    run.rmdir()


def comparison_runs(folder: str | Path) -> list[tuple[str, Path]]:
    """(label, run folder) for each run in FOLDER/results.json, always inside `folder`: results.json
    names runs relative to it (older ones by absolute path, read as FOLDER/<variant>/seed-<n>), so a
    copied comparison is read, and written to, in the copy."""
    folder = Path(folder)
    results = rundir.read_sealed_json(folder / RESULTS, f"rerun imgcls compare with --out {folder}")
    runs = results.get("runs") if isinstance(results, dict) else None
    if not isinstance(runs, list) or not runs:
        raise UserError(f"{folder / RESULTS} lists no runs; rerun imgcls compare")
    root, found = folder.resolve(), []
    for record in runs:
        try:
            variant, seed, stored = record["variant"], int(record["seed"]), Path(record["run"])
        except (TypeError, KeyError, ValueError):
            raise UserError(f"{folder / RESULTS} is not a results file imgcls wrote; rerun imgcls compare") from None
        check_variant_name(variant, str(folder / RESULTS))
        run = folder / variant / f"seed-{seed}" if stored.is_absolute() else folder / stored
        if not run.resolve().is_relative_to(root) or not rundir.is_run(run):
            raise UserError(f"{folder / RESULTS} lists run {stored}, which is not a run inside {folder}; "
                            f"rerun imgcls compare on {folder}")
        found.append((f"{variant} seed {seed}", run))
    return found
