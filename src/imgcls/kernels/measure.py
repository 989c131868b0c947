"""The kernel choice, timed on the model's real shapes: the precision (for training and for inference
apart), the attention kernel and the precision of depthwise convolutions (each for training and for
inference), the memory format, torch.compile and the inference batch size.

`choose_kernels` times the candidates of every option left `auto` on private copies of the model (the
run's weights, BatchNorm statistics and random streams are untouched); an option given is taken as given
and not timed. Results are cached per machine and shape (kernels/cache.py) unless the machine was busy.

What keeps it to seconds: the precisions are decided first, everything else then times at the chosen one
only; a candidate that is clearly behind after any round is timed no more; and one timing serves every
question that asks it (the fp32 training step timed for the precision is the incumbent of the attention
and layout questions: `_Bench.memo`).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Callable

import torch

from imgcls.kernels import cache
from imgcls.kernels.apply import configure, has_depthwise, uses_attention
from imgcls.kernels.choice import ATTENTION_KERNELS, DEPTHWISE_PRECISIONS, MEMORY_FORMATS, NONE, KernelChoice
from imgcls.progress import Phase
from imgcls.runtime import autocast

EVAL_BATCHES = (32, 64, 128, 256, 512)  # 1024 never won on the CPUs measured, and costs as much as the rest
MAX_EVAL_PIXELS = 2**21  # larger inference batches (512 at 64 px, 41 at 224 px) only cost memory
REPEATS = 2  # timed rounds after one warm-up call; the median (of two, the mean) counts
THOROUGH_REPEATS = 5  # `thorough`: every candidate this many rounds, none eliminated, no timing shared
CLEARLY_BEHIND = 1.5  # after a round, a candidate above this multiple of the best median is timed no more
WARMUP_BEHIND = 3.0  # a warm-up (first-call setup included) this many times the fastest one's: no timed rounds
# The inference batch sizes are tried smallest first, each while its predicted cost (the last size's time per
# image, times its images, times its calls) fits what is left of TOTAL_BUDGET_MS after the other questions,
# and at least BATCH_BUDGET_MS; a size BATCH_WORSE than the best so far ends the search (the curve rises from
# there). A flat stretch does not end it: convnext_cifar's per-image time can be flat from 32 to 64 images and
# much lower at 256 (docs/results.md). A size after the first needs no warm-up: the model ran at the first, and
# a larger batch's first call measured no slower than its next ones (docs/results.md).
TOTAL_BUDGET_MS, BATCH_BUDGET_MS = 9000.0, 1500.0
BATCH_WORSE = 1.10
# A precision whose matrix product (GEMM_PROBE_SIZE squared, on this device) is more than this multiple of
# fp32's time cannot win a model's step by PRECISION_MARGIN, and is not timed on the model: where bf16 is
# emulated, or slower than fp32 although the CPU has a bf16 flag (figures in docs/results.md).
GEMM_BEHIND = 1.10
GEMM_PROBE_SIZE = 512
# A lower precision is taken only when its median is at most (1 - PRECISION_MARGIN) of fp32's: 10% is about
# three times the spread of repeated timings on the 2-core machines here, and a lower precision costs
# accuracy headroom (fp16 needs loss scaling), so a tie goes to fp32.
PRECISION_MARGIN = 0.10
# Training questions are timed on TRAIN_TIMING_BATCH images a step, inference questions on EVAL_TIMING_BATCH;
# the memory format is one question for both, timed on the inference forward (a third of a training step's
# cost). `thorough` times the training layout on training steps of up to LAYOUT_TIMING_PIXELS (128 images of
# 32x32) instead, as the measurement did before; bench/kernel_choice.py compares the two choices.
TRAIN_TIMING_BATCH, EVAL_TIMING_BATCH = 16, 32  # the smallest inference batch candidate: one timing, two uses
LAYOUT_TIMING_PIXELS = 128 * 32 * 32

# timer(kind, candidate, fn) -> milliseconds of one call of fn (`time_ms`); kind: a KernelChoice field name
Timer = Callable[[str, str, Callable[[], object]], float]


def time_ms(kind: str, candidate: str, fn: Callable[[], object]) -> float:
    """The default timer: milliseconds of one call of `fn` (which waits for the device). `kind` and
    `candidate` say what is timed, for the fake timers of tests."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def precision_candidates(device: torch.device) -> tuple[str, ...]:
    """fp32 first (on CUDA with TF32 allowed, runtime.py), then what the device runs: bf16 everywhere
    (emulated on CPUs without AVX512-BF16 or AMX, so it loses its timing there), fp16 on CUDA."""
    if device.type == "cuda":
        return ("fp32", "bf16", "fp16") if torch.cuda.is_bf16_supported() else ("fp32", "fp16")
    return ("fp32", "bf16")


