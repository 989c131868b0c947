"""The `imgcls` command: a thin layer that parses flags and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from imgcls.config import TrainConfig

DESCRIPTION = "Train, evaluate and use image classifiers, offline and fast on a CPU."

TRAIN_HELP = {
    "data": "cifar10, cifar10-mini (bundled, the default) or a path to an image folder",
    "data_dir": "for cifar10: the folder that holds cifar-10-batches-py/ "
                "(default $IMGCLS_DATA/cifar10, else ~/.cache/imgcls/cifar10)",
    "img_size": "input size in pixels (default: the model's native size, 32 for the CIFAR models; "
                "ViT position embeddings are interpolated for other sizes)",
    "val_fraction": "fraction of train held out for validation when the data has no val split (0.1)",
    "split_seed": "seed of the train/val split, fixed apart from --seed so runs share one split (0)",
    "data_mode": "auto (in memory when it fits in 4 GiB decoded), memory, or stream from disk",
    "workers": "DataLoader workers when streaming (2)",
    "model": "a registered model (see imgcls models) or timm/<name> (default resnet18_cifar)",
    "pretrained": "start from pretrained weights: alone, the model's own (efficientnet_lite0-2 from their PyPI "
                  "packages, timm/<name> and convnext_* from timm's hub, online); or a .safetensors/.pth file "
                  "(the head is replaced when the class count differs); brings the weights' mean/std and crop",
    "strategy": "auto (finetune with --pretrained, else scratch), scratch, feature-extract (frozen backbone, "
                "BatchNorm statistics too; new head), finetune (all layers, per-group rates) or gradual "
                "(feature-extract, then unfreeze groups from the top down)",
    "head": "classifier head: linear, or mlp (Linear-256, ReLU, Dropout 0.3, Linear) (linear)",
    "cache_features": "feature-extract only: run the frozen backbone once over the unaugmented images and train "
                      "the head on those features (seconds instead of minutes on a CPU); disables image "
                      "augmentation",
    "layer_decay": "finetune/gradual: the head trains at --lr, each layer group below at D times the rate above",
    "group_lrs": "finetune/gradual: one rate per layer group, bottom (stem) to top (head), comma-separated",
    "unfreeze_every": "gradual: unfreeze the next layer group down every K epochs (default 1)",
    "unfreeze_at": "gradual: unfreeze the next layer group down after each of these epochs, e.g. 2,4,6",
    "epochs": "number of epochs (10)",
    "batch_size": "training batch size; under torchrun the global batch, split evenly across processes (128)",
    "optimizer": "adamw, or sgd with Nesterov momentum; give sgd its own --lr and --weight-decay, e.g. 0.1 "
                 "and 5e-4 (adamw)",
    "lr": "peak learning rate (1e-3)",
    "momentum": "SGD momentum (0.9)",
    "weight_decay": "weight decay, not applied to biases and norms; decoupled in AdamW (0.05)",
    "warmup_epochs": "linear warm-up length in epochs before cosine decay (1)",
    "ema": "evaluate and save an exponential moving average of the weights with this decay per step, "
           "e.g. 0.99: validation, best.pt and the summary use it; last.pt keeps both (0, off)",
    "whiten": "fastnet_* only: initialise the 2x2 stem as a whitening filter of the training images' patches "
              "(airbench)",
    "aug": "training augmentation: none; basic = random crop (padding size/8) + flip; standard = "
           "RandomResizedCrop(0.8-1) + flip + ColorJitter + rotation 15 + erasing 0.2; randaugment (2 ops, "
           "magnitude 9), trivialaugment, autoaugment, each after crop + flip (basic)",
    "random_erasing": "random erasing probability on top of any recipe (default: 0.2 for standard, else 0)",
    "mixup": "Mixup with Beta(ALPHA, ALPHA); the flag alone means 0.2 (off by default)",
    "cutmix": "CutMix with Beta(ALPHA, ALPHA); the flag alone means 1.0 (off by default)",
    "mix_prob": "probability that a batch is mixed at all (1.0)",
    "mix_switch_prob": "with both Mixup and CutMix: probability a mixed batch uses CutMix (0.5)",
    "label_smoothing": "label smoothing epsilon, applied once, also to mixed targets (0)",
    "normalize": "normalisation statistics: auto (CIFAR's for CIFAR, ImageNet's for folders), cifar, imagenet",
    "seed": "seed for initialisation, order and augmentation (0)",
    "out": "run folder (default runs/<data>-<model>, numbered if taken); an existing run is never overwritten",
    "device": "auto, cpu or cuda (auto)",
    "precision": "auto (bf16 where the hardware runs it natively, else fp32), fp32, bf16 or fp16",
    "compile": "torch.compile the training forward pass (a warm-up of tens of seconds; slower than eager on "
               "some CPUs, so off by default)",
    "sync_bn": "under torchrun on GPUs: BatchNorm statistics over the global batch (torch's SyncBatchNorm)",
    "eval_batch_size": "batch size for evaluation (512)",
    "quiet": "no progress bar or per-epoch lines, only the final summary",
}


MIX_DEFAULTS = {"mixup": 0.2, "cutmix": 1.0}
METAVARS = {"layer_decay": "D", "group_lrs": "LR,LR,...", "unfreeze_every": "K", "unfreeze_at": "EPOCH,EPOCH,..."}


def _number_list(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None

    return parse


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_const", const=True, default=None, help=TRAIN_HELP[f.name])
            continue
        if f.name == "pretrained":  # alone: the model's own weights; with a value: a file
            p.add_argument(flag, nargs="?", const=True, default=None, metavar="FILE", help=TRAIN_HELP[f.name])
            continue
        kind = {"int": int, "int | None": int, "float": float, "float | None": float,
                "list[float] | None": _number_list(float), "list[int] | None": _number_list(int)}.get(f.type, str)
        if f.name in MIX_DEFAULTS:  # "--mixup" alone switches it on at the usual alpha
            p.add_argument(flag, type=kind, nargs="?", const=MIX_DEFAULTS[f.name], default=None, metavar="ALPHA",
                           help=TRAIN_HELP[f.name])
            continue
        metavar = METAVARS.get(f.name, f.name.upper())
        p.add_argument(flag, type=kind, default=None, metavar=metavar, help=TRAIN_HELP[f.name])


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser = argparse.ArgumentParser(prog="imgcls", description=DESCRIPTION, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", parents=[common], help="train a model; writes a run folder",
                           description="Train a model. Flags override the --recipe file, which overrides defaults.")
    train.add_argument("--recipe", metavar="YAML", help="YAML file of train options (keys as the flags)")
    train.add_argument("--resume", metavar="RUN", help="continue an interrupted run with its saved config")
    _add_train_flags(train)

    ev = sub.add_parser("eval", parents=[common], help="evaluate a run; writes eval-<split>.json into it")
    ev.add_argument("run", help="run folder")
    ev.add_argument("--data", help="evaluate on other data with the same classes (default: the run's)")
    ev.add_argument("--data-dir", help="as in train, for --data cifar10")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (test)")
    ev.add_argument("--checkpoint", default="best", help="best (chosen on val), last, or a file (best)")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ev.add_argument("--tta", default="none", metavar="MODE",
                    help="test-time augmentation, compared against none: flip (2 views), flip-crop (flip and "
                         "two shifted crops, 6 views) or N random views of the training recipe; probabilities "
                         "are averaged")

    cal = sub.add_parser("calibrate", parents=[common], help="fit a temperature on val; eval and predict use it",
                         description="Fit temperature scaling (one scale) or vector scaling (a scale and bias "
                                     "per class) by L-BFGS on the validation split, store it in the run "
                                     "(calibration.json) and print validation and test metrics before and after.")
    cal.add_argument("run", help="run folder")
    cal.add_argument("--method", default="temperature", choices=["temperature", "vector"],
                     help="temperature (one scale; never changes a prediction) or vector (a scale and bias "
                          "per class) (temperature)")
    cal.add_argument("--checkpoint", default="best", help="best, last, or a file (best)")
    cal.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    pr = sub.add_parser("predict", parents=[common], help="classify image files with a trained run")
    pr.add_argument("run", help="run folder")
    pr.add_argument("images", nargs="+", help="image files (jpg, png, webp, bmp)")
    pr.add_argument("--topk", type=int, default=3, help="classes to show per image (3)")
    pr.add_argument("--json", action="store_true", help="print JSON instead of text")
    pr.add_argument("--checkpoint", default="best", help="best, last, or a file (best)")

    cam = sub.add_parser("cam", parents=[common], help="Grad-CAM heat-maps over image files",
                         description="Explain a trained run's predictions: the heat-map of the chosen class over "
                                     "each image (CNNs: last convolutional stage; ViTs: patch tokens before the "
                                     "last attention). All images run as one batch.")
    cam.add_argument("run", help="run folder")
    cam.add_argument("images", nargs="+", help="image files")
    cam.add_argument("--class", dest="class_name", metavar="NAME", help="class to explain (default: the predicted)")
    cam.add_argument("--method", default="gradcam", choices=["gradcam", "gradcam++"], help="(gradcam)")
    cam.add_argument("--out", default="cam", help="folder for the overlays (cam)")
    cam.add_argument("--checkpoint", default="best", help="best, last, or a file (best)")

    rep = sub.add_parser("report", parents=[common], help="one self-contained HTML report of a run or a comparison",
                         description="For a run: metrics, calibration, TTA, confusion, Grad-CAM and top losses in "
                                     "RUN/report/report.html. For an imgcls compare folder: the results table and "
                                     "charts in FOLDER/report.html, linking a report for every run.")
    rep.add_argument("path", help="run folder or compare folder")
    rep.add_argument("--tta", default="flip", metavar="MODE", help="test-time augmentation to compare (flip)")
    rep.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])

    sub.add_parser("models", parents=[common], help="list the registered models with parameter counts")

    cmp_ = sub.add_parser("compare", parents=[common], help="train variants over seeds and compare them",
                          description="Run an experiment file, or the flag form (--data and --models). "
                                      "Finished runs in --out are kept; rerunning does only what is left.")
    cmp_.add_argument("experiment", nargs="?", help="experiment YAML (see experiments/)")
    cmp_.add_argument("--data", help="flag form: dataset for every variant")
    cmp_.add_argument("--models", help="flag form: comma-separated models, one variant each")
    cmp_.add_argument("--epochs", type=int, help="flag form: epochs for every variant")
    cmp_.add_argument("--seeds", default=None, help="comma-separated seeds (default: the file's, else 0)")
    cmp_.add_argument("--data-dir", help="as in train, for cifar10")
    cmp_.add_argument("--out", required=True, help="folder for all runs and the results files")
    cmp_.add_argument("--quiet", action="store_true", help="no progress bars")

    prev = sub.add_parser("augment-preview", parents=[common], help="draw originals next to augmented versions")
    prev.add_argument("--data", default="cifar10-mini", help="as in train (cifar10-mini)")
    prev.add_argument("--data-dir", help="as in train, for cifar10")
    prev.add_argument("--aug", default="basic", help="recipe, as in train (basic)")
    prev.add_argument("--img-size", type=int, help="as in train (default 32, or 64 for folders)")
    prev.add_argument("--random-erasing", type=float, help="as in train")
    prev.add_argument("--mixup", type=float, nargs="?", const=0.2, default=0.0, metavar="ALPHA", help="as in train")
    prev.add_argument("--cutmix", type=float, nargs="?", const=1.0, default=0.0, metavar="ALPHA", help="as in train")
    prev.add_argument("--label-smoothing", type=float, default=0.0, help="as in train")
    prev.add_argument("--n", type=int, default=8, help="images per row (8)")
    prev.add_argument("--seed", type=int, default=0, help="seed (0)")
    prev.add_argument("--out", default="augment-preview.png", help="PNG file to write")
    return parser


def cmd_train(args) -> int:
    from imgcls.config import build_config
    from imgcls.errors import UserError
    from imgcls.reporting.console import print_summary
    from imgcls.rundir import SUMMARY, read_json
    from imgcls.training.distributed import launched_rank
    from imgcls.training.train import fit

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if args.resume:
        given = sorted(k for k, v in flags.items() if v is not None and k != "quiet")
        if given or args.recipe:
            names = ", ".join("--" + k.replace("_", "-") for k in given) or "--recipe"
            raise UserError(f"--resume continues a run with its saved config; drop {names}")
        run = fit(resume=args.resume)
    else:
        run = fit(build_config(args.recipe, **flags))
    if launched_rank() == 0:  # under torchrun the others stay quiet
        print_summary(read_json(run / SUMMARY))
    return 0


def cmd_eval(args) -> int:
    from imgcls.evaluation.evaluate import evaluate_run
    from imgcls.reporting.console import print_eval

    result, out = evaluate_run(args.run, args.split, args.data, args.data_dir, args.checkpoint, args.device,
                               args.tta)
    print_eval(result, args.split, args.run)
    print(f"wrote {out}")
    return 0


def cmd_calibrate(args) -> int:
    from imgcls.evaluation.evaluate import calibrate_run
    from imgcls.reporting.console import print_calibration
    from imgcls.rundir import CALIBRATION

    print_calibration(calibrate_run(args.run, args.method, args.checkpoint, args.device), args.run)
    print(f"wrote {Path(args.run) / CALIBRATION}")
    return 0


def cmd_predict(args) -> int:
    from imgcls.evaluation.evaluate import predict_files
    from imgcls.evaluation.predict import load_run
    from imgcls.reporting.console import print_predictions

    print_predictions(predict_files(load_run(args.run, args.checkpoint), args.images, args.topk), args.json)
    return 0


def cmd_cam(args) -> int:
    from imgcls.evaluation.cam import explain_files
    from imgcls.evaluation.predict import load_run
    from imgcls.reporting.figures import save_cam_overlays

    trained = load_run(args.run, args.checkpoint)
    images, cams, classes, probs = explain_files(trained, args.images, args.class_name, args.method)
    captions = [f"{args.method} for '{trained.classes[c]}' (p = {probs[i, c]:.2f}); predicted "
                f"'{trained.classes[probs[i].argmax()]}'" for i, c in enumerate(classes.tolist())]
    stems = [Path(p).stem for p in args.images]
    for path in save_cam_overlays(images, cams, captions, stems, Path(args.out)):
        print(f"wrote {path}")
    return 0


def cmd_report(args) -> int:
    from imgcls.evaluation.analysis import analyze_run
    from imgcls.reporting.html import write_comparison_report, write_run_report
    from imgcls.rundir import REPORT_DIR, REPORT_HTML, read_json, require_run

    path = Path(args.path)
    if (path / "results.json").is_file():  # a comparison: a report per run, then the overview
        reports = {}
        for record in read_json(path / "results.json")["runs"]:
            run = Path(record["run"])
            if not (run / REPORT_DIR / REPORT_HTML).is_file():
                analyze_run(run, args.tta, device=args.device)
                write_run_report(run)
            reports[f"{record['variant']} seed {record['seed']}"] = run / REPORT_DIR / REPORT_HTML
        out = write_comparison_report(path, reports)
    else:
        require_run(path)
        analyze_run(path, args.tta, device=args.device)
        out = write_run_report(path)
    print(f"wrote {out}")
    return 0


def cmd_models(args) -> int:
    import torch

    from imgcls.models import count_parameters, create_model, list_models
    from imgcls.reporting.console import print_models

    rows = []
    for spec in list_models():
        num_classes = 10 if spec.img_size <= 32 else 1000
        with torch.device("meta"):  # counts parameters without allocating them
            params = count_parameters(create_model(spec.name, num_classes))
        rows.append({"name": spec.name, "params": params, "img_size": spec.img_size,
                     "family": spec.family, "description": spec.description, "num_classes": num_classes})
    print_models(rows)
    return 0


def cmd_compare(args) -> int:
    from imgcls.errors import UserError
    from imgcls.reporting.figures import comparison_charts
    from imgcls.reporting.tables import aggregate, to_markdown, write_tables
    from imgcls.training.compare import experiment_from_flags, read_experiment, run_experiment

    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    if args.experiment:
        if args.models or args.data:
            raise UserError("give either an experiment file or --data/--models, not both")
        exp = read_experiment(args.experiment)
        exp.seeds = seeds or exp.seeds
    elif args.data and args.models:
        exp = experiment_from_flags(args.data, args.models.split(","), args.epochs, seeds or [0], {})
    else:
        raise UserError("pass an experiment file, or --data and --models for the flag form")
    records = run_experiment(exp, args.out, args.data_dir, args.quiet)
    rows = aggregate(records)
    write_tables(rows, Path(args.out))
    charts = comparison_charts(records, Path(args.out))
    print(to_markdown(rows))
    print(f"wrote {args.out}/results.json, results.csv, results.md, {', '.join(p.name for p in charts)}")
    return 0


def cmd_augment_preview(args) -> int:
    from imgcls.config import build_config
    from imgcls.data import TrainTransform, load_dataset
    from imgcls.data.preview import preview_rows
    from imgcls.reporting.figures import image_grid

    cfg = build_config(data=args.data, aug=args.aug, random_erasing=args.random_erasing, mixup=args.mixup,
                       cutmix=args.cutmix, label_smoothing=args.label_smoothing)  # validates the options
    dataset = load_dataset(cfg.data, args.data_dir, args.img_size)
    transform = TrainTransform(cfg.aug, dataset.img_size, dataset.mean, dataset.std, dataset.num_classes,
                               cfg.random_erasing, cfg.mixup, cfg.cutmix, label_smoothing=cfg.label_smoothing)
    rows, captions, titles = preview_rows(dataset, transform, args.n, seed=args.seed)
    print(f"wrote {image_grid(rows, captions, titles, Path(args.out))}")
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "calibrate": cmd_calibrate, "predict": cmd_predict,
            "cam": cmd_cam, "report": cmd_report, "models": cmd_models, "compare": cmd_compare,
            "augment-preview": cmd_augment_preview}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from imgcls.errors import UserError
    from imgcls.training.train import Interrupted

    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        print(f"imgcls: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        from imgcls.training.distributed import launched_rank

        if launched_rank() == 0:
            print(f"imgcls: {e}; continue with: imgcls train --resume {e.run_dir} (under torchrun: the same "
                  "torchrun command with these arguments)", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("imgcls: aborted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unforeseen still gets one line; --debug shows the traceback
        if args.debug:
            raise
        print(f"imgcls: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
