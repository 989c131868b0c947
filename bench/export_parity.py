"""Export every model family and print the parity proof: top-1 agreement and largest probability
difference between PyTorch and onnxruntime on cifar10-mini's validation split (500 images, fp32),
and ms/image at batch 1 and 64 for both. fastnet_cifar_small is trained for one epoch (or --run is
used); the other families get fresh weights (the graph, not the accuracy, is what parity tests).

    .venv/bin/python bench/export_parity.py [--models a,b] [--img-size 32] [--out parity.md]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from imgcls import rundir
from imgcls.config import build_config
from imgcls.export import export_run
from imgcls.models import create_model
from imgcls.models.checkpoint import save_checkpoint
from imgcls.training.train import fit

FAMILIES = "fastnet_cifar_small,fastnet_cifar,resnet18_cifar,vit_cifar,vit_ti16,convnext_cifar,efficientnet_lite0," \
           "timm/resnet10t"


def run_for(base: Path, model: str, root: Path, classes: int) -> Path:
    if model == yaml.safe_load((base / rundir.CONFIG).read_text())["model"]:
        return base
    run = root / model.replace("/", "_")
    shutil.copytree(base, run, ignore=shutil.ignore_patterns("*.pt", "export", "eval-*", rundir.CALIBRATION))
    cfg = yaml.safe_load((run / rundir.CONFIG).read_text())
    cfg.update(model=model, out=str(run))
    (run / rundir.CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.manual_seed(0)
    summary = json.loads((run / rundir.SUMMARY).read_text())  # best.pt must tell the summary's story
    save_checkpoint({"model_name": model, "num_classes": classes, "model": create_model(model, classes).state_dict(),
                     "epoch": summary["best_epoch"], "val_acc": summary["best_val_acc"]}, run / rundir.BEST)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=FAMILIES)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--out", help="also write the Markdown table here")
    parser.add_argument("--run", help="a run to start from (default: train fastnet_cifar_small for one epoch)")
    args = parser.parse_args()
    header = ("| model | val images | top-1 agreement | max abs prob diff | PyTorch ms/img b1 | ORT ms/img b1 | "
              "PyTorch ms/img b64 | ORT ms/img b64 |\n|---|---|---|---|---|---|---|---|")
    lines = [header]
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = Path(args.run) if args.run else fit(build_config(
            model="fastnet_cifar_small", epochs=1, img_size=args.img_size, out=str(root / "base"), quiet=True,
            precision="fp32"))
        classes = len(json.loads((base / rundir.DATASET).read_text())["classes"])
        for model in args.models.split(","):
            try:
                run = run_for(base, model, root, classes)
                result = export_run(run, "onnx", root / f"export-{model.replace('/', '_')}")
            except Exception as e:  # a family that cannot export is a row, not the end of the table
                line = f"| {model} | failed: {str(e).splitlines()[0][:100]} |"
            else:
                p = result["parity"]["onnx"]
                lat = p["latency_ms_per_image"]
                line = (f"| {model} | {p['images']} | {100 * p['top1_agreement']:.2f}% | "
                        f"{p['max_abs_prob_diff']:.1e} | "
                        f"{lat['pytorch']['batch1']:.2f} | {lat['onnxruntime']['batch1']:.2f} | "
                        f"{lat['pytorch']['batch64']:.3f} | {lat['onnxruntime']['batch64']:.3f} |")
            lines.append(line)
            print(line, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