def eval_batch_candidates(data_size: int | None, img_size: int | None) -> list[int]:
    """Inference batch sizes worth timing: EVAL_BATCHES, none above the data (a batch that holds it all
    is the largest that differs) nor above MAX_EVAL_PIXELS a batch."""
    cap = MAX_EVAL_PIXELS // (img_size * img_size) if img_size else max(EVAL_BATCHES)
    if data_size:
        cap = min(cap, data_size)
    return sorted({max(1, min(b, cap)) for b in EVAL_BATCHES})


def lowest_good_precision(timings: dict[str, float | None]) -> str:
    """fp32, unless a lower precision's time is at most (1 - PRECISION_MARGIN) of fp32's: then the fastest."""
    fp32 = timings.get("fp32")
    lower = {p: t for p, t in timings.items() if p != "fp32" and t is not None}
    if fp32 is None:
        return min(lower, key=lower.get) if lower else "fp32"
    fast = {p: t for p, t in lower.items() if t <= (1 - PRECISION_MARGIN) * fp32}
    return min(fast, key=fast.get) if fast else "fp32"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    """What is timed, on private copies of the model (one per layout: candidates are timed in alternation,
    and one layout's copy must not re-lay the other's weights out between its calls). A case is a tuple:
    ("train", precision, attention, depthwise, layout, compiled, batch) or ("infer", precision, attention,
    depthwise, layout, batch); each is built once, and its timings are kept (`memo`) so that every question
    that asks the same case reuses them."""

    def __init__(self, model, shape, device, timer: Timer, thorough: bool = False,
                 attention_asked: dict[str, str] | None = None):
        self.base = _plain_bn(copy.deepcopy(model))
        self.shape, self.device, self.timer, self.thorough = tuple(shape), device, timer, thorough
        self.repeats = THOROUGH_REPEATS if thorough else REPEATS
        self.copies: dict[str, torch.nn.Module] = {}
        self.compiled: dict[str, torch.nn.Module] = {}
        self.fns: dict[tuple, Callable] = {}
        self.memo: dict[tuple, list[float]] = {}
        self.failed: set[tuple] = set()
        self.spent_ms = 0.0  # what the timer has reported so far, warm-ups included
        self.warm: set[tuple] = set()  # inference cases (but for their batch) that ran once already
        # what "not chosen yet" times with: the model as built (the copies are reconfigured by each call)
        self.attention = "sdpa" if uses_attention(model) else NONE
        self.depthwise = "autocast" if has_depthwise(model) else NONE
        self.attention_asked = attention_asked or {}  # per precision question, the attention it is chosen with

    def _model(self, layout: str) -> torch.nn.Module:
        if layout not in self.copies:
            self.copies[layout] = copy.deepcopy(self.base) if self.copies else self.base
        return self.copies[layout]

    def _input(self, batch: int, layout: str) -> torch.Tensor:
        x = torch.randn((batch, *self.shape[1:]), device=self.device)
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 and layout == "channels_last" else x

    def _function(self, case: tuple) -> Callable[[], None]:
        if case[0] not in ("train", "infer"):  # a thorough question's own copy of a case
            case = case[1:]
        kind, precision, attention, depthwise, layout, *rest = case
        model = self._model(layout)
        attention = self.attention if attention == NONE else attention
        depthwise = self.depthwise if depthwise == NONE else depthwise
        if kind == "infer":
            x = self._input(rest[0], layout)

            def forward():
                configure(model, attention, depthwise, layout).eval()
                with torch.inference_mode(), autocast(self.device, precision):
                    model(x)
                _sync(self.device)

            forward.case = {"kind": kind, "precision": precision, "attention": attention, "depthwise": depthwise,
                            "layout": layout, "compiled": False, "batch": rest[0]}  # what a fake timer prices
            return forward
        compiled, batch = rest
        module = model
        if compiled:
            module = self.compiled.setdefault(layout, torch.compile(model))
        x = self._input(min(self.shape[0], batch), layout)

        def step():
            configure(model, attention, depthwise, layout).train()
            with autocast(self.device, precision):
                out = module(x)
            out.float().mean().backward()
            for p in model.parameters():
                p.grad = None
            _sync(self.device)

        step.case = {"kind": kind, "precision": precision, "attention": attention, "depthwise": depthwise,
                     "layout": layout, "compiled": compiled, "batch": len(x)}
        return step

    def time(self, kind: str, name: str, case: tuple) -> float:
        ms = float(self.timer(kind, name, self.fns[case]))
        self.spent_ms += ms
        return ms

    def fastest(self, kind: str, candidates: dict[str, tuple], per: dict[str, int] | None = None,
                eliminate: bool = True, warm_up: bool = True) -> dict[str, float | None]:
        """Median milliseconds (per `per[name]` units) of each candidate, None for one that cannot run. Each
        is warmed up once, then timed in rounds that call every live candidate in turn (so a burst of load
        elsewhere hits all alike); with `eliminate`, one CLEARLY_BEHIND after a round is dropped (its median
        so far is what is reported)."""
        if self.thorough:  # each question times its own candidates, all of them, every round
            candidates = {name: (kind, *case) for name, case in candidates.items()}
            eliminate = False
        unit = {name: (per or {}).get(name, 1) for name in candidates}
        live, warmups = [], {}
        for name, case in candidates.items():
            if case in self.failed or len(self.memo.get(case, [])) >= self.repeats:
                continue
            try:
                if case not in self.fns:
                    self.fns[case] = self._function(case)
                    if warm_up:  # warm-up: allocations, kernel selection, compilation
                        warmups[name] = self.time(kind, name, case) / unit[name]
                self.memo.setdefault(case, [])
                live.append(name)
            except Exception:  # noqa: BLE001 - a kernel this device or these inputs cannot run
                self.failed.add(case)
        if eliminate and warmups:
            for name, ms in warmups.items():  # far behind already: one timed round to report, no more
                if ms > WARMUP_BEHIND * min(warmups.values()) and name in live:
                    self.memo[candidates[name]].append(ms * unit[name])
                    live.remove(name)
        while live:
            for name in list(live):
                case = candidates[name]
                try:
                    self.memo[case].append(self.time(kind, name, case))
                except Exception:  # noqa: BLE001
                    self.failed.add(case)
                    live.remove(name)
            live = [n for n in live if len(self.memo[candidates[n]]) < self.repeats]
            medians = self._medians(candidates, unit)
            ran = [t for t in medians.values() if t is not None]
            if eliminate and ran:
                live = [n for n in live if medians[n] <= CLEARLY_BEHIND * min(ran)]
        return self._medians(candidates, unit)

    def _medians(self, candidates: dict[str, tuple], unit: dict[str, int]) -> dict[str, float | None]:
        out = {}
        for name, case in candidates.items():
            runs = self.memo.get(case) if case not in self.failed else None
            out[name] = statistics.median(runs) / unit[name] if runs else None
        return out


