"""int8 against fp32 ONNX, per run: `imgcls export RUN --format onnx --quantize int8` into a temporary folder,
and the proof it writes into parity.json (top-1 agreement on validation, accuracy of both files on
validation and test, ms per image at batch 1 and 64), as one Markdown table row per run.

    python bench/int8_table.py runs/resnet18 runs/vit runs/convnext runs/lite0 [--timing 20 3]

A run whose int8 file is refused (agreement under 99%, or more than 1 point of accuracy lost) gets the
refusal's line instead of figures: that is the export's answer too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from imgcls.errors import UserError
from imgcls.export import PARITY, export_run


def row(run: str, timing: tuple[int, int]) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            export_run(run, "onnx", Path(tmp) / "export", timing=timing, quantize="int8")
        except UserError as e:
            return f"| {run} | refused: {e} |"
        proof = json.loads((Path(tmp) / "export" / PARITY).read_text())["results"]["int8"]
    acc, ms = proof["accuracy"], proof["latency_ms_per_image"]
    cells = [f"{proof['top1_agreement']:.2%} of {proof['images']}"]
    cells += [f"{acc[s]['fp32']:.2%} / {acc[s]['int8']:.2%}" if s in acc else "-" for s in ("val", "test")]
    cells += [f"{ms['fp32'][b]:.2f} / {ms['int8'][b]:.2f} ({ms['fp32'][b] / ms['int8'][b]:.2f}x)"
              for b in ("batch1", "batch64")]
    return f"| {run} | " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--timing", type=int, nargs=2, default=[20, 3], metavar=("BATCH1", "BATCH64"),
                        help="timed calls at batch 1 and at batch 64")
    args = parser.parse_args()
    print("| run | top-1 agreement (val) | val acc fp32 / int8 | test acc fp32 / int8 | ms/image batch 1 fp32 / "
          "int8 | ms/image batch 64 fp32 / int8 |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        print(row(run, tuple(args.timing)), flush=True)


if __name__ == "__main__":
    main()
