"""Head-to-head experiments: every variant trained over the same seeds on the same data.

An experiment names a dataset, shared train options (the budget), seeds, and variants (a model
plus any train options). Each (variant, seed) is one ordinary run in OUT/<variant>/seed-<n>;
finished runs are kept, interrupted ones resumed, so rerunning an experiment only does what is
left. Runs whose data or split differ are refused, never averaged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from imgcls import rundir
from imgcls.config import FIELDS, TrainConfig, build_config
from imgcls.data.datasets import data_source
from imgcls.errors import UserError
from imgcls.training.train import fit

# What every variant must share, so that the comparison is fair.
SHARED_ONLY = {"data", "data_dir", "img_size", "epochs", "val_fraction", "split_seed", "seed", "out"}
RESULTS = "results.json"


@dataclass
class Experiment:
    name: str
    train: dict  # shared options, including data
    seeds: list[int]
    variants: dict[str, dict] = field(default_factory=dict)


def _options(raw: dict, where: str) -> dict:
    options = {str(k).replace("-", "_"): v for k, v in (raw or {}).items()}
    unknown = sorted(set(options) - FIELDS)
    if unknown:
        raise UserError(f"{where}: unknown option(s) {', '.join(unknown)}; use imgcls train option names")
    return options


def read_experiment(path: str | Path) -> Experiment:
    """Read an experiment YAML: name, data, train (shared options), seeds, variants."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"experiment file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw.get("variants"), dict) or not raw["variants"]:
        raise UserError(f"{path} needs a 'variants' mapping: name -> train options")
    train = _options(raw.get("train", {}), f"{path} train")
    if "data" in raw:
        train["data"] = os.path.expandvars(str(raw["data"]))  # e.g. ${IMGCLS_DATA}/cats-vs-dogs
    variants = {}
    for name, opts in raw["variants"].items():
        opts = _options(opts, f"{path} variant {name}")
        fixed = sorted(set(opts) & SHARED_ONLY)
        if fixed:
            raise UserError(f"{path} variant {name} sets {', '.join(fixed)}, which all variants must share; "
                            "move it under train:")
        variants[str(name)] = opts
    seeds = raw.get("seeds", [0])
    return Experiment(raw.get("name", path.stem), train, [int(s) for s in seeds], variants)


def experiment_from_flags(data: str, models: list[str], epochs: int | None, seeds: list[int],
                          extra: dict) -> Experiment:
    train = {"data": data, **({"epochs": epochs} if epochs else {}), **extra}
    return Experiment("compare", train, seeds, {m: {"model": m} for m in models})


def run_experiment(exp: Experiment, out: str | Path, data_dir: str | None = None, quiet: bool = False) -> list[dict]:
    """Train what is missing, then return one record per (variant, seed)."""
    out = Path(out)
    _check_planned_data(exp, out)
    out.mkdir(parents=True, exist_ok=True)
    records, fingerprint = [], None
    for variant, options in exp.variants.items():
        for seed in exp.seeds:
            run = out / variant / f"seed-{seed}"
            if not (run / rundir.SUMMARY).exists():
                if rundir.is_run(run) and (run / rundir.LAST).exists():
                    fit(resume=run)
                else:
                    if run.exists():  # started but never reached a checkpoint: nothing to keep
                        _clear_unstarted(run)
                    overrides = {**exp.train, **options, "seed": seed, "out": str(run), "quiet": quiet}
                    if data_dir:
                        overrides["data_dir"] = data_dir
                    fit(build_config(**overrides))
            info = rundir.read_json(run / rundir.DATASET)["fingerprint"]
            if fingerprint is None:
                fingerprint = info
            elif info != fingerprint:
                raise UserError(f"{run} was trained on different data or splits than the other runs in {out}; "
                                "use a fresh --out for a different dataset")
            summary = rundir.read_json(run / rundir.SUMMARY)
            records.append({"variant": variant, "seed": seed, "run": str(run), "summary": summary,
                            "metrics": rundir.read_metrics(run)})
    rundir.write_json(out / RESULTS, {"experiment": exp.name, "train": exp.train, "seeds": exp.seeds,
                                      "variants": exp.variants, "fingerprint": fingerprint, "runs": records})
    return records


def _check_planned_data(exp: Experiment, out: Path) -> None:
    """Refuse before training anything when runs already in `out` used other data or splits."""
    planned = {"source": data_source(exp.train.get("data", TrainConfig.data)),
               "val_fraction": exp.train.get("val_fraction", TrainConfig.val_fraction),
               "split_seed": exp.train.get("split_seed", TrainConfig.split_seed)}
    for info_path in sorted(out.glob(f"*/seed-*/{rundir.DATASET}")):
        found = rundir.read_json(info_path)["fingerprint"]
        differs = [k for k, v in planned.items() if found[k] != v]
        if differs:
            raise UserError(f"{info_path.parent} was trained on different data or splits ({', '.join(differs)}) "
                            f"than this experiment; use a fresh --out for a different dataset")


def _clear_unstarted(run: Path) -> None:
    """Remove a run folder that holds no checkpoint (config and dataset files only)."""
    leftovers = {p.name for p in run.iterdir()}
    if leftovers - {rundir.CONFIG, rundir.DATASET, rundir.METRICS}:
        raise UserError(f"{run} holds files imgcls did not expect; move them away and rerun")
    for p in run.iterdir():
        p.unlink()
    run.rmdir()
