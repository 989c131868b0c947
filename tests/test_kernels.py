"""imgcls.kernels: kernels chosen by measurement (a fake timer decides here), flags, the cache, and a run."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from imgcls import rundir
from imgcls.config import KERNEL_FIELDS, build_config
from imgcls.inference.engine import Engine, TorchBackend
from imgcls.inference.graph import InferenceModel
from imgcls.inference.run import load_run, run_engine
from imgcls.kernels import cache, measure
from imgcls.kernels.apply import (
    DepthwiseConv2d,
    has_depthwise,
    inference_copy,
    set_attention,
    set_depthwise,
    uses_attention,
)
from imgcls.kernels.choice import KernelChoice
from imgcls.kernels.measure import choose_kernels
from imgcls.models import create_model
from imgcls.models.contract import attention_modules
from imgcls.training.context import KERNEL_SOURCES, build_context
from imgcls.training.distributed import World
from imgcls.training.train import Interrupted, fit
from imgcls.training.validation import engine_for

CPU = torch.device("cpu")
SHAPE = (8, 3, 32, 32)


# The question a field asks of a timed case: which kind of case ("train", "infer", or either) and which of its
# attributes (`fn.case`, set by the bench on every function it times).
QUESTIONS = {"precision_train": ("train", "precision"), "precision_eval": ("infer", "precision"),
             "attention_train": ("train", "attention"), "attention_eval": ("infer", "attention"),
             "depthwise_train": ("train", "depthwise"), "depthwise_eval": ("infer", "depthwise"),
             "memory_format": (None, "layout"), "compile": ("train", "compiled"), "eval_batch_size": ("infer", "batch")}


def _label(value) -> str:
    return {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)


class FakeTimer:
    """Prices every timed case as a real timer would, one time per case whichever question asks for it: a
    case is 10x slower for each preference of `prefer` (field -> value) it does not meet, and an inference
    case costs its batch of images; counts its calls. With `run`, it also calls the timed function, so a
    candidate that cannot run raises as under the real timer; `fail` names (question, candidate) pairs that
    raise as a kernel this device cannot run would."""

    def __init__(self, prefer: dict | None = None, run: bool = False, fail: dict | None = None):
        self.prefer, self.run, self.fail, self.calls = prefer or {}, run, fail or {}, []

    def __call__(self, kind, candidate, fn):
        self.calls.append((kind, candidate))
        if candidate in self.fail.get(kind, ()):
            raise RuntimeError(f"no {candidate} kernel on this device")
        if self.run:
            fn()
        case, ms = fn.case, 1.0
        for question, preferred in self.prefer.items():
            where, attribute = QUESTIONS[question]
            if where in (None, case["kind"]) and _label(case[attribute]) != preferred:
                ms *= 10.0
        # the chooser divides inference by the batch; milli-scale, so the batch search's time budget never binds
        return 1e-3 * ms * case["batch"] if case["kind"] == "infer" else ms

    def kinds(self) -> set:
        return {k for k, _ in self.calls}


class SdpaSpy:
    """Counts calls of F.scaled_dot_product_attention (by the batch of q), passing them through: a test-only spy."""

    def __init__(self, monkeypatch):
        self.calls, real = [], F.scaled_dot_product_attention
        monkeypatch.setattr(F, "scaled_dot_product_attention",
                            lambda q, *a, **k: self.calls.append(len(q)) or real(q, *a, **k))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("vit_cifar_tiny", 10)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "machine_busy", lambda: False)  # caching is tested apart from the load
    return tmp_path / "cache"


def test_timings_taken_on_a_busy_machine_are_used_but_not_cached(vit, cache_dir, monkeypatch):
    monkeypatch.setattr(cache, "machine_busy", lambda: True)
    choice = choose(vit, FakeTimer({"attention_train": "manual"}))
    assert choice.attention_train == "manual" and choice.source["attention_train"] == "measured"
    assert not (cache_dir / "kernels.json").exists()
    again = FakeTimer({"attention_train": "sdpa"})
    assert choose(vit, again).attention_train == "sdpa" and again.calls  # measured afresh


def choose(model, timer, precision="fp32", **kw):
    return choose_kernels(model, SHAPE, CPU, precision, timer=timer, **{"data_size": 1000, **kw})


@pytest.mark.parametrize("train, infer", [("sdpa", "manual"), ("manual", "sdpa")])
def test_fake_timer_forces_each_attention_choice_apart(vit, cache_dir, train, infer):
    timer = FakeTimer({"attention_train": train, "attention_eval": infer})
    choice = choose(vit, timer)
    assert (choice.attention_train, choice.attention_eval) == (train, infer)
    assert choice.source["attention_train"] == choice.source["attention_eval"] == "measured"
    # pinned SDPA backends (math, flash, efficient) are no candidates: torch selects them process-wide
    assert set(choice.timings["attention_train"]) == set(choice.timings["attention_eval"]) == {"sdpa", "manual"}


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_fake_timer_forces_the_memory_format(vit, cache_dir, layout):
    choice = choose(vit, FakeTimer({"memory_format": layout}))
    assert choice.memory_format == layout
    assert choice.layout == (torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def falling_to(best: int, ms_per_image: float = 1e-3):
    """A timer whose per-image inference time falls with the batch down to `best`, then rises (as measured
    curves do), cheap enough that the search's time budget never binds; every training step costs the same."""

    def timer(kind, candidate, fn):
        case = fn.case
        if case["kind"] != "infer":
            return 1.0
        return ms_per_image * case["batch"] * (1 + abs(math.log2(case["batch"] / best)))

    return timer


