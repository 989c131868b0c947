"""The `imgcls` command: a thin layer that parses flags and calls the library.

Train flags are generated from the TrainConfig schema (config.py), which also coerces and checks
their values; nothing here imports torch, so `imgcls --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from imgcls.config import FIELDS, TYPES, erasing_probability, flag
from imgcls.errors import UserError, first_line, shown
from imgcls.options import OPTIONS, add_options, decimal, integer

DESCRIPTION = "Train, evaluate and use image classifiers, offline and fast on a CPU."


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that names the problem and where the help is."""

    def error(self, message: str):
        self.exit(2, f"imgcls: error: {message}; see {self.prog} --help\n")


def _metavar(name: str) -> str:
    meta = FIELDS[name].metadata
    if meta["metavar"]:
        return meta["metavar"]
    return "{" + ",".join(meta["choices"]) + "}" if meta["choices"] else name.upper()


def _default_note(name: str) -> str:
    default = FIELDS[name].default
    return "" if default in (None, False) else f" (default {default})"


def _add_train_flags(p: argparse.ArgumentParser, names=None) -> None:
    """One flag per TrainConfig field (or per field of `names`); values arrive as text and the schema coerces
    and checks them."""
    for name, f in FIELDS.items():
        if names is not None and name not in names:
            continue
        meta, help_text = f.metadata, (f.metadata["help"] + _default_note(name)).replace("%", "%%")
        if TYPES[name] is bool:
            p.add_argument(flag(name), action="store_const", const=True, default=None, help=help_text)
        elif meta["const"] is not None:  # e.g. "--mixup" alone switches it on at the usual alpha
            p.add_argument(flag(name), nargs="?", const=meta["const"], default=None, metavar=_metavar(name),
                           help=help_text)
        else:
            p.add_argument(flag(name), default=None, metavar=_metavar(name), help=help_text)


def _train_parser(sub, common) -> None:
    train = sub.add_parser("train", parents=[common], help="train a model; writes a run folder",
                           description="Train a model. Flags override the --recipe file, which overrides defaults.")
    train.add_argument("--recipe", metavar="YAML", help="YAML file of train options (keys as the flags)")
    train.add_argument("--resume", metavar="RUN|auto",
                       help="continue an interrupted run with its saved config (only --quiet and --allow-data-change "
                            "may be given with it); auto, with --out RUN and the run's options (for a cluster that "
                            "restarts the same command): start RUN if it does not exist, continue it if it was begun "
                            "with the same options and data, refuse otherwise")
    add_options(train, "--allow-data-change")
    _add_train_flags(train)


def _lr_find_parser(sub, common) -> None:
    # "resolve": this command's --out (the plot) replaces train's --out (the run folder)
    lrf = sub.add_parser("lr-find", parents=[common], conflict_handler="resolve",
                         help="learning-rate range test: suggests --lr and plots loss against rate",
                         description="Smith's range test on a fresh copy of the model, with every train flag: the "
                                     "rates of all layer groups rise together, exponentially, over at most one epoch "
                                     "until the smoothed loss diverges. Prints the steepest-descent and valley "
                                     "suggestions and writes the plot; no run folder, the weights are only read.")
    lrf.add_argument("--recipe", metavar="YAML", help="YAML file of train options (keys as the flags)")
    _add_train_flags(lrf)
    lrf.add_argument("--start-lr", type=decimal, default=1e-7, help="the head's rate at the first step (1e-7)")
    lrf.add_argument("--end-lr", type=decimal, default=10.0, help="the head's rate at the last step (10)")
    lrf.add_argument("--steps", type=integer, default=None,
                     help="steps of the sweep, at most one epoch (default min(100, steps per epoch))")
    lrf.add_argument("--out", default="lr_find.png", help="the plot to write, .png, .svg or .pdf (lr_find.png)")


def _eval_parsers(sub, common) -> None:
    ev = sub.add_parser("eval", parents=[common], help="evaluate a run; writes eval-<split>.json into it")
    ev.add_argument("run", help="run folder")
    ev.add_argument("--data", help="evaluate on other data with the same classes (default: the run's)")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"], help="split (test)")
    ev.add_argument("--ood", metavar="DIR", help="a folder of images from classes the run never saw: AUROC and "
                    "FPR@95TPR of max-softmax and energy scores, and what --reject auto lets through")
    ev.add_argument("--out", metavar="JSON", help="where the results go (default: RUN/eval-SPLIT.json for the run's "
                    "own data, eval-DATA-SPLIT.json here for --data: a run's folder only holds its own data's)")
    add_options(ev, "--data-dir", "--checkpoint", "--device", "--allow-data-change", "--tta",
                tta={"help": OPTIONS["--tta"].help + "; compared against none"})

    cal = sub.add_parser("calibrate", parents=[common], help="fit a temperature on val; eval and predict use it",
                         description="Fit temperature scaling (one scale) or vector scaling (a scale and bias "
                                     "per class) by L-BFGS on the validation split, store it in the run "
                                     "(calibration.json) and print validation and test metrics before and after.")
    cal.add_argument("run", help="run folder")
    cal.add_argument("--method", default="temperature", choices=["temperature", "vector", "platt"],
                     help="temperature (one scale; never changes a prediction) or vector (a scale and bias "
                          "per class); for a multi-label run, temperature (one per label) or platt (a scale and "
                          "bias per label); neither changes which labels it predicts (temperature)")
    add_options(cal, "--checkpoint", "--device", "--allow-data-change")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser = _Parser(prog="imgcls", description=DESCRIPTION, parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub, common)
    _lr_find_parser(sub, common)
    _eval_parsers(sub, common)
    _use_parsers(sub, common)
    _compare_parsers(sub, common)
    _audit_parser(sub, common)
    _shard_parser(sub, common)
    return parser


