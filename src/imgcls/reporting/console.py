"""Terminal output for results: plain dicts in, rich tables out."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from imgcls.export.model_card import FEW_IMAGES
from imgcls.options import DEFAULT_CONFIDENCE, DEFAULT_TARGET_ACCURACY

LOG_WIDTH = 250  # columns of output that goes to a file or a pipe


def _console() -> Console:
    """The terminal's width in a terminal; in a log or a pipe, wide enough that a table takes its content's
    width (rich would assume 80 columns, cut class names to four letters and split headers over rows)."""
    terminal = Console()
    return terminal if terminal.is_terminal else Console(width=LOG_WIDTH)


console = _console()
FEW_PARITY_IMAGES = FEW_IMAGES  # below this, one image moves the agreement by a percent or more


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def print_summary(summary: dict) -> None:
    table = Table(title=f"run {summary['run']}", show_header=False)
    if summary.get("val_split", True):
        accuracy = [("val accuracy, best epoch", f"{_pct(summary['best_val_acc'])} (epoch {summary['best_epoch']}/"
                                                 f"{summary['epochs']})"),
                    ("test accuracy, selected on val", _pct(summary["test_acc"])),
                    ("test accuracy, final epoch", _pct(summary["test_acc_final"]))]
    else:  # --val-fraction 0: best.pt is the final epoch
        accuracy = [("checkpoint", f"final epoch ({summary['best_epoch']}/{summary['epochs']}): no validation split"),
                    ("test accuracy, final epoch", _pct(summary["test_acc"]))]
    rows = [
        ("model", f"{summary['model']} ({summary['params'] / 1e6:.2f}M params)"),
        ("data", f"{summary['data']} ({summary['num_classes']} classes)"),
        *accuracy,
        *_balanced_rows(summary),
        ("training time", f"{summary['train_time_s']:.1f} s ({summary['train_images_per_s']:.0f} img/s)"),
        ("forward cost", f"{summary['gflops']:.3f} GFLOPs/img"),
        ("inference", f"{summary['inference_images_per_s']:.0f} img/s"),
        ("device", f"{summary['device']} {summary['precision']}"),
    ]
    if summary.get("strategy", "scratch") != "scratch":
        trainable = f"{summary['trainable_params'] / 1e6:.3g}M trainable params"
        rows.insert(1, ("strategy", f"{summary['strategy']}, {trainable}"))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    if summary["test_split"] is None:
        console.print("this dataset has no test split: validation accuracy is the held-out figure"
                      if summary.get("val_split", True) else
                      "this dataset has no test split and the run no validation split: nothing was held out")


def _balanced_rows(summary: dict) -> list[tuple[str, str]]:
    """Balanced accuracy and macro-F1 of the val-selected checkpoint on test, when the summary holds them,
    and what chose that checkpoint when it was not validation accuracy."""
    chosen = "selected on val" if summary.get("val_split", True) else "final epoch"
    shown = ((f"test balanced accuracy, {chosen}", "test_balanced_acc"),
             (f"test macro-F1, {chosen}", "test_macro_f1"))
    rows = [(label, _pct(summary[key])) for label, key in shown if summary.get(key) is not None]
    if summary.get("monitor"):
        rows.append(("best checkpoint chosen by", str(summary["monitor"])))
    if summary.get("ended"):
        rows.append(("training ended", summary["ended"]))
    return rows


def _print_multilabel_eval(result: dict, split: str, run: str) -> None:
    console.print(f"{run} on {split} ({result['n']} images): mAP {_pct(result['map'])}, macro-F1 "
                  f"{_pct(result['macro_f1'])}, micro-F1 {_pct(result['micro_f1'])}, subset accuracy "
                  f"{_pct(result['subset_accuracy'])}, Hamming loss {result['hamming_loss']:.4f}, loss "
                  f"{result['loss']:.4f} (each label at its threshold tuned on val)", soft_wrap=True)
    table = Table("class", "AP", "threshold", "precision", "recall", "F1", "support")
    for row in result["per_class"]:
        ap = "-" if row["ap"] is None else f"{row['ap']:.3f}"
        table.add_row(row["class"], ap, f"{row['threshold']:.3f}", f"{row['precision']:.3f}", f"{row['recall']:.3f}",
                      f"{row['f1']:.3f}", str(row["support"]))
    console.print(table)
    if result.get("scaling"):
        console.print(f"calibrated: {_scaling(result['scaling'])} (fitted on val by imgcls calibrate)")
    if "tta" in result:
        console.print(_before_after(f"test-time augmentation ({result['tta']['mode']}) on {split}", "no TTA", "TTA",
                                    result["tta"]["without"], result["tta"]["with"]))
    elif "calibration" in result:
        cal = result["calibration"]
        console.print(f"per label: NLL {cal['nll']:.4f}, ECE {_pct(cal['ece'])} (worst label "
                      f"{_pct(cal['max_class_ece'])}), Brier {cal['brier']:.4f}", soft_wrap=True)


def print_eval(result: dict, split: str, run: str) -> None:
    if result.get("task") == "multilabel":
        _print_multilabel_eval(result, split, run)
        return
    head = f"{run} on {split} ({result['n']} images): accuracy {_pct(result['accuracy'])}"
    if "balanced_accuracy" in result:
        head += f", balanced accuracy {_pct(result['balanced_accuracy'])}"
    head += f", macro-F1 {_pct(result['macro_f1'])}"
    if "top5_accuracy" in result:
        head += f", top-5 {_pct(result['top5_accuracy'])}"
    head += f", loss {result['loss']:.4f}"
    console.print(head, soft_wrap=True)
    table = Table("class", "precision", "recall", "F1", "support")
    for row in result["per_class"]:
        table.add_row(row["class"], f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      str(row["support"]))
    console.print(table)
    cm = Table("true \\ predicted", *[c[:8] for c in result["classes"]], title="confusion matrix")
    for name, row in zip(result["classes"], result["confusion_matrix"], strict=True):
        cm.add_row(name, *[str(v) for v in row])
    console.print(cm)
    if result["most_confused"]:
        pairs = ", ".join(f"{p['true']} as {p['predicted']} ({p['count']})" for p in result["most_confused"])
        console.print(f"most confused: {pairs}", soft_wrap=True)
    if result.get("scaling"):
        console.print(f"calibrated: {_scaling(result['scaling'])} (fitted on val by imgcls calibrate)")
    if "tta" in result:
        console.print(_before_after(f"test-time augmentation ({result['tta']['mode']}) on {split}", "no TTA", "TTA",
                                    result["tta"]["without"], result["tta"]["with"]))
    else:
        cal = result["calibration"]
        console.print(f"NLL {cal['nll']:.4f}, ECE {_pct(cal['ece'])}, MCE {_pct(cal['mce'])}, "
                      f"classwise ECE {_pct(cal['classwise_ece'])}, Brier {cal['brier']:.4f}", soft_wrap=True)


METRIC_ROWS = (("accuracy", "accuracy", _pct), ("NLL", "nll", lambda v: f"{v:.4f}"), ("ECE", "ece", _pct),
               ("MCE", "mce", _pct), ("classwise ECE", "classwise_ece", _pct), ("Brier", "brier", lambda v: f"{v:.4f}"))


MULTILABEL_METRIC_ROWS = (("mAP", "map", _pct), ("macro-F1", "macro_f1", _pct), ("NLL (per label)", "nll",
                          lambda v: f"{v:.4f}"), ("ECE (mean over labels)", "ece", _pct),
                          ("ECE (worst label)", "max_class_ece", _pct), ("Brier (per label)", "brier",
                                                                        lambda v: f"{v:.4f}"))


def _before_after(title: str, left: str, right: str, a: dict, b: dict) -> Table:
    table = Table("metric", left, right, title=title)
    rows = METRIC_ROWS if "accuracy" in a else MULTILABEL_METRIC_ROWS
    for label, key, fmt in (r for r in rows if r[1] in a and r[1] in b):
        table.add_row(label, fmt(a[key]), fmt(b[key]))
    return table


def _scaling(scaling: dict) -> str:
    if scaling.get("temperature") is not None:
        return f"temperature {scaling['temperature']:.3f}"
    if scaling["method"] == "temperature":  # a multi-label run's, one per label
        temperatures = [1 / s for s in scaling["scale"]]
        return f"a temperature per label ({min(temperatures):.2f}-{max(temperatures):.2f})"
    return f"{scaling['method']} scaling (scales {min(scaling['scale']):.2f}-{max(scaling['scale']):.2f})"


def print_calibration(report: dict, run: str) -> None:
    console.print(f"{run}: {_scaling(report['scaling'])}, fitted on val; eval and predict apply it from now on")
    for split, m in report["splits"].items():
        console.print(_before_after(f"{split} ({'fitted here' if split == 'val' else 'held out'})", "before",
                                    "after", m["before"], m["after"]))


def print_models(rows: list[dict]) -> None:
    table = Table("name", "backbone", "head (classes)", "input", "family", "description")
    for r in rows:
        table.add_row(r["name"], _millions(r["backbone_params"]), f"{_millions(r['head_params'])} ({r['num_classes']})",
                      f"{r['img_size']}px", r["family"], r["description"])
    console.print(table)
    console.print("backbone and head: parameters; a run's model has the backbone and a head for its own classes "
                  "(for a linear head, features + 1 per class)")
    console.print("and any timm model as timm/<name> (e.g. timm/efficientnet_b0)")


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 10_000 else f"{count:,}"


def format_ood(result: dict) -> str:
    """eval --ood's table: AUROC and FPR at 95% TPR per score, and what --reject auto lets through."""
    lines = [f"OOD {result['folder']}: {result['n_ood']} images against {result['n_in']} {result['split']} images",
             f"{'score':<8} {'AUROC':>7} {'FPR@95TPR':>10}"]
    for name in ("msp", "energy"):
        lines.append(f"{name:<8} {result[name]['auroc']:>7.4f} {result[name]['fpr_at_95tpr']:>10.4f}")
    rule = result["reject_auto"]
    if rule is None:
        lines.append(f"--reject auto: no threshold (run imgcls calibrate first; or the validation images cannot "
                     f"show accuracy {DEFAULT_TARGET_ACCURACY} with {DEFAULT_CONFIDENCE:.0%} confidence)")
    else:
        lines.append(f"--reject auto (threshold {rule['threshold']:.4f}): accepts {rule['ood_accepted']:.1%} of OOD, "
                     f"{rule['in_coverage']:.1%} of {result['split']}")
    return "\n".join(lines)


