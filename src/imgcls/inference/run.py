"""A trained run loaded back from its folder, its data, and the engine that scores with it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from imgcls import rundir
from imgcls.config import NORMALIZATIONS, TrainConfig, config_change, load_config, validate
from imgcls.data import Split, load_dataset
from imgcls.data.datasets import BUILTIN_DATA
from imgcls.data.preprocessing import Preprocessing
from imgcls.data.presets import PixelRecipe
from imgcls.errors import UserError
from imgcls.inference.engine import Engine, TorchBackend
from imgcls.inference.graph import InferenceModel
from imgcls.inference.metadata import read_run_data
from imgcls.inference.reject import curve_problem
from imgcls.inference.scaling import Scaling, parse_scaling
from imgcls.kernels import cache
from imgcls.kernels.apply import configure
from imgcls.kernels.choice import NONE, KernelChoice, layout_of
from imgcls.kernels.measure import choose_kernels
from imgcls.models import create_model, model_spec
from imgcls.models.checkpoint import load_checkpoint, restore_weights
from imgcls.models.registry import pretrained_preprocessing
from imgcls.runtime import check_precision

DATASET_KEYS = ("classes", "img_size", "mean", "std", "fingerprint")  # what evaluation reads from dataset.json
EVAL_KERNELS = {"eval_precision": "precision_eval", "eval_attention": "attention_eval",  # config -> KernelChoice
                "eval_depthwise_precision": "depthwise_eval", "memory_format": "memory_format",
                "eval_batch_size": "eval_batch_size"}


@dataclass
class TrainedRun:
    path: Path
    config: TrainConfig
    dataset: dict  # dataset.json: classes, img_size, mean, std, crop_pct, fingerprint
    model: torch.nn.Module
    checkpoint: Path
    digest: str  # sha256 of the checkpoint file: what derived files record they were computed from
    scaling: Scaling | None = None  # from calibration.json, once `imgcls calibrate` has run
    calibration: dict | None = None  # that file as it was read for `scaling`: one read, so the two agree
    allow_data_change: bool = False  # score the run's data even if it differs from what it was trained on

    @property
    def classes(self) -> list[str]:
        return self.dataset["classes"]

    @property
    def preprocessing(self) -> Preprocessing:
        d = self.dataset
        return Preprocessing(d["img_size"], tuple(d["mean"]), tuple(d["std"]), d.get("crop_pct", 1.0))

    @property
    def recipe(self) -> PixelRecipe:
        return PixelRecipe.of(self.config)

    @property
    def multilabel(self) -> bool:
        return self.config.task == "multilabel"

    def require_multiclass(self, command: str) -> None:
        """Refuse, in one line, a command that does not handle multi-label runs yet."""
        if self.multilabel:
            raise UserError(f"{command} does not take multi-label runs yet; {self.path}'s test mAP and F1 are in its "
                            f"{rundir.SUMMARY}, and imgcls predict applies its per-class thresholds")

    def thresholds(self, calibrated: bool = True) -> torch.Tensor | None:
        """A multi-label run's per-class thresholds, tuned on val for the best.pt summary.json scores (0.5 each
        before the run has finished or for another checkpoint), in the probabilities its engine gives: carried
        through the run's calibration (unless not `calibrated`), which moves each label's probabilities but never
        which labels are predicted. None for a multiclass run."""
        if not self.multilabel:
            return None
        tuned = torch.full((len(self.classes),), 0.5, dtype=torch.float64)
        summary = self.path / rundir.SUMMARY
        if self.checkpoint == self.path / rundir.BEST and summary.is_file():
            found = rundir.read_sealed_json(summary, "restore it, or train the run again").get("thresholds")
            if isinstance(found, list) and len(found) == len(self.classes):
                tuned = torch.tensor(found, dtype=torch.float64)
        return tuned if self.scaling is None or not calibrated else self.scaling.carry(tuned)

    @property
    def risk_coverage(self) -> dict | None:
        """The validation curve `imgcls calibrate` stored, for --reject auto; a damaged one is refused."""
        path = self.path / rundir.CALIBRATION
        stored = self.calibration if self.calibration is not None else read_calibration(self.path)
        if stored is None:
            return None
        curve = stored.get("risk_coverage")
        problem = None if curve is None else curve_problem(curve)
        val = stored
        for key in ("splits", "val", "after", "accuracy"):  # the val accuracy the same file reports
            val = val.get(key) if isinstance(val, dict) else None
        if not problem and isinstance(val, float) and abs(curve["accuracy"][-1] - val) > 1e-6:
            problem = f"ends at accuracy {curve['accuracy'][-1]:.4f}, but the file's val accuracy is {val:.4f}"
        if problem:
            raise UserError(f"{path}: its risk_coverage curve {problem}; run imgcls calibrate {self.path} again")
        return curve

    @property
    def identity(self) -> dict:
        return {"model": self.config.model, "data": self.dataset["fingerprint"].get("content_sha256"),
                "weights": self.digest[:16]}

    def has_split(self, name: str) -> bool:
        return name in self.dataset["fingerprint"]["sizes"]

    def split(self, name: str, data: str | None = None, data_dir: str | None = None) -> Split:
        """A split of the run's own data (or of other data with the same classes), preprocessed as in training."""
        cfg = self.config
        dataset = load_dataset(data or cfg.data, data_dir if data else (data_dir or cfg.data_dir),
                               self.dataset["img_size"], cfg.val_fraction, cfg.split_seed, cfg.data_mode,
                               cfg.workers, crop_pct=self.dataset.get("crop_pct", 1.0),
                               exclude=rundir.run_exclusions(self.path, cfg) if data is None else None, task=cfg.task)
        if dataset.classes != self.classes:
            raise UserError(f"{dataset.name} has classes {dataset.classes}, but the run was trained on "
                            f"{self.classes}; evaluate on data with the same classes")
        if data is None:  # the run's own data must still be what it was trained on
            rundir.check_same_data(self.path, self.dataset["fingerprint"], dataset.fingerprint, self.allow_data_change)
        return dataset.split(name)

    def require_split(self, name: str, what: str) -> None:
        """Refuse `what`, which needs the run's `name` split, when the run has none."""
        if not self.has_split(name):
            raise UserError(f"{what} needs a {'validation' if name == 'val' else name} split, and {self.path} has none "
                            "(trained with --val-fraction 0); train a run with --val-fraction 0.1 for it")