def _use_parsers(sub, common) -> None:
    pr = sub.add_parser("predict", parents=[common], help="classify image files with a run or an export")
    pr.add_argument("run", help="run folder, a .onnx file or a safetensors folder written by imgcls export")
    pr.add_argument("images", nargs="*", help="image files, folders (recursive) and globs, mixed; or one shard set "
                    "(a folder written by imgcls shard, or a brace pattern of its tar files)")
    pr.add_argument("--out", help="write rows to a .csv, .jsonl or .parquet file (with a progress bar)")
    add_options(pr, "--topk", "--json", "--checkpoint", "--device", "--list", "--tta", "--reject", "--target-accuracy",
                "--coverage", "--batch-size", "--workers", "--quiet")

    exp = sub.add_parser("export", parents=[common], help="export a run to ONNX and safetensors, with a parity "
                         "proof and MODEL_CARD.md")
    exp.add_argument("run", help="run folder")
    exp.add_argument("--out", help="export folder (default RUN/export)")
    add_options(exp, "--format", "--opset", "--quantize", "--checkpoint")

    _serve_parser(sub, common)

    cam = sub.add_parser("cam", parents=[common], help="Grad-CAM heat-maps over image files",
                         description="Explain a run's (or a safetensors export's) predictions: the heat-map of the "
                                     "chosen class over each image (CNNs: last convolutional stage; ViTs: patch "
                                     "tokens before the last attention). All images run as one batch.")
    cam.add_argument("run", help="run folder or safetensors export folder")
    cam.add_argument("images", nargs="+", help="image files")
    cam.add_argument("--out", default="cam", help="folder for the overlays (cam)")
    add_options(cam, "--class", "--method", "--checkpoint")


def _serve_parser(sub, common) -> None:
    srv = sub.add_parser("serve", parents=[common], help="serve a run or an export over HTTP (needs imgcls[serve])",
                         description="POST /v1/predict answers as imgcls predict does, POST /v1/explain draws "
                                     "Grad-CAM (runs and safetensors exports); GET /v1/model, /v1/drift, "
                                     "/metrics (Prometheus), /healthz, /readyz, / (a page to drop an image on), "
                                     "/docs (OpenAPI). SIGTERM finishes the requests in flight, then exits 0.")
    srv.add_argument("source", help="run folder, a .onnx file or a safetensors folder written by imgcls export")
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    srv.add_argument("--port", type=integer, default=8000, help="TCP port (8000)")
    srv.add_argument("--max-batch", type=integer, default=32, help="images scored together at most; 1 turns "
                                                                "micro-batching off (32)")
    srv.add_argument("--max-wait-ms", type=decimal, default=5.0, help="how long a batch waits for more images (5)")
    srv.add_argument("--max-queue", type=integer, default=256, help="images waiting at most; past it 503 (256)")
    srv.add_argument("--max-bytes", type=integer, default=20 << 20, help="largest request body in bytes (20 MiB)")
    srv.add_argument("--header-timeout", type=decimal, default=10.0,
                     help="seconds a request's headers may take to arrive; then 408 and the connection closed (10)")
    srv.add_argument("--body-timeout", type=decimal, default=30.0, help="seconds a body may take to arrive (30)")
    srv.add_argument("--drain-timeout", type=integer, default=30, help="seconds in-flight requests get on SIGTERM (30)")
    srv.add_argument("--max-connections", type=integer, default=512, help="requests in flight at most; past them 503 "
                                                                      "(512)")
    srv.add_argument("--drift-window", type=integer, default=1000, help="served images drift is measured over (1000)")
    srv.add_argument("--drift-psi", type=decimal, default=0.25, help="PSI above which drift is logged (0.25)")
    add_options(srv, "--topk", "--checkpoint", "--device", "--reject", "--target-accuracy", "--coverage",
                "--batch-size")


# train's options that change what augment-preview draws
PREVIEW_FIELDS = ("data", "data_dir", "img_size", "aug", "crop_padding", "crop_fill", "random_erasing", "mixup",
                  "cutmix", "mix_prob", "mix_switch_prob", "label_smoothing", "seed")


