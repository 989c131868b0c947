"""Kernels chosen by measurement: the attention kernel and the precision of depthwise convolutions
(training and inference apart), the tensor layout, torch.compile, and the inference batch size, each
timed on the model's real shapes.

`choose_kernels` times the candidates that matter (3-14 s in all for the CIFAR models on a 2-core CPU;
compile `auto` adds its warm-up) on copies of the model, so the weights, BatchNorm statistics and random
streams of the run are untouched. An option given as a flag (anything but `auto`) is taken as given and not timed.
Results are cached per machine and model shape in `$IMGCLS_CACHE_DIR/kernels.json` (default
`~/.cache/imgcls/kernels.json`) unless the machine was busy while they were taken (`machine_busy`); a
damaged or unwritable cache is ignored, never fatal.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from imgcls.runtime import autocast

# math, flash, efficient: scaled_dot_product_attention restricted to that backend; manual: the attention
# modules' own matmul-softmax-matmul (their `fused_attn` off), which beat every backend for a bf16 training
# step of vit_cifar's 65 tokens on Zen 5 (12 vs 34 ms math, 71 ms flash, per layer at batch 128;
# bench/layer_kernels.py).
ATTENTION_BACKENDS = ("math", "flash", "efficient", "manual")
# autocast: depthwise convolutions at the run's precision; float32: in float32 under bf16/fp16 autocast (oneDNN's
# bf16 depthwise convolutions ran 1.3-2.7x slower than float32, forward and backward, for ConvNeXt's 7x7 ones
# on Zen 5; bench/layer_kernels.py).
DEPTHWISE_PRECISIONS = ("autocast", "float32")
MEMORY_FORMATS = ("channels_last", "contiguous")
EVAL_BATCHES = (64, 128, 256, 512)  # 1024 never won on the CPUs measured, and costs as much as the rest
MAX_EVAL_PIXELS = 2**21  # as predict.eval_batch_size: larger inference batches only cost memory
CACHE_VERSION = 2  # 2: manual attention and depthwise precision are candidates
# Each candidate: one warm-up call, then REPEATS timed rounds; the median.
REPEATS = 3
# A training step is timed on at most TRAIN_TIMING_BATCH images and the inference layout and attention on
# EVAL_TIMING_BATCH: the per-image shapes (tokens, heads, channels) are the model's own, and the kernels'
# relative speed does not depend on the batch, which keeps a ViT's measurement to seconds on a CPU.
TRAIN_TIMING_BATCH, EVAL_TIMING_BATCH = 32, 64
# Except the training layout: channels_last's lead grows with the batch (resnet18_cifar: none at 32 images, 11%
# at 128, Zen 5; bench/layer_kernels.py), so it is timed on the run's batch, up to LAYOUT_TIMING_PIXELS (128
# images of 32x32) a step or TRAIN_TIMING_BATCH images, whichever is more.
LAYOUT_TIMING_PIXELS = 128 * 32 * 32

# timer(kind, candidate, fn) -> milliseconds of one call of fn (`time_ms`); kind: a KernelChoice field name
Timer = Callable[[str, str, Callable[[], object]], float]


@dataclass
class KernelChoice:
    """What a run computes with. `source[field]`: "measured", "cache", "flag" or "n/a" (nothing to choose);
    `timings[field][candidate]`: the milliseconds measured (per image for eval_batch_size)."""

    attention_train: str = "n/a"  # math | flash | efficient | manual | n/a (the model has no attention to choose for)
    attention_eval: str = "n/a"
    depthwise_train: str = "n/a"  # autocast | float32 | n/a (no depthwise convolution, or no autocast)
    depthwise_eval: str = "n/a"
    memory_format: str = "channels_last"  # channels_last | contiguous
    compile: str = "off"  # on | off
    eval_batch_size: int = 512
    source: dict[str, str] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    @contextlib.contextmanager
    def context(self, model: torch.nn.Module, train: bool):
        """The context in which `model` computes with the kernels chosen for training or inference: the chosen
        scaled_dot_product_attention backend (and only it: a backend that cannot run these inputs raises
        RuntimeError 'No available kernel') or the attention written out, and depthwise convolutions in float32
        where that was chosen (swapping them for DepthwiseConv2d the first time). "n/a": torch's own way."""
        with contextlib.ExitStack() as stack:
            attention = self.attention_train if train else self.attention_eval
            if attention == "manual":
                stack.enter_context(_setting(attention_modules(model), "fused_attn", False))
            else:
                stack.enter_context(sdpa_context(attention))
            if (self.depthwise_train if train else self.depthwise_eval) == "float32":
                stack.enter_context(_setting(switchable_depthwise(model), "float32", True))
            yield

    @property
    def float32_depthwise(self) -> bool:
        return "float32" in (self.depthwise_train, self.depthwise_eval)

    @property
    def layout(self) -> torch.memory_format:
        return torch.channels_last if self.memory_format == "channels_last" else torch.contiguous_format

    def to_dict(self) -> dict:
        return asdict(self)

    def config_values(self, attention: str, depthwise_precision: str) -> dict:
        """The config's kernel options as chosen, so that a resumed run trains with the same kernels; the
        requested `attention` and `depthwise_precision` are kept where the model has nothing to choose."""
        return {"attention": attention if self.attention_train == "n/a" else self.attention_train,
                "depthwise_precision": (depthwise_precision if self.depthwise_train == "n/a"
                                        else self.depthwise_train),
                "memory_format": self.memory_format, "compile": self.compile}

    def describe(self) -> str:
        """One line for the run's header."""
        parts = []
        if self.attention_train != "n/a" or self.attention_eval != "n/a":
            parts.append(f"attention {self.attention_train} (train) / {self.attention_eval} (inference)")
        if self.depthwise_train != "n/a" or self.depthwise_eval != "n/a":
            parts.append(f"depthwise {self.depthwise_train} (train) / {self.depthwise_eval} (inference)")
        parts += [self.memory_format, f"compile {self.compile}", f"eval batch {self.eval_batch_size}"]
        how = sorted({s for s in self.source.values() if s != "n/a"})
        return "kernels: " + ", ".join(parts) + (f" ({'/'.join(how)})" if how else "")