def check_dataset_info(info, path: Path) -> None:
    """Refuse a run's dataset.json that lacks a key evaluation reads or holds a value it cannot use: a damaged
    file must not reach the model as a negative image size or a two-value mean (or, in predict, as one error
    row per image). The fields are checked as an export's are (inference/metadata.py)."""
    absent = [k for k in DATASET_KEYS if not isinstance(info, dict) or k not in info]
    if absent:
        raise UserError(f"{path} lacks {', '.join(absent)}; the file is damaged: restore it or train again")
    read_run_data(info, f"{path} is damaged", "restore it from a backup or train the run again")


def load_run(path: str | Path, checkpoint: str = "best", device: torch.device | None = None,
             allow_data_change: bool = False, calibrated: bool = True) -> TrainedRun:
    """A run's config and model with weights from `checkpoint` ("best", "last" or a file path), on `device`,
    and its calibration (unless `calibrated` is False: calibrate fits a new one), which must have been
    fitted on this very checkpoint. Its own data, when loaded through `TrainedRun.split`, must match the
    recorded fingerprint unless `allow_data_change`. A run being trained is refused: its files are changing.
    Nothing is measured here (loading a run to export it times nothing)."""
    path = rundir.require_run(path)
    lock = rundir.RunLock(path)
    if lock.held_elsewhere():
        raise UserError(f"{path} is being trained ({lock.holder()}); wait for it to finish, or stop it and "
                        f"resume it later, then use it")
    cfg = load_config(path / rundir.CONFIG)
    try:  # the bounds and rules train checks: a hand-edited value is refused here as it would be there
        validate(cfg)
    except UserError as e:
        raise UserError(f"{path / rundir.CONFIG} was edited: {e}; restore it, or train the run again") from None
    info_path = path / rundir.DATASET
    if not info_path.is_file():
        raise UserError(f"{path} has no {rundir.DATASET}; the run never started training, train it again")
    info = rundir.read_json(info_path)
    check_dataset_info(info, info_path)
    _check_against_config(info, cfg, info_path)
    ckpt_path = {"best": path / rundir.BEST, "last": path / rundir.LAST}.get(checkpoint, Path(checkpoint))
    if checkpoint in ("best", "last") and not ckpt_path.is_file() and not (path / rundir.LAST).is_file():
        raise UserError(f"{path} has not finished an epoch (no checkpoint yet): continue it with imgcls train "
                        f"--resume {path}, or train it again")
    ckpt = load_checkpoint(ckpt_path, cfg.model, len(info["classes"]))
    _check_checkpoint_record(ckpt, checkpoint, ckpt_path, path, info, info_path, allow_data_change)
    pinned = ckpt.get("preprocessing")  # checkpoints of older runs carry none
    seen = {"img_size": info["img_size"], "crop_pct": info.get("crop_pct", 1.0), "mean": list(info["mean"]),
            "std": list(info["std"]), "recipe": PixelRecipe.of(cfg).as_dict()}
    if pinned is not None and "recipe" not in pinned:  # checkpoints of older runs pinned the pixels alone
        del seen["recipe"]
    if pinned is not None and pinned != seen:
        field = next(k for k in seen if pinned.get(k) != seen[k])
        where = rundir.CONFIG if field == "recipe" else info_path
        raise UserError(f"{where} says {field} {seen[field]}, but {ckpt_path.name} was trained with "
                        f"{pinned.get(field)}: it was edited; restore it, or train again")
    changed = config_change(ckpt.get("config"), cfg)
    if changed:
        raise UserError(f"{path / rundir.CONFIG} is not what {ckpt_path.name} was trained with ({changed}): it was "
                        "edited; restore it, or train again")
    if ckpt.get("classes", info["classes"]) != info["classes"]:  # checkpoints of older runs carry no names
        raise UserError(f"checkpoint {ckpt_path} was trained on the classes {', '.join(map(str, ckpt['classes']))}, "
                        f"not this run's {', '.join(info['classes'])}; pass a checkpoint of this run")
    model = create_model(cfg.model, len(info["classes"]), head=cfg.head)
    restore_weights(model, ckpt, ckpt_path)
    model = model.to(device or torch.device("cpu")).eval()
    digest = rundir.file_digest(ckpt_path)
    scaling, calibration = (_calibration(path, ckpt_path, digest, len(info["classes"]), cfg.task == "multilabel")
                            if calibrated else (None, None))
    return TrainedRun(path, cfg, info, model, ckpt_path, digest, scaling, calibration, allow_data_change)