def _compare_parsers(sub, common) -> None:
    rep = sub.add_parser("report", parents=[common], help="one self-contained HTML report of a run or a comparison",
                         description="For a run: metrics, calibration, TTA, confusion, Grad-CAM and top losses in "
                                     "RUN/report/report.html. For an imgcls compare folder: the results table and "
                                     "charts in FOLDER/report.html, linking a report for every run.")
    rep.add_argument("path", help="run folder or compare folder")
    add_options(rep, "--tta", "--device", "--allow-data-change",
                tta={"default": "flip", "help": "test-time augmentation the report compares against none (flip)"})

    sub.add_parser("models", parents=[common], help="list the registered models with parameter counts")

    cmp_ = sub.add_parser("compare", parents=[common], help="train variants over seeds and compare them",
                          description="Run an experiment file, or the flag form (--data and --models). "
                                      "Finished runs in --out are kept; rerunning does only what is left.")
    cmp_.add_argument("experiment", nargs="?", help="experiment YAML (see experiments/)")
    cmp_.add_argument("--data", help="flag form: dataset for every variant")
    cmp_.add_argument("--models", help="flag form: comma-separated models, one variant each")
    cmp_.add_argument("--epochs", type=integer, help="flag form: epochs for every variant")
    cmp_.add_argument("--seeds", default=None, help="comma-separated seeds (default: the file's, else 0)")
    cmp_.add_argument("--out", required=True, help="folder for all runs and the results files")
    add_options(cmp_, "--data-dir", "--quiet")

    prev = sub.add_parser("augment-preview", parents=[common], help="draw originals next to augmented versions",
                          description="The augmentation train would apply, drawn: every flag is train's.")
    _add_train_flags(prev, PREVIEW_FIELDS)
    prev.add_argument("--n", type=integer, default=8, help="images per row (8)")
    prev.add_argument("--out", default="augment-preview.png", help="PNG file to write (augment-preview.png)")


def cmd_train(args) -> int:
    from imgcls.config import build_config

    flags = {name: getattr(args, name) for name in FIELDS}
    auto = args.resume == "auto"
    if auto:
        if args.allow_data_change:
            raise UserError("--resume auto continues a run only on the data it was trained on; drop "
                            "--allow-data-change (or continue it with --resume RUN --allow-data-change)")
        cfg = build_config(args.recipe, **flags)
        if not cfg.out:
            raise UserError("--resume auto needs --out RUN: the run folder to start, or to continue when it exists")
    elif args.resume:
        given = sorted(k for k, v in flags.items() if v is not None and k != "quiet")
        if given or args.recipe:
            names = ", ".join(map(flag, given)) or "--recipe"
            raise UserError(f"--resume continues a run with its saved config; drop {names}")
        cfg = None
    else:
        if args.allow_data_change:
            raise UserError("--allow-data-change is for --resume; a new run records the data as it is")
        cfg = build_config(args.recipe, **flags)
    quiet = args.quiet or (cfg is not None and cfg.quiet)
    if not quiet and "RANK" not in os.environ:  # under torchrun rank 0's run header is the first line
        _about(f"train: resuming {args.resume}" if cfg is None else
               f"train: {cfg.model} on {cfg.data}, {cfg.epochs} epoch{'s' * (cfg.epochs != 1)}; "
               + (f"starts or continues {cfg.out}" if auto else f"writes {cfg.out or 'a new folder under runs/'}"))
    from imgcls.reporting.console import print_summary
    from imgcls.rundir import SUMMARY, read_json
    from imgcls.training.distributed import launched_rank
    from imgcls.training.train import fit

    run = fit(cfg, auto_resume=auto) if cfg is not None else fit(resume=args.resume, quiet=args.quiet,
                                                                 allow_data_change=args.allow_data_change)
    if launched_rank() == 0:  # under torchrun the others stay quiet
        print_summary(read_json(run / SUMMARY))
    return 0


def _about(line: str) -> None:
    """A command's first line, printed before torch is imported, so that it comes within a second or two:
    what the command is about to do and where it writes (its phases then show progress on stderr)."""
    print(line, flush=True)


def _run_config(run) -> dict:
    """A run's config.yaml as a mapping, read without torch; {} when it cannot be read (the command that needs it
    then says why)."""
    from imgcls.yamlio import load_yaml_mapping

    try:
        return load_yaml_mapping(Path(run) / "config.yaml", "the run's config")
    except (UserError, OSError):
        return {}


def _run_facts(run) -> str:
    """' (model, img_size px, data; eval precision)' from a run's config.yaml, for a first line; '' when it
    cannot be read."""
    cfg = _run_config(run)
    try:
        return (f" ({cfg['model']}, {cfg['img_size']} px, {Path(str(cfg['data'])).name}; "
                f"{cfg.get('eval_precision', 'fp32')} inference)")
    except (KeyError, TypeError):
        return ""


def _existing(paths) -> set[Path]:
    """The files among `paths` that exist now: taken before a command writes, for its summary line."""
    return {Path(p).resolve() for p in paths if Path(p).is_file()}


