"""The run as model.safetensors plus model.json: rebuilt by `load_model` without the run folder, no pickle."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from imgcls.errors import UserError
from imgcls.evaluation.batch_predict import InferenceModel, Predictor, Preprocessing, torch_predictor
from imgcls.evaluation.calibration import Scaling
from imgcls.models import create_model

WEIGHTS, SPEC = "model.safetensors", "model.json"


def export_safetensors(trained, prep: Preprocessing, extra: dict, out: Path) -> Path:
    """Weights (contiguous, fp32) and the JSON that rebuilds the model: name, head, classes,
    preprocessing, calibration, and `extra` (rejection rule and risk-coverage curve)."""
    state = {k: v.detach().float().contiguous().cpu() if v.is_floating_point() else v.detach().contiguous().cpu()
             for k, v in trained.model.state_dict().items()}
    path = out / WEIGHTS
    save_file(state, path, metadata={"format": "imgcls-export-1", "model": trained.config.model})
    spec = {"format": "imgcls-export-1", "model": trained.config.model, "head": trained.config.head,
            "classes": trained.classes, "preprocessing": prep.as_dict(),
            "scaling": trained.scaling.as_dict() if trained.scaling else None,
            "fingerprint": trained.dataset["fingerprint"], "aug": trained.config.aug, **extra}
    (out / SPEC).write_text(json.dumps(spec, indent=2) + "\n")
    return path


def _spec_path(path: str | Path) -> Path:
    path = Path(path)
    spec = path / SPEC if path.is_dir() else path.with_name(SPEC)
    if not spec.is_file() or not spec.with_name(WEIGHTS).is_file():
        raise UserError(f"{path} is not an imgcls export (needs {WEIGHTS} and {SPEC}); "
                        "pass a folder written by imgcls export --format safetensors")
    return spec


def load_model(path: str | Path) -> tuple[torch.nn.Module, Preprocessing]:
    """(model, preprocessing) from an export folder or its model.safetensors, timm style:
    `model(preprocessing("cat.jpg")[None])` gives logits. The model is in eval mode on the CPU;
    `model.imgcls` holds the classes, calibration and rejection rule."""
    spec_path = _spec_path(path)
    spec = json.loads(spec_path.read_text())
    model = create_model(spec["model"], len(spec["classes"]), head=spec.get("head", "linear"))
    model.load_state_dict(load_file(spec_path.with_name(WEIGHTS)))
    model.imgcls = {k: spec.get(k) for k in ("classes", "scaling", "reject_rule", "risk_coverage", "aug")}
    return model.eval(), Preprocessing.from_dict(spec["preprocessing"])


def safetensors_predictor(path: str | Path) -> Predictor:
    """An exported safetensors folder as a Predictor (fp32, CPU)."""
    model, prep = load_model(path)
    info = model.imgcls
    scaling = Scaling.from_dict(info["scaling"]) if info["scaling"] else None
    module = InferenceModel(model, prep.mean, prep.std, scaling.scale if scaling else None,
                            scaling.bias if scaling else None)
    return torch_predictor(module, info["classes"], prep, info["aug"] or "basic", info["risk_coverage"], str(path))