@pytest.mark.parametrize("batch", [32, 64, 256, 512])
def test_the_eval_batch_size_is_the_best_of_a_falling_curve_capped_by_the_data(vit, cache_dir, batch):
    choice = choose(vit, falling_to(batch))
    assert choice.eval_batch_size == batch
    tried = sorted(map(int, choice.timings["eval_batch_size"]))
    # smallest first, until a size is clearly worse than the best: up to the winner and one past it
    assert tried == [b for b in measure.EVAL_BATCHES if b <= batch * 2]
    capped = choose(vit, falling_to(300), data_size=300, name="few images")
    assert capped.eval_batch_size == 300
    assert sorted(map(int, capped.timings["eval_batch_size"])) == [32, 64, 128, 256, 300]


def test_a_flat_stretch_does_not_end_the_search_but_the_budget_does(vit, cache_dir):
    """A flat curve is searched on (a lower stretch may follow, as convnext_cifar's does) until the next size
    would not fit the time budget: what is left of TOTAL_BUDGET_MS, and never less than BATCH_BUDGET_MS."""
    assert (measure.TOTAL_BUDGET_MS, measure.BATCH_BUDGET_MS, measure.REPEATS) == (9000.0, 1500.0, 2)

    def flat(per_image_ms, step_ms=1.0):
        return lambda kind, candidate, fn: per_image_ms * fn.case["batch"] if fn.case["kind"] == "infer" else step_ms

    # 10 ms an image, three calls at 32 (one warm-up) and two after: 960 + 1280 + 2560 ms fit 9 s, 256 would not
    cheap_steps = choose(vit, flat(10.0))
    assert sorted(map(int, cheap_steps.timings["eval_batch_size"])) == [32, 64, 128]
    assert cheap_steps.eval_batch_size == 32  # all as fast: the smallest
    # training steps that used up the total leave BATCH_BUDGET_MS: at 2 ms an image 192 + 256 + 512 ms fit it
    dear_steps = choose(vit, flat(2.0, step_ms=2000.0), name="dear steps")
    assert sorted(map(int, dear_steps.timings["eval_batch_size"])) == [32, 64, 128]
    assert sorted(map(int, choose(vit, flat(2.0), name="cheap").timings["eval_batch_size"])) == list(
        measure.EVAL_BATCHES)  # and with the total left, every size up to 512


@pytest.mark.parametrize("winner", ["on", "off"])
def test_compile_is_timed_only_when_auto(vit, cache_dir, winner):
    timer = FakeTimer({"compile": winner})
    assert choose(vit, timer, compile="auto").compile == winner
    assert "compile" in timer.kinds()
    timer = FakeTimer({"compile": "on"})
    choice = choose(vit, timer, compile="off", name="other")
    assert choice.compile == "off" and choice.source["compile"] == "given" and "compile" not in timer.kinds()