def _wrote(paths, existed: set[Path]) -> str:
    """The summary line of what a command wrote, saying which files it replaced: nothing is overwritten unsaid."""
    paths = [Path(p) for p in paths]
    replaced = [p for p in paths if p.resolve() in existed]
    said = f"wrote {', '.join(map(str, paths))}"
    return said + (f" (replaced the existing {', '.join(map(_replaced_name, replaced))})" if replaced else "")


def _replaced_name(path: Path) -> str:
    """The replaced file's name; through a link, the file the link points to (the link itself is kept)."""
    return f"{path.resolve()} through the link {path.name}" if path.is_symlink() else path.name


def cmd_lr_find(args) -> int:
    from imgcls.config import build_config

    flags = {name: getattr(args, name) for name in FIELDS if name != "out"}  # --out is the plot here
    cfg = build_config(args.recipe, **flags)
    _about(f"lr-find: {cfg.model} on {cfg.data}, rates from {args.start_lr:g} to {args.end_lr:g}; writes {args.out}")
    from imgcls.rundir import refuse_run_file
    from imgcls.training.lr_find import describe, run_lr_find

    refuse_run_file(args.out, within=_folders(cfg.data, cfg.data_dir))  # the plot would replace a training image
    existed = _existing([args.out])
    result, plot = run_lr_find(cfg, cfg.device, args.start_lr, args.end_lr, args.steps, args.out)
    for line in describe(result, args.start_lr, args.end_lr, group_lrs=cfg.group_lrs is not None):
        print(line)
    print(_wrote([plot], existed))
    return 0


def cmd_eval(args) -> int:
    data = f" of {args.data}" if args.data else ""
    tta = f", plain and with --tta {args.tta}" if args.tta != "none" else ""
    ood = f", then OOD against {args.ood}" if args.ood else ""
    _about(f"eval {args.run}{_run_facts(args.run)}: the {args.split} split{data} with its {args.checkpoint} "
           f"checkpoint{tta}{ood}")
    from imgcls.evaluation import evaluate
    from imgcls.reporting.console import print_eval

    if args.ood:  # a wrong --ood folder is said before the evaluation, not after it
        from imgcls.evaluation.rejection import ood_paths
        from imgcls.rundir import require_run

        ood_paths(args.ood, require_run(args.run))
    replaced = evaluate.eval_out(args.run, args.split, args.data, args.out).exists()
    result, out = evaluate.evaluate_run(args.run, args.split, args.data, args.data_dir, args.checkpoint, args.device,
                                        args.tta, args.allow_data_change, args.out)
    print_eval(result, args.split, args.run)
    if args.ood:
        from imgcls.evaluation.rejection import evaluate_ood
        from imgcls.reporting.console import format_ood

        print(format_ood(evaluate_ood(args.run, args.ood, args.split, args.checkpoint, args.device, out)))
    print(f"wrote {out}" + (" (replaced the earlier results)" if replaced else ""))
    return 0


def cmd_calibrate(args) -> int:
    _about(f"calibrate {args.run}{_run_facts(args.run)}: fits {args.method} scaling on the val split with its "
           f"{args.checkpoint} checkpoint; writes {Path(args.run) / 'calibration.json'}")
    from imgcls.evaluation.evaluate import calibrate_run
    from imgcls.reporting.console import print_calibration
    from imgcls.rundir import CALIBRATION

    existed = _existing([Path(args.run) / CALIBRATION])
    print_calibration(calibrate_run(args.run, args.method, args.checkpoint, args.device, args.allow_data_change),
                      args.run)
    print(_wrote([Path(args.run) / CALIBRATION], existed))
    return 0


PREDICT_COUNTS = {"topk": (1, 1000), "batch_size": (1, 65536), "workers": (0, 64)}  # the flags' bounds


def _check_predict_counts(args) -> None:
    for name, (low, high) in PREDICT_COUNTS.items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            flag = "--" + name.replace("_", "-")
            shown = str(value) if len(str(value)) <= 20 else f"{value:.3g}"
            raise UserError(f"{flag} {shown} is out of range; pass a whole number from {low} to {high}"
                            if value > high else f"{flag} {value} must be at least {low}; e.g. {flag} {max(low, 2)}")


