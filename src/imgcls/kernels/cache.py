"""Kernel measurements kept per machine and model shape in `$IMGCLS_CACHE_DIR/kernels.json` (default
`~/.cache/imgcls/kernels.json`). A damaged or unwritable cache is ignored, never fatal; a value read
from it is checked as a flag would be, so a hand-edited cache cannot smuggle in an impossible choice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from imgcls import rundir
from imgcls.config import FIELDS
from imgcls.kernels.choice import ATTENTION_KERNELS, DEPTHWISE_PRECISIONS, MEMORY_FORMATS, PRECISIONS

VERSION = 4  # 3: attention is sdpa or manual (pinned SDPA backends are gone); 4: precisions are measured
MAX_EVAL_BATCH = FIELDS["eval_batch_size"].metadata["high"]


def cache_path() -> Path:
    return rundir.cache_dir() / "kernels.json"


def machine(device: torch.device) -> str:
    """What timings depend on: the CUDA device's name, or the CPU's model, its vector extensions and
    torch's thread count; and torch's version."""
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        name, flags = "unknown cpu", set()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == "unknown cpu":
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
        except OSError:
            pass
        relevant = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
        what = f"{name} [{' '.join(relevant)}] {torch.get_num_threads()} threads"
    return f"{what}; torch {torch.__version__}"


def machine_busy() -> bool:
    """Whether other work competes for the cores (1-minute load above 1.5 per core). Timings taken then
    serve the run but are not cached: one burst of load elsewhere once made channels_last look 4x
    slower than contiguous for a training step, and a cached choice would have kept that for good."""
    try:
        return os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return False


def valid(field_name: str, value, device_type: str = "cpu") -> bool:
    """Whether `value` is a choice `field_name` can take on `device_type` (the bounds of the flag, for the
    batch size; no fp16 on a CPU)."""
    if field_name.startswith("precision"):
        return value in PRECISIONS and not (value == "fp16" and device_type == "cpu")
    if field_name.startswith("attention"):
        return value in ATTENTION_KERNELS
    if field_name.startswith("depthwise"):
        return value in DEPTHWISE_PRECISIONS
    if field_name == "memory_format":
        return value in MEMORY_FORMATS
    if field_name == "compile":
        return value in ("on", "off")
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_EVAL_BATCH


MAX_TIMINGS = 16  # candidates timed for one question: a few kernels, or the EVAL_BATCHES, or the GEMM probe's


def timings(hit: dict) -> dict:
    """The timings stored beside a cached choice when they look like timings (at most MAX_TIMINGS names, each a
    positive finite number of milliseconds or None); else none: a hand-edited cache cannot fill a run's plan."""
    found = hit.get("timings")
    if not isinstance(found, dict) or len(found) > MAX_TIMINGS:
        return {}
    ok = all(isinstance(k, str) and len(k) <= 40 and (v is None or (isinstance(v, float) and 0 < v < float("inf")))
             for k, v in found.items())
    return found if ok else {}


def read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def write(path: Path, key: str, entry: dict) -> None:
    try:
        entries = read(path)
        entries[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_bytes(path, (json.dumps({"version": VERSION, "entries": entries}, indent=1)
                                         + "\n").encode())
    except Exception:  # noqa: BLE001 - a cache that cannot be written costs a measurement next time, nothing more
        pass