def choose_kernels(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, precision: str = "auto", *,
                   precision_eval: str | None = None, attention: str = "auto", attention_eval: str = "auto",
                   depthwise: str = "auto", depthwise_eval: str = "auto", memory_format: str = "auto",
                   compile: str = "off", eval_batch_size: int | None = None, data_size: int | None = None,
                   name: str | None = None, train: bool = True, timer: Timer | None = None,
                   use_cache: bool = True, thorough: bool = False) -> KernelChoice:
    """The kernels for `model` trained on batches of `shape` ((batch, 3, H, W); `train=False` for inference
    alone) on `device`.

    Each option is "auto" (measured; compile only when "auto"), or a value taken as given. `precision` is
    training's; `precision_eval` inference's: "auto" (or None) is measured when training's is "auto" too,
    and follows a training precision that was given (a user who pins fp32 gets fp32 throughout).
    `eval_batch_size` None is measured among EVAL_BATCHES (capped by `data_size` images and
    MAX_EVAL_PIXELS). `name` (the model's) keys the cache; `timer` (see `time_ms`) is injected by tests.
    `thorough` times every candidate of every question in full (THOROUGH_REPEATS rounds, nothing shared or
    eliminated), to check that the quick measurement chooses the same (bench/kernel_choice.py). `model` is
    not changed."""
    shape = tuple(int(s) for s in shape)
    batches = eval_batch_candidates(data_size, shape[-1] if len(shape) == 4 else None)
    key = json.dumps([cache.machine(device), device.type, name or type(model).__name__, list(shape), precision,
                      precision_eval, "train" if train else "inference", batches[-1]])
    path = cache.cache_path()
    entry = cache.read(path).get(key) if use_cache else None
    entry = entry if isinstance(entry, dict) else {}
    choice, measured = KernelChoice(), []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        bench = _Bench(model, shape, device, timer or time_ms, thorough,
                       {"precision_train": attention, "precision_eval": attention_eval})
        settle = _Settler(choice, entry, bench, batches, train, measured)
        follows = precision not in ("auto", NONE) and precision_eval in (None, "auto")
        settle({"precision_train": precision if train else NONE})
        settle({"precision_eval": precision if follows else precision_eval or "auto"})
        settle(_requests(choice, model, attention, attention_eval, depthwise, depthwise_eval, memory_format, compile,
                         eval_batch_size, train))
    if use_cache and measured and not cache.machine_busy():
        for f in measured:
            entry[f] = {"value": getattr(choice, f), "timings": choice.timings.get(f, {})}
        cache.write(path, key, entry)
    return choice