def cmd_predict(args) -> int:
    if args.out and not args.quiet:  # without --out, stdout holds only the rows
        what = args.list or (args.images[0] if len(args.images) == 1 else f"{len(args.images)} paths")
        _about(f"predict: {what} with {args.run}; writes {args.out}")
    from imgcls import rundir
    from imgcls.data.shards import is_shards
    from imgcls.evaluation.evaluate import parse_tta_flag
    from imgcls.inference.exported import open_engine
    from imgcls.inference.files import collect_paths, predict_rows, shard_rows
    from imgcls.progress import track
    from imgcls.reporting.predictions import check_out, format_row, write_rows
    from imgcls.runtime import resolve_device

    _check_predict_counts(args)
    out = check_out(args.out) if args.out else None
    tta = parse_tta_flag(args.tta)
    engine = open_engine(args.run, args.checkpoint, args.batch_size, resolve_device(args.device))
    if engine.multilabel and args.reject not in (None, "off"):
        raise UserError("--reject says 'unknown' below one confidence; a multi-label model decides each label at its "
                        "own threshold (tuned on val) and may give none: drop --reject")
    threshold = engine.threshold(args.reject, args.target_accuracy, args.coverage)
    shards = [name for name in args.images if is_shards(name)]
    if shards and (len(args.images) > 1 or args.list):
        raise UserError(f"{shards[0]} is a shard set; predict one shard set at a time, without other files or --list")
    paths = [Path(shards[0])] if shards else collect_paths(args.images, args.list)
    if out is not None:  # nor into a folder it reads: the next predict of that folder would read the rows
        read = rundir.folders(*(name for name in args.images if Path(name).is_dir() or is_shards(name)))
        rundir.refuse_run_file(out, inputs=(args.list, *paths), within=read)
    if shards:
        count, rows = shard_rows(engine, shards[0], args.topk, tta, threshold)
    else:
        count, rows = len(paths), predict_rows(engine, paths, args.topk, tta, threshold, args.workers)
    if out is None:
        rows = list(rows)
        if args.json:
            print(json.dumps([{"image": r["path"], **r} for r in rows], indent=2, allow_nan=False))
        else:
            print("\n".join(format_row(r) for r in rows))
        return 0
    start = time.perf_counter()
    counts = write_rows(track(rows, count, "predict", enabled=not args.quiet), out, args.topk)
    rule = "" if threshold is None else f", {counts['rejected']} rejected below {threshold:.4f}"
    replaced = f" (replaced the existing {_replaced_name(Path(out))})" if counts["replaced"] else ""
    print(f"wrote {out}{replaced}: {counts['images']} files, {counts['errors']} unreadable{rule}; "
          f"{counts['images'] / max(time.perf_counter() - start, 1e-9):.0f} images/s")
    return 0


def cmd_serve(args) -> int:
    from imgcls.serving.server import serve
    from imgcls.serving.settings import ServeSettings

    return serve(args.source, ServeSettings(
        host=args.host, port=args.port, checkpoint=args.checkpoint, device=args.device, batch_size=args.batch_size,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, max_bytes=args.max_bytes,
        header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout, drain_timeout_s=args.drain_timeout,
        max_connections=args.max_connections, reject=args.reject,
        target_accuracy=args.target_accuracy, coverage=args.coverage, topk=args.topk, drift_window=args.drift_window,
        drift_min_images=min(200, args.drift_window), drift_psi=args.drift_psi))


def cmd_export(args) -> int:
    formats = "ONNX and safetensors" if args.format == "all" else args.format
    _about(f"export {args.run}{_run_facts(args.run)}: {formats} from its {args.checkpoint} checkpoint, each proved "
           f"against the run on the val split; writes {args.out or Path(args.run) / 'export'}")
    from imgcls.export import export_run
    from imgcls.reporting.console import format_int8, format_parity

    result = export_run(args.run, args.format, args.out, args.opset, args.checkpoint, quantize=args.quantize)
    for parity in result["parity"].values():
        print(format_parity(parity) if "max_abs_prob_diff" in parity else format_int8(parity))
    print(f"wrote {result['out']}: {', '.join(result['files'])}")
    return 0


def cmd_cam(args) -> int:
    _about(f"cam: {args.method} of {len(args.images)} image{'s' * (len(args.images) != 1)} with {args.run}; "
           f"writes {args.out}/")
    from imgcls.evaluation.cam import explain_files
    from imgcls.inference.exported import open_engine
    from imgcls.reporting.figures import cam_overlay_paths, save_cam_overlays
    from imgcls.rundir import is_run, refuse_run_file

    stems = [Path(p).stem for p in args.images]
    trained_on = _folders(_run_config(args.run).get("data")) if is_run(Path(args.run)) else ()
    for target in cam_overlay_paths(stems, Path(args.out)):  # before any work: an input replaced, or a PNG
        refuse_run_file(target, inputs=tuple(args.images), within=trained_on)  # added to the run's training images
    engine = open_engine(args.run, args.checkpoint)
    images, cams, classes, probs = explain_files(engine, args.images, args.class_name, args.method)
    names = engine.classes
    captions = [f"{args.method} for '{names[c]}' (p = {probs[i, c]:.2f}); predicted '{names[probs[i].argmax()]}'"
                for i, c in enumerate(classes.tolist())]
    existed = _existing(Path(args.out).iterdir() if Path(args.out).is_dir() else [])
    for path in save_cam_overlays(images, cams, captions, stems, Path(args.out)):
        print(_wrote([path], existed))
    return 0