def test_a_kernel_that_raises_is_skipped(vit, cache_dir):
    # preferred by the timer but unable to run (as a kernel this device lacks): never chosen, timing None
    timer = FakeTimer({"attention_train": "sdpa", "attention_eval": "sdpa"}, run=True,
                      fail={"attention_train": ("sdpa",), "attention_eval": ("sdpa",)})
    choice = choose(vit, timer, memory_format="contiguous", eval_batch_size=64)
    assert (choice.attention_train, choice.attention_eval) == ("manual", "manual")
    assert choice.timings["attention_train"]["sdpa"] is None and choice.timings["attention_eval"]["sdpa"] is None
    assert choice.timings["attention_eval"]["manual"] is not None
    # a candidate that fails only in a later round is dropped too
    flaky = {"n": 0}

    def timer_failing_late(kind, candidate, fn):
        if kind == "attention_train" and candidate == "manual":
            flaky["n"] += 1
            if flaky["n"] == 3:
                raise RuntimeError("out of memory")
            return 1.0
        return 10.0

    late = choose(vit, timer_failing_late, name="late", memory_format="contiguous", eval_batch_size=64)
    assert late.attention_train == "sdpa" and late.timings["attention_train"]["manual"] is None


def test_flags_are_taken_as_given_and_not_timed(vit, cache_dir):
    timer = FakeTimer({"attention_train": "sdpa", "memory_format": "channels_last"})
    choice = choose(vit, timer, attention="manual", attention_eval="sdpa", memory_format="contiguous",
                    compile="on", eval_batch_size=100)
    assert timer.calls == []
    assert (choice.attention_train, choice.attention_eval, choice.memory_format, choice.compile,
            choice.eval_batch_size) == ("manual", "sdpa", "contiguous", "on", 100)
    assert set(choice.source.values()) == {"given", "none"} and choice.source["depthwise_train"] == "none"  # a ViT
    # the values a run's plan takes from the choice
    assert {f: getattr(choice, KERNEL_SOURCES[f]) for f in KERNEL_FIELDS} == {
        "attention": "manual", "eval_attention": "sdpa", "depthwise_precision": "none",
        "eval_depthwise_precision": "none", "memory_format": "contiguous", "compile": "on", "eval_batch_size": 100}


def test_inference_alone_times_no_training_step(vit, cache_dir):
    # load_run and --cache-features: nothing trains through the model, so no training attention or compile
    timer = FakeTimer({"attention_eval": "manual", "memory_format": "contiguous"})
    choice = choose(vit, timer, precision="auto", compile="auto", train=False)
    assert (choice.attention_train, choice.attention_eval, choice.memory_format, choice.compile) == (
        "none", "manual", "contiguous", "off")
    assert timer.kinds() == {"gemm", "precision_eval", "attention_eval", "memory_format", "eval_batch_size"}


def test_a_model_without_attention_has_no_attention_to_time(cache_dir):
    timer = FakeTimer()
    choice = choose(create_model("fastnet_cifar_small", 10), timer, attention="auto")
    assert (choice.attention_train, choice.attention_eval) == ("none", "none")
    assert choice.source["attention_train"] == choice.source["attention_eval"] == "none"  # the plan records none
    assert not {"attention_train", "attention_eval"} & timer.kinds()
    assert uses_attention(create_model("vit_cifar_tiny", 10))
    assert not uses_attention(create_model("fastnet_cifar_small", 10))


def test_a_cache_hit_times_nothing_and_a_corrupt_cache_is_ignored(vit, cache_dir):
    first = FakeTimer({"attention_train": "manual", "attention_eval": "sdpa", "eval_batch_size": "128"})
    measured = choose(vit, first)
    assert first.calls and (cache_dir / "kernels.json").is_file()
    again = FakeTimer({"attention_train": "sdpa"})
    cached = choose(vit, again)
    assert again.calls == []
    assert {f: cached.source[f] for f in ("attention_train", "memory_format", "eval_batch_size")} == dict.fromkeys(
        ("attention_train", "memory_format", "eval_batch_size"), "cache")
    assert (cached.attention_train, cached.attention_eval, cached.eval_batch_size) == ("manual", "sdpa", 128)
    assert cached.memory_format == measured.memory_format
    # another shape is another entry
    other = FakeTimer()
    choose_kernels(vit, (16, 3, 32, 32), CPU, "fp32", timer=other, data_size=1000)
    assert other.calls

    for damage in (b"{not json", b'{"version": %d, "entries": {"x": 3}}' % cache.VERSION, b"[1, 2]",
                   b"\xff\xfe", json.dumps({"version": 1, "entries": {}}).encode(),  # older versions' caches
                   json.dumps({"version": cache.VERSION - 1, "entries": {}}).encode()):
        (cache_dir / "kernels.json").write_bytes(damage)
        timer = FakeTimer({"attention_train": "manual"})
        choice = choose(vit, timer)
        assert timer.calls and choice.attention_train == "manual" and choice.source["attention_train"] == "measured"
        assert json.loads((cache_dir / "kernels.json").read_text())["version"] == cache.VERSION  # rewritten

    # a value in the cache that is no choice (a pinned SDPA backend of old included) is measured again, not used
    for impossible in ("warp-drive", "flash"):
        data = json.loads((cache_dir / "kernels.json").read_text())
        for entry in data["entries"].values():
            entry["attention_train"]["value"] = impossible
        (cache_dir / "kernels.json").write_text(json.dumps(data))
        timer = FakeTimer({"attention_train": "sdpa"})
        assert choose(vit, timer).attention_train == "sdpa" and timer.kinds() == {"attention_train"}