def _check_checkpoint_record(ckpt: dict, checkpoint: str, ckpt_path: Path, run: Path, info: dict,
                             info_path: Path, allow_data_change: bool) -> None:
    """The checkpoint is the one its name says (a last.pt copied over best.pt, or an older best.pt put back, is
    refused) and was trained on the data dataset.json records (an edit of the record would let other data pass)."""
    role = ckpt.get("role")  # checkpoints of older runs carry no role, fingerprint or summary check
    if checkpoint in ("best", "last") and role is not None and role != checkpoint:
        raise UserError(f"{ckpt_path} is a {role} checkpoint, not the run's {checkpoint}: it was copied over; restore "
                        f"the run's own {ckpt_path.name}, or train again")
    changed = ckpt.get("fingerprint") is not None and ckpt["fingerprint"] != info.get("fingerprint")
    if changed and not allow_data_change:
        raise UserError(f"{info_path} does not record the data {ckpt_path.name} was trained on (it was edited, or the "
                        "run was resumed on changed data): restore it, or pass --allow-data-change to use the run")
    summary = run / rundir.SUMMARY
    if checkpoint == "best" and role == "best" and summary.is_file():
        best_epoch = rundir.read_sealed_json(summary, "restore it, or train the run again").get("best_epoch")
        if best_epoch != ckpt.get("epoch"):
            raise UserError(f"{ckpt_path} holds epoch {ckpt.get('epoch')}, but {rundir.SUMMARY} chose epoch "
                            f"{best_epoch}: another best.pt was put back; restore the run's own, or train again")


def _check_against_config(info: dict, cfg, info_path: Path) -> None:
    """dataset.json's image size, crop and normalisation are the plan's (config.yaml): an edit to one of them would
    feed the model other pixels than it was trained on, and every answer would change without a word."""
    stats = NORMALIZATIONS.get(cfg.normalize)
    same_stats = stats is None or (list(info["mean"]), list(info["std"])) == (list(stats[0]), list(stats[1]))
    crop_pct = pretrained_preprocessing(cfg, model_spec(cfg.model))[1] if cfg.data not in BUILTIN_DATA else 1.0
    differ = [f"img_size {info['img_size']} against {cfg.img_size}"] if info["img_size"] != cfg.img_size else []
    differ += [f"crop_pct {info.get('crop_pct', 1.0)} against {crop_pct}"] if info.get("crop_pct", 1.0) != crop_pct \
        else []
    differ += [f"mean/std other than {cfg.normalize}'s"] if not same_stats else []
    if differ:
        raise UserError(f"{info_path} does not agree with {rundir.CONFIG} ({'; '.join(differ)}): it was edited; "
                        "restore it, or train the run again")