def sdpa_context(backend: str):
    if backend in ("n/a", "auto"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel({"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
                        "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend])


# The choice a model's inference runs with (set by training and load_run; read by predict_logits).
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attach(model: torch.nn.Module, choice: KernelChoice | None) -> None:
    """Make `choice` the kernels `model`'s inference runs with (predict_logits, predict_probs); None: none."""
    if choice is None:
        _ATTACHED.pop(model, None)
    else:
        _ATTACHED[model] = choice


def attach_lazy(model: torch.nn.Module, choose: Callable[[torch.nn.Module], KernelChoice]) -> None:
    """As `attach`, with the choice made by `choose(model)` when first asked for (so loading a run to export
    it measures nothing). `choose` must not hold `model` itself, which would then never be freed."""
    _ATTACHED[model] = choose


def attached(model) -> KernelChoice | None:
    """The choice attached to `model`, made now if it was attached lazily; None if none was."""
    try:
        choice = _ATTACHED.get(model)
    except TypeError:  # not weak-referenceable (e.g. a bound method)
        return None
    if choice is not None and not isinstance(choice, KernelChoice):
        choice = _ATTACHED[model] = choice(model)
    return choice


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose `fused_attn` switches between scaled_dot_product_attention and the attention written
    out: imgcls's ViT attention and timm's attention modules."""
    return [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]


def uses_sdpa(model: torch.nn.Module) -> bool:
    """Whether the model's attention runs through scaled_dot_product_attention (imgcls's ViTs, and timm models
    whose attention modules have `fused_attn` set), so that there is an attention kernel to choose."""
    return any(m.fused_attn for m in attention_modules(model))


class DepthwiseConv2d(torch.nn.Conv2d):
    """A depthwise nn.Conv2d that runs in float32 under autocast while `float32` is set (the input cast up,
    the output left float32); otherwise exactly nn.Conv2d. Same parameters, same state_dict keys."""

    float32 = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float32 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return super().forward(x.float())
        return super().forward(x)


def _is_depthwise(m: torch.nn.Module) -> bool:
    """A depthwise convolution with nn.Conv2d's own forward (not a subclass such as timm's Conv2dSame)."""
    return (type(m) in (torch.nn.Conv2d, DepthwiseConv2d) and m.groups > 1
            and m.groups == m.in_channels == m.out_channels)


def has_depthwise(model: torch.nn.Module) -> bool:
    """Whether `model` has depthwise convolutions whose precision `switchable_depthwise` can choose."""
    return any(_is_depthwise(m) for m in model.modules())


def switchable_depthwise(model: torch.nn.Module) -> list[DepthwiseConv2d]:
    """`model`'s depthwise convolutions as DepthwiseConv2d: each plain nn.Conv2d one is swapped, the first time,
    for a DepthwiseConv2d holding the very same parameter tensors (so optimizers, DDP and EMA still see them).
    Subclasses of nn.Conv2d (e.g. timm's Conv2dSame, with its own forward) are left alone."""
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if type(conv) is torch.nn.Conv2d and _is_depthwise(conv):
                swap = DepthwiseConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                       conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                                       conv.padding_mode, device="meta")
                swap.weight, swap.bias = conv.weight, conv.bias
                swap.train(conv.training)
                setattr(parent, name, swap)
    return [m for m in model.modules() if isinstance(m, DepthwiseConv2d)]


@contextlib.contextmanager
def _setting(modules: list, name: str, value):
    """`name` set to `value` on each of `modules` inside the context, restored after."""
    saved = [(m, getattr(m, name)) for m in modules]
    try:
        for m, _ in saved:
            setattr(m, name, value)
        yield
    finally:
        for m, old in saved:
            setattr(m, name, old)


# ---------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(kind: str, candidate: str, fn: Callable[[], object]) -> float:
    """The default timer: milliseconds of one call of `fn` (which waits for the device)."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _plain_bn(module: torch.nn.Module) -> torch.nn.Module:
    """SyncBatchNorm swapped for BatchNorm2d (rank 0 times alone; a SyncBatchNorm would wait for the others)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.SyncBatchNorm):
            bn = torch.nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                      child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn.to(next(child.buffers(), torch.zeros(0)).device))
        else:
            _plain_bn(child)
    return module