def cmd_report(args) -> int:
    if (Path(args.path) / "results.json").is_file():
        _about(f"report {args.path}: a report for each run not reported yet, then the comparison; writes "
               f"{Path(args.path) / 'report.html'}")
    else:
        _about(f"report {args.path}{_run_facts(args.path)}: scores the test split (plain and with --tta {args.tta}), "
               f"Grad-CAM on a gallery, figures; writes {Path(args.path) / 'report' / 'report.html'}")
    from imgcls.evaluation.analysis import analyze_run, report_is_current
    from imgcls.reporting.html import write_comparison_report, write_run_report
    from imgcls.rundir import REPORT_DIR, REPORT_HTML, require_run
    from imgcls.training.compare import comparison_runs

    path = Path(args.path)
    if (path / "results.json").is_file():  # a comparison: a report per run, then the overview
        existed = _existing([path / "report.html"])
        reports = {}
        for label, run in comparison_runs(path):  # runs inside `path`, even in a copied comparison
            if not report_is_current(run, args.tta):  # absent, stale, or another run's copied in
                analyze_run(run, args.tta, device=args.device, allow_data_change=args.allow_data_change)
                write_run_report(run)
            reports[label] = run / REPORT_DIR / REPORT_HTML
        out = write_comparison_report(path, reports)
    else:
        require_run(path)
        existed = _existing([path / REPORT_DIR / REPORT_HTML])
        analyze_run(path, args.tta, device=args.device, allow_data_change=args.allow_data_change)
        out = write_run_report(path)
    print(_wrote([out], existed))
    return 0


def cmd_models(args) -> int:
    import torch

    from imgcls.models import count_parameters, create_model, list_models
    from imgcls.reporting.console import print_models

    rows = []
    for spec in list_models():
        num_classes = 10 if spec.img_size <= 32 else 1000
        with torch.device("meta"):  # counts parameters without allocating them
            model = create_model(spec.name, num_classes)
        head = count_parameters(model.get_classifier())
        rows.append({"name": spec.name, "backbone_params": count_parameters(model) - head, "head_params": head,
                     "img_size": spec.img_size, "family": spec.family, "description": spec.description,
                     "num_classes": num_classes})
    print_models(rows)
    return 0


def cmd_compare(args) -> int:
    if not args.quiet:
        _about(f"compare {args.experiment or args.models}: trains what is not trained yet; writes {args.out}")
    from imgcls.reporting.figures import comparison_charts
    from imgcls.reporting.tables import aggregate, to_text, write_tables
    from imgcls.training.compare import experiment_from_flags, parse_seeds, read_experiment, run_experiment

    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    if args.experiment:
        if args.models or args.data or args.epochs is not None:
            raise UserError("give either an experiment file or --data/--models/--epochs, not both; "
                            "set data and epochs in the file")
        exp = read_experiment(args.experiment)
        exp.seeds = seeds or exp.seeds
    elif args.data and args.models:
        exp = experiment_from_flags(args.data, args.models.split(","), args.epochs, seeds or [0], {})
    else:
        raise UserError("pass an experiment file, or --data and --models for the flag form")
    if not args.quiet:
        runs = len(exp.variants) * len(exp.seeds)
        print(f"{exp.name}: {len(exp.variants)} variants x {len(exp.seeds)} seeds = {runs} runs on "
              f"{exp.train.get('data', 'cifar10-mini')}", flush=True)
    out = Path(args.out)
    from imgcls.rundir import refuse_run_file

    datas = [exp.train.get("data"), *(v.get("data") for v in exp.variants.values())]
    refuse_run_file(out, within=_folders(*datas, args.data_dir))  # runs into the images would become images
    existed = _existing(out.glob("*.*") if out.is_dir() else [])
    records = run_experiment(exp, args.out, args.data_dir, args.quiet)
    rows = aggregate(records)
    write_tables(rows, out)
    charts = comparison_charts(records, out)
    print(to_text(rows))
    written = [out / name for name in ("results.json", "results.csv", "results.md")] + list(charts)
    print(_wrote(written, existed))
    return 0


def _folders(*paths: str | None) -> tuple[str, ...]:
    from imgcls.rundir import folders

    return folders(*paths)


def cmd_augment_preview(args) -> int:
    from imgcls.config import build_config, check_crop_padding
    from imgcls.data import TrainTransform, load_dataset
    from imgcls.data.presets import PixelRecipe
    from imgcls.data.preview import preview_rows
    from imgcls.reporting.figures import image_grid
    from imgcls.rundir import refuse_run_file

    cfg = build_config(**{name: getattr(args, name) for name in PREVIEW_FIELDS})  # validates the options
    refuse_run_file(args.out, within=_folders(cfg.data, cfg.data_dir))  # the grid would replace a training image
    dataset = load_dataset(cfg.data, cfg.data_dir, cfg.img_size)
    check_crop_padding(cfg.crop_padding, dataset.img_size)  # as train checks it
    erasing = erasing_probability(cfg.aug, cfg.random_erasing)
    transform = TrainTransform(PixelRecipe.of(cfg), dataset.img_size, dataset.mean, dataset.std, dataset.num_classes,
                               erasing, cfg.mixup, cfg.cutmix, cfg.mix_prob, cfg.mix_switch_prob, cfg.label_smoothing)
    rows, captions, titles = preview_rows(dataset, transform, args.n, seed=cfg.seed)
    existed = _existing([args.out])
    print(_wrote([image_grid(rows, captions, titles, Path(args.out))], existed))
    return 0