def read_calibration(run: Path) -> dict | None:
    """RUN/calibration.json as `imgcls calibrate` wrote it (None: not calibrated); an edited one is refused."""
    path = run / rundir.CALIBRATION
    if not path.is_file():
        return None
    return rundir.read_sealed_json(path, f"run imgcls calibrate {run} again, or delete it to use the run "
                                         "uncalibrated")


def _calibration(path: Path, checkpoint: Path, digest: str, num_classes: int,
                 multilabel: bool) -> tuple[Scaling | None, dict | None]:
    """The run's calibration and the file it came from, refused unless it was fitted on `checkpoint` (the file
    records the digest of the checkpoint it was fitted on): another epoch's temperature is not this model's."""
    calibration = path / rundir.CALIBRATION
    stored = read_calibration(path)
    if stored is None:
        return None, None
    scaling = parse_scaling(stored.get("scaling"), num_classes, str(calibration),
                            "delete it to use the run uncalibrated, or run imgcls calibrate again", multilabel)
    if stored.get("weights") != digest:
        raise UserError(f"{calibration} was fitted on another checkpoint than {checkpoint.name} (or by an older "
                        f"imgcls): calibrate this one with imgcls calibrate {path} --checkpoint "
                        f"{checkpoint.stem if checkpoint.parent == path else checkpoint}, or delete it to use the run "
                        "uncalibrated")
    return scaling, stored


def _eval_requests(trained: TrainedRun, device: torch.device) -> dict:
    """The plan's inference kernels, as choose_kernels takes them: the recorded values, except "auto" for
    those the plan measured on another machine (plan.json) and those an older run never recorded."""
    cfg = trained.config
    plan = rundir.read_plan(trained.path)
    elsewhere = plan is not None and plan.get("machine") != cache.machine(device)
    requests = {}
    for option in EVAL_KERNELS:
        value = getattr(cfg, option)
        measured = plan is not None and option in plan.get("measured", [])
        requests[option] = "auto" if value in ("auto", None) or (elsewhere and measured) else value
    return requests


def run_engine(trained: TrainedRun, precision: str | None = None, batch_size: int | None = None) -> Engine:
    """The engine of a loaded run, with its calibration and risk-coverage curve, at the plan's inference
    precision (`precision` forces one: export parity compares against fp32) and with its inference kernels
    (measured here, and cached, where the plan left them to this machine). Configures `trained.model`."""
    cfg, model = trained.config, trained.model
    device = next(model.parameters()).device
    req = _eval_requests(trained, device)
    if precision is not None:
        req["eval_precision"] = check_precision(precision, device)
    elif req["eval_precision"] == "fp16" and device.type == "cpu":  # planned on a GPU: this CPU has none
        req["eval_precision"] = "auto"
    if batch_size is not None:  # given: nothing to measure for it
        req["eval_batch_size"] = batch_size
    if req["eval_precision"] == "fp32":  # without autocast a depthwise convolution is float32 already
        req["eval_depthwise_precision"] = NONE
    given = {EVAL_KERNELS[k]: v for k, v in req.items() if v not in ("auto", None)}
    kernels = KernelChoice(precision_train=NONE, **given)
    if any(v in ("auto", None) for v in req.values()):
        kernels = choose_kernels(model, (cfg.batch_size, 3, trained.dataset["img_size"], trained.dataset["img_size"]),
                                 device, precision_eval=req["eval_precision"], attention_eval=req["eval_attention"],
                                 depthwise_eval=req["eval_depthwise_precision"], memory_format=req["memory_format"],
                                 eval_batch_size=None if req["eval_batch_size"] == "auto" else req["eval_batch_size"],
                                 name=cfg.model, train=False)
    # outside any inference_mode a caller is in: re-laid-out weights must stay normal tensors (Grad-CAM)
    with torch.inference_mode(False):
        configure(model, kernels.attention_eval, kernels.depthwise_eval, kernels.memory_format)
    precision = kernels.precision_eval
    graph = InferenceModel(model, trained.preprocessing, memory_format=layout_of(kernels.memory_format))
    return Engine(TorchBackend(graph, device, precision), trained.classes, trained.preprocessing,
                  batch_size or kernels.eval_batch_size, trained.recipe, trained.scaling, trained.risk_coverage,
                  precision, kernels, str(trained.path), trained.identity, model, device,
                  trained.thresholds())