class _Bench:
    """The functions timed: a training step (forward + backward) and an inference forward, on copies of the
    model, one per layout: candidates are timed in alternation, and one layout's copy must not re-lay the
    other's weights out between its calls."""

    def __init__(self, model, shape, device, precision):
        self.base = _plain_bn(copy.deepcopy(model))
        self.shape, self.device, self.precision = tuple(shape), device, precision
        self.copies: dict[torch.memory_format, torch.nn.Module] = {}
        self.compiled: dict[torch.memory_format, torch.nn.Module] = {}

    def model(self, layout: torch.memory_format) -> torch.nn.Module:
        if layout not in self.copies:
            model = copy.deepcopy(self.base) if self.copies else self.base
            self.copies[layout] = model.to(memory_format=layout) if len(self.shape) == 4 else model
        return self.copies[layout]

    def _input(self, batch: int, layout: torch.memory_format) -> torch.Tensor:
        x = torch.randn((batch, *self.shape[1:]), device=self.device)
        return x.contiguous(memory_format=layout) if x.dim() == 4 else x

    def train_step(self, attention: str, layout: torch.memory_format, depthwise: str = "n/a", compiled: bool = False,
                   batch: int = TRAIN_TIMING_BATCH):
        model = module = self.model(layout)
        kernels = KernelChoice(attention_train=attention, depthwise_train=depthwise)
        if compiled:
            if layout not in self.compiled:
                self.compiled[layout] = torch.compile(model)
            module = self.compiled[layout]
        x = self._input(min(self.shape[0], batch), layout)

        def step():
            model.train()
            with kernels.context(model, train=True):
                with autocast(self.device, self.precision):
                    out = module(x)
                out.float().mean().backward()
            for p in model.parameters():
                p.grad = None
            _sync(self.device)

        return step

    def inference(self, attention: str, layout: torch.memory_format, batch: int, depthwise: str = "n/a"):
        model, x = self.model(layout), self._input(batch, layout)
        kernels = KernelChoice(attention_eval=attention, depthwise_eval=depthwise)

        def forward():
            model.eval()
            with torch.inference_mode(), kernels.context(model, train=False), autocast(self.device, self.precision):
                model(x)
            _sync(self.device)

        return forward


def _fastest(timer: Timer, kind: str, candidates: dict[str, Callable[[], Callable]],
             per: dict[str, int] | None = None) -> tuple[str | None, dict[str, float | None]]:
    """The candidate whose function runs fastest (per `per[c]` units when given): one warm-up call of each,
    then REPEATS rounds that call each once in turn (so a burst of load elsewhere hits all alike); the
    median of each. Candidates that raise are skipped (timing None)."""
    fns: dict[str, Callable] = {}
    timings: dict[str, float | None] = {}
    for name, make in candidates.items():
        try:
            fn = make()
            timer(kind, name, fn)  # warm-up: first-call allocations, kernel selection, compilation
            fns[name] = fn
        except Exception:  # noqa: BLE001 - a backend this device or these inputs cannot run
            timings[name] = None
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name in list(fns):
            try:
                runs[name].append(float(timer(kind, name, fns[name])))
            except Exception:  # noqa: BLE001
                del fns[name], runs[name]
                timings[name] = None
    for name, ms in runs.items():
        timings[name] = statistics.median(ms) / (per[name] if per else 1)
    ran = {k: v for k, v in timings.items() if v is not None}
    return (min(ran, key=ran.get) if ran else None), {k: timings[k] for k in candidates}