def _requests(choice: KernelChoice, model, attention, attention_eval, depthwise, depthwise_eval, memory_format,
              compile, eval_batch_size, train: bool) -> dict:
    """What is asked of the non-precision fields, given the precisions chosen: "none" where there is nothing
    to choose (no attention; no depthwise convolution, or no autocast to run it in)."""
    requested = {"attention_train": attention if train else NONE, "attention_eval": attention_eval,
                 "depthwise_train": depthwise if train else NONE, "depthwise_eval": depthwise_eval,
                 "memory_format": memory_format, "compile": compile if train else "off",
                 "eval_batch_size": "auto" if eval_batch_size is None else int(eval_batch_size)}
    if not uses_attention(model):
        requested["attention_train"] = requested["attention_eval"] = NONE
    if not has_depthwise(model) or choice.precision_train == "fp32":
        requested["depthwise_train"] = NONE
    if not has_depthwise(model) or choice.precision_eval == "fp32":
        requested["depthwise_eval"] = NONE
    return requested


class _Settler:
    """Settles requested fields into `choice`: given values as given, then what the cache holds, then the
    rest measured (appended to `measured`)."""

    def __init__(self, choice, entry, bench, batches, train, measured):
        self.choice, self.entry, self.bench, self.batches, self.train = choice, entry, bench, batches, train
        self.measured = measured

    def __call__(self, requested: dict) -> None:
        todo = []
        for f, value in requested.items():
            if value != "auto":
                setattr(self.choice, f, value)
                self.choice.source[f] = NONE if value == NONE else "given"
                continue
            hit = self.entry.get(f)
            if isinstance(hit, dict) and cache.valid(f, hit.get("value"), self.bench.device.type):
                setattr(self.choice, f, hit["value"])
                self.choice.source[f], self.choice.timings[f] = "cache", cache.timings(hit)
            else:
                todo.append(f)
        if todo:
            with Phase("kernels: timing the candidates", len(todo), unit="questions") as phase:
                _measure(self.choice, todo, self.bench, self.batches, self.train, phase.advance)
            self.measured += todo