def test_an_unwritable_cache_never_breaks_a_choice(vit, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(blocker))
    timer = FakeTimer({"attention_eval": "manual"})
    assert choose(vit, timer).attention_eval == "manual"


SDPA_SWITCHES = ("math_sdp_enabled", "flash_sdp_enabled", "mem_efficient_sdp_enabled")


def _switches():
    return {name: getattr(torch.backends.cuda, name)() for name in SDPA_SWITCHES}


def test_attention_is_set_on_each_model_and_no_process_wide_switch_is_touched(vit, monkeypatch):
    # a pinned SDPA backend was a process-wide switch two threads raced on; a kernel is now the model's own
    before = _switches()
    spy = SdpaSpy(monkeypatch)
    x = torch.randn(3, 3, 32, 32)
    fused, manual = copy.deepcopy(vit).eval(), copy.deepcopy(vit).eval()
    set_attention(fused, "sdpa")
    set_attention(manual, "manual")
    assert all(m.fused_attn for m in attention_modules(fused))
    assert not any(m.fused_attn for m in attention_modules(manual))
    with torch.no_grad():
        a = fused(x)
        assert len(spy.calls) == len(attention_modules(fused)) and set(spy.calls) == {3}
        b = manual(x)  # the two models, configured apart, coexist: neither changes the other
    assert len(spy.calls) == len(attention_modules(fused))  # the manual model never called the fused kernel
    assert torch.allclose(a, b, atol=1e-5)
    assert all(m.fused_attn for m in attention_modules(fused))
    set_attention(manual, "none")  # nothing to choose: the model is left as it is
    assert not any(m.fused_attn for m in attention_modules(manual))
    assert _switches() == before


def _engine(model, mini, choice: KernelChoice, batch_size: int) -> Engine:
    from imgcls.data.preprocessing import Preprocessing

    prep = Preprocessing(mini.img_size, mini.mean, mini.std, mini.crop_pct)
    view = inference_copy(model, choice.attention_eval, choice.depthwise_eval)
    graph = InferenceModel(view, prep, memory_format=choice.layout)
    return Engine(TorchBackend(graph, CPU, "fp32"), mini.classes, prep, batch_size, kernels=choice)