def eval_batch_candidates(data_size: int | None, img_size: int | None) -> list[int]:
    """Inference batch sizes worth timing: EVAL_BATCHES, none above the data (a batch that holds it all
    is the largest that differs) nor above MAX_EVAL_PIXELS a batch."""
    cap = MAX_EVAL_PIXELS // (img_size * img_size) if img_size else max(EVAL_BATCHES)
    if data_size:
        cap = min(cap, data_size)
    return sorted({max(1, min(b, cap)) for b in EVAL_BATCHES})


# ---------------------------------------------------------------------------------------- cache


def cache_path() -> Path:
    root = os.environ.get("IMGCLS_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "imgcls") / "kernels.json"


def machine(device: torch.device) -> str:
    """What the timings depend on: the CUDA device's name, or the CPU's model, its vector extensions and
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


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def machine_busy() -> bool:
    """Whether other work competes for the cores (1-minute load above 1.5 per core). Timings taken then
    are used for this run but not cached: one burst of load elsewhere once made channels_last look 4x
    slower than contiguous for a training step, and a cached choice would have kept that for good."""
    try:
        return os.getloadavg()[0] > 1.5 * (os.cpu_count() or 1)
    except OSError:  # no load average on this platform
        return False


def _write_cache(path: Path, key: str, entry: dict) -> None:
    from imgcls import rundir

    try:
        entries = _read_cache(path)
        entries[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        rundir.atomic_write_bytes(path, (json.dumps({"version": CACHE_VERSION, "entries": entries}, indent=1)
                                         + "\n").encode())
    except Exception:  # noqa: BLE001 - a cache that cannot be written costs a measurement next time, nothing more
        pass


def _valid(field_name: str, value) -> bool:
    if field_name.startswith("attention"):
        return value in ATTENTION_BACKENDS
    if field_name.startswith("depthwise"):
        return value in DEPTHWISE_PRECISIONS
    if field_name == "memory_format":
        return value in MEMORY_FORMATS
    if field_name == "compile":
        return value in ("on", "off")
    return isinstance(value, int) and not isinstance(value, bool) and value > 0  # eval_batch_size


# ---------------------------------------------------------------------------------------- the chooser


def choose_kernels(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, precision: str, *,
                   attention: str = "auto", depthwise_precision: str = "auto", memory_format: str = "auto",
                   compile: str = "off", attention_eval: str | None = None, depthwise_eval: str | None = None,
                   eval_batch_size: int | None = None, data_size: int | None = None, name: str | None = None,
                   train: bool = True, timer: Timer | None = None, cache: bool = True) -> KernelChoice:
    """The kernels for `model` trained on batches of `shape` ((batch, 3, H, W); `train=False` for inference
    alone) on `device` at `precision`.

    `attention`, `depthwise_precision`, `memory_format` and `compile` are the config's values: "auto" is
    measured (compile only when "auto"), anything else is taken as given; `attention_eval` and
    `depthwise_eval`, when given, replace `attention` and `depthwise_precision` for inference.
    `eval_batch_size` None is measured among EVAL_BATCHES (capped by `data_size` images and
    MAX_EVAL_PIXELS), an int is taken as given. `name` (the model's) keys the cache; `timer` (see
    `time_ms`) is injected by tests. The model itself is not changed."""
    timer = timer or time_ms
    shape = tuple(int(s) for s in shape)
    sdpa = uses_sdpa(model)
    img_size = shape[-1] if len(shape) == 4 else None
    batches = eval_batch_candidates(data_size, img_size)
    requested = {"attention_train": attention if train else "n/a", "attention_eval": attention_eval or attention,
                 "depthwise_train": depthwise_precision if train else "n/a",
                 "depthwise_eval": depthwise_eval or depthwise_precision,
                 "memory_format": memory_format, "compile": compile,
                 "eval_batch_size": "auto" if eval_batch_size is None else int(eval_batch_size)}
    if not sdpa:
        requested["attention_train"] = requested["attention_eval"] = "n/a"
    if precision == "fp32" or not has_depthwise(model):  # without autocast a depthwise conv is float32 already
        requested["depthwise_train"] = requested["depthwise_eval"] = "n/a"
    if compile == "auto" and not train:
        requested["compile"] = "n/a"  # nothing trains through the model (inference, cached features): off

    choice = KernelChoice()
    todo = []
    for f, value in requested.items():
        if value == "n/a":
            choice.source[f] = "n/a"
        elif value == "auto":
            todo.append(f)
        else:
            setattr(choice, f, value)
            choice.source[f] = "flag"

    key = json.dumps([machine(device), device.type, name or type(model).__name__, list(shape), precision,
                      "train" if train else "inference"])
    path = cache_path()
    entry = _read_cache(path).get(key) if cache and todo else None
    entry = entry if isinstance(entry, dict) else {}
    cached_fields = {"eval_batch_size": f"eval_batch_size@{batches[-1]}"}
    hits = {f: entry[cached_fields.get(f, f)] for f in todo
            if isinstance(entry.get(cached_fields.get(f, f)), dict)
            and _valid(f, entry[cached_fields.get(f, f)].get("value"))}
    for f, hit in hits.items():
        setattr(choice, f, hit["value"])
        choice.source[f] = "cache"
        choice.timings[f] = hit.get("timings", {})
    todo = [f for f in todo if f not in hits]
    if not todo:
        return choice

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        bench = _Bench(model, shape, device, precision)
        _measure(choice, todo, bench, timer, batches, train)
    del bench
    if cache and not machine_busy():
        for f in todo:
            entry[cached_fields.get(f, f)] = {"value": getattr(choice, f), "timings": choice.timings.get(f, {})}
        _write_cache(path, key, entry)
    return choice


def _measure(choice: KernelChoice, todo: list[str], bench: _Bench, timer: Timer, batches: list[int],
             train: bool) -> None:
    """Decide the fields in `todo`, one after another, each timed with the choices made before it."""

    def decide(f: str, best, timings, fallback):
        setattr(choice, f, best if best is not None else fallback)
        choice.source[f] = "measured"
        choice.timings[f] = timings

    mid = min(EVAL_TIMING_BATCH, batches[-1])  # images a forward pass when timing the inference kernels
    # Attention and depthwise precision first, in the default layout (channels_last unless given): the layout
    # is then timed on a larger batch, which should not pay for a slow attention backward (flash's, for a ViT).
    if "depthwise_train" in todo:
        make = {d: (lambda d=d: bench.train_step("auto", choice.layout, d)) for d in DEPTHWISE_PRECISIONS}
        decide("depthwise_train", *_fastest(timer, "depthwise_train", make), "autocast")
    if "attention_train" in todo:
        make = {a: (lambda a=a: bench.train_step(a, choice.layout, choice.depthwise_train)) for a in ATTENTION_BACKENDS}
        decide("attention_train", *_fastest(timer, "attention_train", make), "math")
    if "depthwise_eval" in todo:
        make = {d: (lambda d=d: bench.inference("auto", choice.layout, mid, d)) for d in DEPTHWISE_PRECISIONS}
        decide("depthwise_eval", *_fastest(timer, "depthwise_eval", make), "autocast")
    if "attention_eval" in todo:
        make = {a: (lambda a=a: bench.inference(a, choice.layout, mid, choice.depthwise_eval))
                for a in ATTENTION_BACKENDS}
        decide("attention_eval", *_fastest(timer, "attention_eval", make), "math")
    if "memory_format" in todo:
        layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
        if train:
            pixels = bench.shape[-1] * bench.shape[-2] if len(bench.shape) == 4 else 1
            batch = max(TRAIN_TIMING_BATCH, LAYOUT_TIMING_PIXELS // pixels)
            make = {m: (lambda m=m: bench.train_step(choice.attention_train, layouts[m], choice.depthwise_train,
                                                     batch=batch)) for m in MEMORY_FORMATS}
        else:
            make = {m: (lambda m=m: bench.inference(choice.attention_eval, layouts[m], mid, choice.depthwise_eval))
                    for m in MEMORY_FORMATS}
        decide("memory_format", *_fastest(timer, "memory_format", make), "channels_last")
    layout = choice.layout
    if "eval_batch_size" in todo:
        make = {str(b): (lambda b=b: bench.inference(choice.attention_eval, layout, b, choice.depthwise_eval))
                for b in batches}
        best, timings = _fastest(timer, "eval_batch_size", make, per={str(b): b for b in batches})
        decide("eval_batch_size", int(best) if best is not None else None, timings, batches[-1])
    if "compile" in todo:
        make = {"off": lambda: bench.train_step(choice.attention_train, layout, choice.depthwise_train),
                "on": lambda: bench.train_step(choice.attention_train, layout, choice.depthwise_train, compiled=True)}
        decide("compile", *_fastest(timer, "compile", make), "off")