def _train_case(c: KernelChoice, bench: _Bench, **change) -> tuple:
    """The training step a question compares (thorough: at the old layout question's batch)."""
    pixels = bench.shape[-1] * bench.shape[-2] if len(bench.shape) == 4 else 1
    batch = max(TRAIN_TIMING_BATCH, LAYOUT_TIMING_PIXELS // pixels) if bench.thorough else TRAIN_TIMING_BATCH
    now = {"precision": c.precision_train, "attention": c.attention_train, "depthwise": c.depthwise_train,
           "layout": c.memory_format, "compiled": False, **change}
    return ("train", now["precision"], *_as_built(bench, now), now["layout"], now["compiled"], batch)


def _infer_case(c: KernelChoice, bench: _Bench, batch: int, **change) -> tuple:
    now = {"precision": c.precision_eval, "attention": c.attention_eval, "depthwise": c.depthwise_eval,
           "layout": c.memory_format, **change}
    return ("infer", now["precision"], *_as_built(bench, now), now["layout"], batch)


def _as_built(bench: _Bench, case: dict) -> tuple[str, str]:
    """The attention kernel and depthwise precision a case computes with, "none" (not chosen yet) read as the
    model as built: so the same computation is one case, timed once whichever question asks for it."""
    return (bench.attention if case["attention"] == NONE else case["attention"],
            bench.depthwise if case["depthwise"] == NONE else case["depthwise"])


def gemm_probe(device: torch.device, candidates: tuple[str, ...], timer: Timer) -> dict[str, float | None]:
    """Milliseconds of one GEMM_PROBE_SIZE-square matrix product in each precision on `device` (the median
    of REPEATS after a warm-up), cached per machine: the device's speed at each precision, whatever the model."""
    key, path = json.dumps(["gemm", cache.machine(device), device.type, GEMM_PROBE_SIZE]), cache.cache_path()
    hit = cache.read(path).get(key)
    if isinstance(hit, dict) and set(hit) == set(candidates) and all(
            isinstance(v, float) and math.isfinite(v) and v > 0 for v in hit.values()):
        return hit
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    timings = {}
    for precision in candidates:  # fp32 first: the others are compared with it
        a = torch.randn(GEMM_PROBE_SIZE, GEMM_PROBE_SIZE, device=device).to(dtypes[precision])

        def product(a=a):
            torch.matmul(a, a)
            _sync(device)

        product.case = {"kind": "gemm", "precision": precision, "attention": NONE, "depthwise": NONE,
                        "layout": NONE, "compiled": False, "batch": 1}

        try:
            first = float(timer("gemm", precision, product))
            # Far behind twice is emulated, and enough to know; far behind on the first call alone is setup (a
            # Xeon's first bf16 product sets up its AMX tiles: taken for emulation, it kept every model in fp32).
            if timings.get("fp32") and first > WARMUP_BEHIND * timings["fp32"]:
                second = float(timer("gemm", precision, product))
                if second > WARMUP_BEHIND * timings["fp32"]:
                    timings[precision] = second
                    continue
            timings[precision] = statistics.median(float(timer("gemm", precision, product)) for _ in range(REPEATS))
        except Exception:  # noqa: BLE001 - a dtype this device has no kernel for
            timings[precision] = None
    if not cache.machine_busy() and all(v is not None for v in timings.values()):
        cache.write(path, key, timings)
    return timings


def _contenders(device: torch.device, bench: _Bench) -> tuple[tuple[str, ...], dict]:
    """The precisions worth timing on the model: fp32, and those whose GEMM is not clearly slower than fp32's."""
    probe = gemm_probe(device, precision_candidates(device), bench.timer)
    fp32 = probe.get("fp32")
    if fp32 is None:  # no reference to compare with: every precision is timed on the model
        return precision_candidates(device), probe
    return tuple(p for p, ms in probe.items() if p == "fp32" or (ms is not None and ms <= GEMM_BEHIND * fp32)), probe


def _batch_search(bench: _Bench, c: KernelChoice, batches: list[int]) -> dict[str, float | None]:
    """Per-image milliseconds of the inference batch sizes, smallest first, within the budget (the first size
    is always timed; every size, each warmed up, under `thorough`)."""
    budget = max(BATCH_BUDGET_MS, TOTAL_BUDGET_MS - bench.spent_ms)
    timings: dict[str, float | None] = {}
    start, last = bench.spent_ms, None
    for i, b in enumerate(batches):
        if not bench.thorough and last is not None and bench.spent_ms - start + last * b * bench.repeats > budget:
            break
        timings.update(bench.fastest("eval_batch_size", {str(b): _infer_case(c, bench, b)}, {str(b): b},
                                     warm_up=bench.thorough or i == 0))
        t = timings[str(b)]
        if t is None:
            continue
        last = t
        if not bench.thorough and t > BATCH_WORSE * min(v for v in timings.values() if v is not None):
            break
    return timings


def _best(timings: dict[str, float | None]) -> float | None:
    ran = [t for t in timings.values() if t is not None]
    return min(ran) if ran else None


def _measure(c: KernelChoice, todo: list[str], bench: _Bench, batches: list[int], train: bool,
             advance: Callable[[int], None]) -> None:
    """Decide the fields in `todo`, one after another, each timed with the choices made before it
    (`advance(1)` after each: a progress bar)."""

    def decide(f: str, cases: dict[str, tuple], fallback, per=None, pick=None, eliminate=True, timings=None) -> None:
        timings = timings if timings is not None else bench.fastest(f, cases, per, eliminate)
        ran = {k: v for k, v in timings.items() if v is not None}
        best = (pick or (lambda t: min(t, key=t.get)))(ran) if ran else fallback
        setattr(c, f, best)
        c.source[f], c.timings[f] = "measured", timings
        advance(1)

    mid = min(EVAL_TIMING_BATCH, batches[-1])  # images a forward pass when timing the inference kernels
    if {"precision_train", "precision_eval"} & set(todo):
        candidates, probe = _contenders(bench.device, bench) if not bench.thorough else (
            precision_candidates(bench.device), None)
        for f, case in (("precision_train", lambda p, **a: _train_case(c, bench, precision=p, depthwise=NONE, **a)),
                        ("precision_eval", lambda p, **a: _infer_case(c, bench, mid, precision=p, depthwise=NONE,
                                                                      **a))):
            if f not in todo:
                continue
            if len(candidates) == 1:  # the GEMM probe alone decided: nothing to time on the model
                setattr(c, f, "fp32")
                c.source[f], c.timings[f] = "measured", {f"gemm {p}": ms for p, ms in probe.items()}
                advance(1)
            elif bench.attention != NONE and bench.attention_asked.get(f) == "auto":
                # Each precision with its best attention kernel: bf16 loses with sdpa on a CPU and wins written
                # out, so timed with sdpa alone it kept a ViT in fp32. The attention question reuses these.
                decide(f, {}, "fp32", pick=lowest_good_precision, timings={p: _best(bench.fastest(
                    f, {a: case(p, attention=a) for a in ATTENTION_KERNELS})) for p in candidates})
            else:  # with the attention kernel the run was given, if any: a run told `manual` never runs sdpa
                asked = bench.attention_asked.get(f)
                given = {"attention": asked} if bench.attention != NONE and asked in ATTENTION_KERNELS else {}
                decide(f, {p: case(p, **given) for p in candidates}, "fp32", pick=lowest_good_precision)
    # Depthwise precision and attention before the layout: the layout question then compares their winner.
    if "depthwise_train" in todo:
        decide("depthwise_train", {d: _train_case(c, bench, depthwise=d) for d in DEPTHWISE_PRECISIONS}, "autocast")
    if "attention_train" in todo:
        decide("attention_train", {a: _train_case(c, bench, attention=a) for a in ATTENTION_KERNELS}, "sdpa")
    if "depthwise_eval" in todo:
        decide("depthwise_eval", {d: _infer_case(c, bench, mid, depthwise=d) for d in DEPTHWISE_PRECISIONS},
               "autocast")
    if "attention_eval" in todo:
        decide("attention_eval", {a: _infer_case(c, bench, mid, attention=a) for a in ATTENTION_KERNELS}, "sdpa")
    if "memory_format" in todo:  # one question for training and inference: see LAYOUT_TIMING_PIXELS
        timed_on_steps = train and bench.thorough
        cases = {m: _train_case(c, bench, layout=m) if timed_on_steps else _infer_case(c, bench, mid, layout=m)
                 for m in MEMORY_FORMATS}
        decide("memory_format", cases, "channels_last")
    if "eval_batch_size" in todo:
        decide("eval_batch_size", {}, str(batches[-1]), timings=_batch_search(bench, c, batches))
        c.eval_batch_size = int(c.eval_batch_size)
    if "compile" in todo:  # compile's warm-up is its compilation: never eliminated for it
        decide("compile", {"off": _train_case(c, bench), "on": _train_case(c, bench, compiled=True)}, "off",
               eliminate=False)