def _audit_parser(sub, common) -> None:
    aud = sub.add_parser("audit", parents=[common], help="check a dataset before training: imbalance, duplicates, "
                         "leakage across splits, unreadable and unusual files; --labels: probably wrong labels",
                         description="Counts per class and split, exact and near-duplicate pairs (across splits: "
                                     "leakage), and for folders and manifests unreadable, tiny, extreme-aspect, "
                                     "non-RGB and EXIF-rotated files; a summary, a JSON file and a suggested train "
                                     "command. With --labels, also the images whose label is probably wrong: "
                                     "out-of-fold probabilities by K-fold cross-validation, ranked by confident "
                                     "learning (cleanlab), written to a CSV that train --exclude reads.")
    aud.add_argument("data", help="cifar10, cifar10-mini, an image folder, a manifest (.csv/.jsonl, one or "
                                  "several labels per image) or shards written by imgcls shard, as --data in train")
    aud.add_argument("--img-size", type=integer, help="the size you will train at; folder images under half of it are "
                                                  "reported as small (64); with --labels, the size the label "
                                                  "model sees (default: its own)")
    aud.add_argument("--out", default="audit.json", help="JSON report (audit.json); --labels adds "
                                                         "<out>-label-issues.csv")
    add_options(aud, "--data-dir", "--max-distance", "--html", "--quiet")
    labels = aud.add_argument_group("label errors (--labels; needs imgcls[labels])")
    labels.add_argument("--labels", action="store_true", help="find the images whose label is probably wrong")
    labels.add_argument("--folds", type=integer, help="cross-validation folds (5)")
    labels.add_argument("--label-model", metavar="MODEL", help="the model that scores each fold: one with pretrained "
                        "weights trains a linear head on its frozen features, any other trains from scratch "
                        "(default: efficientnet_lite0 features for photos, fastnet_cifar_small for 32 px images)")
    labels.add_argument("--label-recipe", metavar="YAML", help="train options for each fold's model, as train "
                        "--recipe takes them (trained from scratch)")
    labels.add_argument("--label-epochs", type=integer, metavar="N", help="epochs of each fold's model trained from "
                        "scratch (10)")
    labels.add_argument("--seed", type=integer, help="seed of the folds and of the fold models (0)")


def cmd_audit(args) -> int:
    if not args.quiet:
        what = ", probable label errors" if args.labels else ""
        _about(f"audit {args.data}: counts, exact and near duplicates, leakage, unusual files{what}; writes {args.out}")
    from imgcls.data.audit import audit
    from imgcls.reporting.audit_report import (
        check_out,
        label_issues_path,
        print_audit,
        write_audit_html,
        write_audit_json,
        write_label_issues_csv,
    )

    label_flags = {"--folds": args.folds, "--label-model": args.label_model, "--label-recipe": args.label_recipe,
                   "--label-epochs": args.label_epochs, "--seed": args.seed}
    given = [flag for flag, value in label_flags.items() if value is not None]
    if given and not args.labels:
        raise UserError(f"{', '.join(given)} {'is an option' if len(given) == 1 else 'are options'} of --labels; add "
                        "--labels, or drop them")
    out = Path(args.out)
    # a list, not a dict: with --out X.html, X.html is both the .json and the .html target, and both are checked
    targets = [(out, ".json"), *([(out.with_suffix(".html"), ".html")] if args.html else []),
               *([(label_issues_path(out), ".csv")] if args.labels else [])]
    for target, suffix in targets:  # every output checked before the work, never after it
        check_out(target, suffix, within=_folders(args.data, args.data_dir),
                  flag="--out" if target == out else f"--out {args.out} (its {suffix[1:]} file)")
    if args.labels:
        from imgcls.data.shards import is_shards
        from imgcls.evaluation.label_issues import check_installed
        from imgcls.training.out_of_fold import check_label_options

        if is_shards(args.data):
            raise UserError("--labels trains K models on images held in memory, which shards are written not to be; "
                            "audit --labels the folder or manifest the shards were written from")
        check_installed()
        folds, seed = 5 if args.folds is None else args.folds, 0 if args.seed is None else args.seed
        check_label_options(folds, args.label_epochs, seed)
    result = audit(args.data, args.data_dir, args.img_size, args.max_distance, progress=not args.quiet)
    if args.labels:
        from imgcls.training.out_of_fold import label_audit

        result.add_labels(*label_audit(args.data, args.data_dir, folds, args.label_model, args.label_recipe,
                                       args.label_epochs, args.img_size, seed, progress=not args.quiet))
    print_audit(result)
    existed = _existing(target for target, _ in targets)
    written = [write_audit_json(result, Path(args.out))]
    if args.labels:
        written.append(write_label_issues_csv(result, label_issues_path(Path(args.out))))
    if args.html:
        written.append(write_audit_html(result, Path(args.out).with_suffix(".html")))
    print(_wrote(written, existed))
    return 0