def test_an_engine_computes_with_the_kernels_its_model_was_configured_with(vit, mini, monkeypatch):
    split = mini.test.subset(torch.arange(40))
    plain, labels = _engine(vit, mini, KernelChoice(attention_eval="sdpa"), 16).score_split(split)
    spy = SdpaSpy(monkeypatch)
    for choice, calls in ((KernelChoice(attention_eval="manual", memory_format="contiguous", eval_batch_size=7), 0),
                          (KernelChoice(attention_eval="sdpa", memory_format="channels_last", eval_batch_size=40),
                           len(attention_modules(vit)))):
        spy.calls.clear()
        engine = _engine(vit, mini, choice, choice.eval_batch_size)
        scores, same = engine.score_split(split)
        assert torch.equal(same, labels) and torch.allclose(scores.logits, plain.logits, atol=1e-4)
        # the choice is really applied: the manual model never calls the fused kernel, sdpa once a layer a batch
        assert len(spy.calls) == calls * -(-40 // choice.eval_batch_size)
    assert all(m.fused_attn for m in attention_modules(vit))  # inference copies leave the model as it was


def test_engine_for_builds_validation_from_the_plans_inference_kernels(vit, mini, monkeypatch):
    cfg = build_config(model="vit_cifar_tiny").replace(eval_attention="manual", eval_depthwise_precision="none",
                                                       memory_format="contiguous", eval_precision="fp32",
                                                       eval_batch_size=9)
    spy = SdpaSpy(monkeypatch)
    engine = engine_for(vit, cfg, mini, CPU)
    assert engine.batch_size == 9 and engine.precision == "fp32"
    scores, labels = engine.score_split(mini.test.subset(torch.arange(20)))
    assert scores.logits.shape == (20, 10) and spy.calls == []
    assert all(m.fused_attn for m in attention_modules(vit))  # the trained model keeps the training kernels
    view = engine.backend.graph.model  # an inference copy over the very same tensors
    assert view is not vit and not any(m.fused_attn for m in attention_modules(view))
    assert all(a is b for a, b in zip(view.parameters(), vit.parameters(), strict=True))


def test_tta_over_several_batches_keeps_the_chosen_attention(vit, mini, monkeypatch):
    # regression: TTA entered one kernel context per batch, which failed from the second; a model configured
    # once computes the same in every batch
    split = mini.test.subset(torch.arange(40))
    spy = SdpaSpy(monkeypatch)
    engine = _engine(vit, mini, KernelChoice(attention_eval="manual", memory_format="contiguous"), 12)
    scores, labels = engine.score_split(split, tta="flip")  # 12 // 2 views: 7 batches
    probs = scores.probs
    assert probs.shape == (40, 10) and torch.allclose(probs.sum(1), torch.ones(40, dtype=probs.dtype))
    assert spy.calls == []
    plain, _ = engine.score_split(split)
    assert torch.allclose(scores.logits, plain.logits, atol=1e-5)  # the plain view is the first of each batch


def _kernel_config(run) -> dict:
    config = yaml.safe_load((run / rundir.CONFIG).read_text())
    return {k: config[k] for k in KERNEL_FIELDS}


def tiny_split(folder):
    from imgcls.data import load_dataset

    return load_dataset(str(folder), img_size=32).test


def _context(cfg):
    """The training context a run of `cfg` builds (its model configured with the plan's training kernels)."""
    return build_context(cfg, World(), cfg.device, fresh=True)


def _elsewhere(run):
    """The run's plan, as if it had been made on another machine: what it measured is measured again here."""
    plan = rundir.read_json(run / rundir.PLAN)
    rundir.write_json(run / rundir.PLAN, {**plan, "machine": "another machine; torch 0"})


def test_a_vit_run_records_its_kernels_and_its_config_holds_the_choice(tiny_folder, tmp_path):
    run = fit(build_config(data=str(tiny_folder), model="vit_cifar_tiny", epochs=1, batch_size=32, img_size=32,
                           quiet=True, out=str(tmp_path / "vit")))
    plan = rundir.read_plan(run)
    # the summary holds how the kernels were chosen; the options as given live in config.yaml
    assert rundir.read_json(run / rundir.SUMMARY)["kernels"] == {k: v for k, v in plan.items() if k != "options"}
    assert plan["options"]["model"] == "vit_cifar_tiny"
    config = _kernel_config(run)
    assert config["attention"] in ("sdpa", "manual") and config["eval_attention"] in ("sdpa", "manual")
    assert config["memory_format"] in ("channels_last", "contiguous") and config["compile"] == "off"
    assert isinstance(config["eval_batch_size"], int)  # measured: the plan records the number
    assert plan["sources"]["attention_train"] in ("measured", "cache")
    assert plan["sources"]["attention_eval"] in ("measured", "cache")
    assert plan["sources"]["compile"] == "given"
    assert {"attention", "eval_attention", "memory_format", "eval_batch_size"} <= set(plan["measured"])
    assert "compile" not in plan["measured"]
    assert set(plan["timings"]["attention"]) == set(plan["timings"]["eval_attention"]) == {"sdpa", "manual"}
    # evaluation on the same machine takes the plan's inference kernels as recorded
    trained = load_run(run, "best")
    engine = run_engine(trained)
    assert engine.kernels.attention_eval == config["eval_attention"] and engine.batch_size == config["eval_batch_size"]
    assert engine.kernels.attention_train == "none" and not engine.kernels.source  # taken, not measured
    assert all(m.fused_attn == (config["eval_attention"] == "sdpa") for m in attention_modules(trained.model))
    scores, _ = engine.score_split(tiny_split(tiny_folder))
    assert torch.isfinite(scores.logits).all()
    # on another machine, what the plan measured is measured again for this one
    _elsewhere(run)
    again = run_engine(load_run(run, "best"))
    assert again.kernels.source["attention_eval"] in ("measured", "cache")
    assert again.kernels.source["eval_batch_size"] in ("measured", "cache")


def test_flags_reach_the_run_unchanged(tiny_folder, tmp_path):
    cfg = build_config(data=str(tiny_folder), model="vit_cifar_tiny", epochs=1, batch_size=32, img_size=32,
                       quiet=True, out=str(tmp_path / "flags"), attention="manual", eval_attention="sdpa",
                       memory_format="contiguous", eval_batch_size=50, precision="fp32")
    run = fit(cfg)
    plan = rundir.read_plan(run)
    assert set(plan["sources"].values()) == {"given", "none"} and plan["sources"]["depthwise_train"] == "none"
    assert plan["measured"] == [] and plan["timings"] == {}
    assert _kernel_config(run) == {"attention": "manual", "eval_attention": "sdpa", "depthwise_precision": "none",
                                   "eval_depthwise_precision": "none", "memory_format": "contiguous",
                                   "compile": "off", "eval_batch_size": 50}
    # the model the run trains is configured with the training kernel, its validation with the inference one
    ctx = _context(cfg.replace(out=str(tmp_path / "unused")))
    assert not any(m.fused_attn for m in attention_modules(ctx.model))
    assert all(m.fused_attn for m in attention_modules(ctx.validator.backend.graph.model))
    assert ctx.validator.batch_size == 50 and ctx.cfg.eval_batch_size == 50
    assert all(p.is_contiguous() for p in ctx.model.parameters())


def test_a_layout_chosen_inside_inference_leaves_the_weights_trainable(tiny_folder, tmp_path, monkeypatch):
    # regression: the kernel choice ran inside predict's inference_mode and re-laid the weights out there,
    # as inference tensors; Grad-CAM (report, cam) then failed to backpropagate through them
    from imgcls.inference import run as inference_run
    from tests.conftest import tiny_config

    run = fit(tiny_config(tiny_folder, tmp_path / "run", epochs=1, memory_format="auto"))
    _elsewhere(run)  # so the engine measures the layout (here: is handed one)
    forced = []

    def choose_channels_last(*args, **kw):
        forced.append(kw)
        return KernelChoice(memory_format="channels_last", eval_batch_size=64)

    monkeypatch.setattr(inference_run, "choose_kernels", choose_channels_last)
    trained = load_run(run, "best")  # loaded with torch's default layout; the (forced) choice is channels-last
    weights = [p for p in trained.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert weights and all(p.is_contiguous() for p in weights)
    with torch.inference_mode():  # as predict and eval call it
        engine = run_engine(trained)
        engine.score_split(tiny_split(tiny_folder))
    assert forced and forced[0]["memory_format"] == "auto"
    weights = [p for p in trained.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in weights)
    assert not any(p.is_inference() for p in trained.model.parameters())
    trained.model(torch.zeros(1, 3, 32, 32)).sum().backward()  # what Grad-CAM needs


# ------------------------------------------------------------- manual attention, float32 depthwise convolutions


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


@pytest.mark.parametrize("make", [lambda: copy.deepcopy(create_model("vit_cifar_tiny", 10)), _timm_vit],
                         ids=["imgcls", "timm"])
def test_manual_attention_computes_what_sdpa_computes_and_is_set_back(make):
    model, x = make().eval(), torch.randn(4, 3, 32, 32)
    assert uses_attention(model) and len(attention_modules(model)) >= 2
    set_attention(model, "sdpa")
    fused = model(x)
    view = inference_copy(model, "manual", "none")  # another module tree over the same tensors
    assert not any(m.fused_attn for m in attention_modules(view))
    assert all(m.fused_attn for m in attention_modules(model))  # the original is left as it was
    assert all(a is b for a, b in zip(view.parameters(), model.parameters(), strict=True))
    assert torch.allclose(view(x), fused, atol=1e-5)
    set_attention(model, "manual")
    assert not any(m.fused_attn for m in attention_modules(model))
    manual = model(x)
    set_attention(model, "sdpa")
    assert all(m.fused_attn for m in attention_modules(model))  # and set back
    assert torch.allclose(manual, fused, atol=1e-5)
    # and the written-out path backpropagates to the same gradients
    grads = []
    for kernel in ("sdpa", "manual"):
        model.zero_grad()
        set_attention(model, kernel)
        model(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_manual_attention_is_what_a_training_step_runs(tiny_folder, tmp_path, monkeypatch):
    cfg = build_config(data=str(tiny_folder), model="vit_cifar_tiny", epochs=1, batch_size=32, img_size=32,
                       quiet=True, out=str(tmp_path / "manual"), attention="manual", eval_attention="manual",
                       val_fraction=0.25)
    ctx = _context(cfg.replace(out=str(tmp_path / "unused")))  # the model the run trains
    assert not any(m.fused_attn for m in attention_modules(ctx.model))
    assert not any(m.fused_attn for m in attention_modules(ctx.validator.backend.graph.model))
    spy = SdpaSpy(monkeypatch)
    run = fit(cfg)
    config = _kernel_config(run)
    assert (config["attention"], config["eval_attention"]) == ("manual", "manual")
    # training and its validation never called the fused kernel; only the one-image probes before training (the
    # model's output shape) and after (its FLOP count) did
    assert set(spy.calls) == {1}


def test_depthwise_float32_keeps_the_parameters_and_computes_alike_until_set():
    torch.manual_seed(0)
    model = create_model("convnext_cifar", 10).eval()
    params, keys = list(model.parameters()), list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        before = model(x)
    set_depthwise(model, "autocast")  # nn.Conv2d already runs at the autocast precision: nothing swapped
    assert not any(isinstance(m, DepthwiseConv2d) for m in model.modules())
    view = inference_copy(model, "none", "float32")
    assert sum(isinstance(m, DepthwiseConv2d) and m.float32 for m in view.modules()) == 12
    assert not any(isinstance(m, DepthwiseConv2d) for m in model.modules())  # the original is left as it was
    set_depthwise(model, "float32")
    convs = [m for m in model.modules() if isinstance(m, DepthwiseConv2d)]
    assert len(convs) == 12 and all(c.float32 for c in convs)  # convnext_cifar: 2+2+6+2 blocks
    set_depthwise(model, "float32")
    assert [m for m in model.modules() if isinstance(m, DepthwiseConv2d)] == convs  # swapped once
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True)) and list(model.state_dict()) == keys
    dtypes = []
    convs[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        model(x)
        set_depthwise(model, "autocast")
        assert not any(c.float32 for c in convs)
        assert torch.equal(model(x), before)  # float32 off: nn.Conv2d exactly
    assert dtypes == [torch.float32, torch.bfloat16]


def test_timm_conv2d_same_is_not_switched():
    from timm.layers import Conv2dSame

    model = torch.nn.Sequential(Conv2dSame(8, 8, 3, groups=8), torch.nn.Conv2d(8, 8, 3, groups=2))
    assert not has_depthwise(model)
    set_depthwise(model, "float32")
    assert [type(m) for m in model] == [Conv2dSame, torch.nn.Conv2d]


@pytest.mark.parametrize("train, infer", [("float32", "autocast"), ("autocast", "float32")])
def test_fake_timer_forces_the_depthwise_precision(cache_dir, train, infer):
    model = create_model("convnext_cifar", 10)
    timer = FakeTimer({"depthwise_train": train, "depthwise_eval": infer}, run=True)
    choice = choose(model, timer, precision="bf16", memory_format="channels_last", eval_batch_size=64)
    assert (choice.depthwise_train, choice.depthwise_eval) == (train, infer)
    assert set(choice.timings["depthwise_train"]) == {"autocast", "float32"}
    assert choice.source["depthwise_train"] == "measured" and choice.attention_train == "none"
    assert not any(isinstance(m, DepthwiseConv2d) for m in model.modules())  # measured on a copy
    assert f"depthwise {train} (train) / {infer} (inference)" in choice.describe()
    fp32 = FakeTimer()
    assert choose(model, fp32, name="fp32").depthwise_train == "none"  # no autocast: nothing to choose
    assert not {"depthwise_train", "depthwise_eval"} & fp32.kinds()


def test_a_convnext_run_trains_with_float32_depthwise_and_keeps_it(tiny_folder, tmp_path):
    cfg = build_config(data=str(tiny_folder), model="convnext_cifar", epochs=1, batch_size=32, img_size=32,
                       quiet=True, out=str(tmp_path / "dw"), precision="bf16", depthwise_precision="float32",
                       eval_depthwise_precision="float32", memory_format="channels_last", val_fraction=0.25)
    ctx = _context(cfg.replace(out=str(tmp_path / "unused")))
    trains = [m for m in ctx.model.modules() if isinstance(m, DepthwiseConv2d)]
    assert len(trains) == 12 and all(m.float32 for m in trains)
    run = fit(cfg)
    config = _kernel_config(run)
    assert (config["depthwise_precision"], config["eval_depthwise_precision"]) == ("float32", "float32")
    trained = load_run(run, "best")  # the state_dict keys are nn.Conv2d's: the checkpoint loads into a fresh model
    engine = run_engine(trained)
    assert engine.precision == "bf16" and engine.kernels.depthwise_eval == "float32"
    convs = [m for m in trained.model.modules() if isinstance(m, DepthwiseConv2d)]
    assert len(convs) == 12 and all(m.float32 for m in convs)
    scores, _ = engine.score_split(tiny_split(tiny_folder))
    assert torch.isfinite(scores.logits).all()


class _LayoutProbe(torch.nn.Module):
    """Records, at each forward, whether its weights are channels-last."""

    seen: list = []

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        _LayoutProbe.seen.append(self.conv.weight.is_contiguous(memory_format=torch.channels_last))
        return self.head(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("train", [True, False])
def test_each_layout_is_timed_with_its_own_weights_layout(cache_dir, train):
    # regression: candidates timed in alternation shared one copy, laid out by the last one prepared, so
    # "channels_last" was timed with contiguous weights and the choice was a coin toss
    observed = []

    def timer(kind, candidate, fn):
        _LayoutProbe.seen.clear()
        fn()
        if kind != "gemm":  # the precision probe is a matrix product, no model
            observed.append((kind, fn.case["layout"], set(_LayoutProbe.seen)))  # every timed call, any question
        return 1.0

    choose_kernels(_LayoutProbe(), SHAPE, CPU, "fp32", timer=timer, data_size=100, eval_batch_size=64, train=train)
    assert {layout for kind, layout, _ in observed if kind == "memory_format"} <= {"channels_last", "contiguous"}
    assert {layout for _, layout, _ in observed} == {"channels_last", "contiguous"}
    assert all(seen == {layout == "channels_last"} for _, layout, seen in observed)


def test_a_resumed_run_runs_the_plan_it_recorded(tiny_folder, tmp_path, cache_dir, monkeypatch):
    # the plan (config.yaml) is resolved once: a resumed run takes every kernel as given, training's and
    # inference's alike, and measures nothing
    chosen = []
    real = measure.choose_kernels

    def recording(*args, **kw):
        timer = FakeTimer({"attention_train": "manual", "attention_eval": "sdpa"})
        choice = real(*args, timer=timer, **kw)
        chosen.append((kw, choice, timer))
        return choice

    monkeypatch.setattr("imgcls.training.context.choose_kernels", recording)
    cfg = build_config(data=str(tiny_folder), model="vit_cifar_tiny", epochs=2, batch_size=32, img_size=32,
                       quiet=True, out=str(tmp_path / "resumed"), val_fraction=0.25)
    with pytest.raises(Interrupted):
        fit(cfg, stop_after_steps=4)  # inside epoch 2
    plan = rundir.read_plan(tmp_path / "resumed")
    run = fit(resume=tmp_path / "resumed")
    (_, first, _), (asked, again, timer) = chosen
    assert (first.attention_train, first.attention_eval) == ("manual", "sdpa")
    assert first.source["attention_train"] == first.source["attention_eval"] == "measured"
    assert (asked["attention"], asked["attention_eval"]) == ("manual", "sdpa")  # from config.yaml
    assert asked["eval_batch_size"] == first.eval_batch_size and asked["memory_format"] == first.memory_format
    assert (again.attention_train, again.attention_eval) == ("manual", "sdpa") and timer.calls == []
    assert set(again.source.values()) <= {"given", "none"}
    assert rundir.read_plan(run) == plan  # plan.json still says what the first process measured
    assert {"attention", "eval_attention"} <= set(plan["measured"])  # so eval elsewhere may measure it again


def test_float32_depthwise_is_what_the_training_steps_run(tiny_folder, tmp_path, monkeypatch):
    dtypes = []
    forward = DepthwiseConv2d.forward

    def recording(self, x):
        out = forward(self, x)
        dtypes.append((self.training, out.dtype))
        return out

    monkeypatch.setattr(DepthwiseConv2d, "forward", recording)
    fit(build_config(data=str(tiny_folder), model="convnext_cifar", epochs=1, batch_size=32, img_size=32,
                     quiet=True, out=str(tmp_path / "dw"), precision="bf16", depthwise_precision="float32",
                     memory_format="channels_last", val_fraction=0.25))
    trained = {dtype for training, dtype in dtypes if training}
    assert trained == {torch.float32}  # every depthwise convolution of every training step