def format_int8(result: dict) -> str:
    """export --quantize int8's line: agreement with fp32, the accuracy of both, latency of both."""
    lat = result["latency_ms_per_image"]
    accuracy = "; ".join(f"{name} accuracy fp32 {a['fp32']:.2%} int8 {a['int8']:.2%}"
                         for name, a in result["accuracy"].items())
    return (f"int8: agreement with fp32 {result['top1_agreement']:.2%} on {result['images']} {result['split']} "
            f"images; {accuracy}; ms/image batch 1: fp32 {lat['fp32']['batch1']:.2f} int8 {lat['int8']['batch1']:.2f}, "
            f"batch 64: fp32 {lat['fp32']['batch64']:.2f} int8 {lat['int8']['batch64']:.2f}")


def format_parity(result: dict) -> str:
    """export's line per format: agreement (with a caveat on few images), probability difference, latency."""
    lat, other = result["latency_ms_per_image"], result["format"]
    few = f" (only {result['images']} images: one image moves agreement by {1 / result['images']:.1%})" \
        if result["images"] < FEW_PARITY_IMAGES else ""
    return (f"parity {other}: {result['images']} {result.get('split', 'val')} images, "
            f"top-1 agreement {result['top1_agreement']:.2%}{few}, "
            f"max |dp| {result['max_abs_prob_diff']:.1e}; ms/image batch 1: pytorch {lat['pytorch']['batch1']:.2f} "
            f"{other} {lat[other]['batch1']:.2f}, batch 64: pytorch {lat['pytorch']['batch64']:.2f} "
            f"{other} {lat[other]['batch64']:.2f}")