def _shard_parser(sub, common) -> None:
    sh = sub.add_parser("shard", parents=[common], help="write a dataset as WebDataset tar shards that train, eval, "
                        "predict and audit stream",
                        description="Every split of DATA (val carved as train would carve it), resized once to "
                        "--img-size, written as WebDataset tar shards (SPLIT-NNNNNN.tar: .cls and .png or .jpg per "
                        "sample, in a seeded random order) with shards.json (classes, counts, sizes, labels, "
                        "digests). train --data DIR (or a brace pattern of its tar files) then streams them.")
    sh.add_argument("data", help="cifar10, cifar10-mini or an image folder, as --data in train")
    sh.add_argument("--out", required=True, help="the new folder of shards (must not exist)")
    sh.add_argument("--shard-size", type=integer, default=1000, help="samples per shard (1000)")
    sh.add_argument("--img-size", type=integer, help="the size every image is resized to, once (64; 32 for the "
                                                      "built-in sets)")
    sh.add_argument("--val-fraction", type=decimal, default=0.1, help="of train held out as val when DATA has no val/ "
                                                                     "(0.1)")
    sh.add_argument("--split-seed", type=integer, default=0, help="seed of that split and of the shards' order (0)")
    sh.add_argument("--image-format", choices=("png", "jpg"), default="png", help="png: lossless, the pixels a folder "
                    "run trains on (the default); jpg: quality 95, smaller and faster to decode")
    add_options(sh, "--data-dir", "--quiet")


def cmd_shard(args) -> int:
    from imgcls.config import build_config

    if not 1 <= args.shard_size <= 1_000_000:
        raise UserError(f"--shard-size must be from 1 to 1000000 samples (got {args.shard_size}); e.g. 1000")
    # the options train shares are checked as train checks them (bounds, float32)
    build_config(data=args.data, data_dir=args.data_dir, img_size=args.img_size, val_fraction=args.val_fraction,
                 split_seed=args.split_seed)
    if not args.quiet:
        _about(f"shard {args.data}: every split resized once and written as tar shards of {args.shard_size}; "
               f"writes {args.out}")
    from imgcls.data import load_dataset
    from imgcls.data.manifest import is_manifest
    from imgcls.data.shards import is_shards, write_shards
    from imgcls.rundir import refuse_run_file

    if is_manifest(args.data) or is_shards(args.data):
        raise UserError(f"{args.data}: shards are written from cifar10, cifar10-mini or an image folder of class "
                        "folders (one class per image)")
    refuse_run_file(args.out, within=_folders(args.data, args.data_dir))
    dataset = load_dataset(args.data, args.data_dir, args.img_size, args.val_fraction, args.split_seed, workers=2)
    manifest = write_shards(dataset, Path(args.out), args.shard_size, seed=args.split_seed,
                            say=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
                            image_format=args.image_format)
    counts = ", ".join(f"{name} {p['count']} in {len(p['shards'])} shard{'s' * (len(p['shards']) != 1)}"
                       for name, p in manifest["splits"].items())
    print(f"wrote {args.out}: {counts}, {manifest['img_size']} px {args.image_format.upper()}")
    return 0


COMMANDS = {"train": cmd_train, "lr-find": cmd_lr_find, "eval": cmd_eval, "calibrate": cmd_calibrate,
            "predict": cmd_predict, "cam": cmd_cam, "report": cmd_report, "models": cmd_models, "compare": cmd_compare,
            "augment-preview": cmd_augment_preview, "export": cmd_export, "audit": cmd_audit,
            "serve": cmd_serve, "shard": cmd_shard}


def parse(argv: list[str] | None):
    """argparse, except that predict's images may also follow its options (`predict RUN --checkpoint last a.jpg`),
    which argparse alone leaves as unrecognized."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "predict" and not any(e.startswith("-") for e in extra):
        args.images += extra
    elif extra:
        parser.parse_args(argv)  # argparse's own message for what it does not know
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from imgcls.training.stops import Interrupted

    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        print(f"imgcls: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        return _interrupted(e)
    except KeyboardInterrupt:
        print("imgcls: aborted", file=sys.stderr)
        return 130
    except Exception as e:  # anything unforeseen still gets one line; --debug shows the traceback
        if args.debug:
            raise
        if isinstance(e, OSError) and e.filename is not None:
            # a path the system refuses (a name over 255 bytes, a folder where a file goes, no permission) is the
            # user's to fix, wherever in a command it is opened
            print(f"imgcls: error: {shown(os.fsdecode(e.filename))}: {e.strerror or first_line(e)}; check the path "
                  "or pass another", file=sys.stderr)
            return 2
        print(f"imgcls: error: {type(e).__name__}: {shown(first_line(e, 300))} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def _interrupted(e) -> int:
    """Ctrl-C, SIGTERM or SIGUSR1 stopped training after saving: say how to continue; exit as the signal would."""
    import signal

    from imgcls.training.distributed import launched_rank

    if launched_rank() == 0:
        print(f"imgcls: {e}; continue with: imgcls train --resume {e.run_dir} (under torchrun: the same "
              "torchrun command with these arguments; with --resume auto: the same command)", file=sys.stderr)
    return 128 + (e.signum or signal.SIGINT)
