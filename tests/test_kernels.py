"""imgcls.kernels: kernels chosen by measurement (a fake timer decides here), flags, the cache, and a run."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import yaml

from imgcls import kernels, rundir
from imgcls.config import build_config
from imgcls.evaluation.predict import load_run, predict_logits, predict_probs
from imgcls.kernels import DepthwiseConv2d, KernelChoice, attached, choose_kernels
from imgcls.models import create_model
from imgcls.training.train import Interrupted, fit

CPU = torch.device("cpu")
SHAPE = (8, 3, 32, 32)


class FakeTimer:
    """Makes `prefer[kind]` the fastest candidate of each kind (by far); counts its calls. With `run`, it
    also calls the timed function, so a candidate that cannot run raises as under the real timer."""

    def __init__(self, prefer: dict | None = None, run: bool = False):
        self.prefer, self.run, self.calls = prefer or {}, run, []

    def __call__(self, kind, candidate, fn):
        self.calls.append((kind, candidate))
        if self.run:
            fn()
        ms = 1.0 if self.prefer.get(kind) == candidate else 10.0
        return ms * int(candidate) if kind == "eval_batch_size" else ms  # the chooser divides by the batch

    def kinds(self) -> set:
        return {k for k, _ in self.calls}


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_model("vit_cifar_tiny", 10)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(kernels, "machine_busy", lambda: False)  # caching is tested apart from the load
    return tmp_path / "cache"


def test_timings_taken_on_a_busy_machine_are_used_but_not_cached(vit, cache_dir, monkeypatch):
    monkeypatch.setattr(kernels, "machine_busy", lambda: True)
    choice = choose(vit, FakeTimer({"attention_train": "flash"}))
    assert choice.attention_train == "flash" and choice.source["attention_train"] == "measured"
    assert not (cache_dir / "kernels.json").exists()
    again = FakeTimer({"attention_train": "math"})
    assert choose(vit, again).attention_train == "math" and again.calls  # measured afresh


def choose(model, timer, precision="fp32", **kw):
    return choose_kernels(model, SHAPE, CPU, precision, timer=timer, **{"data_size": 1000, **kw})


@pytest.mark.parametrize("train, infer", [("math", "flash"), ("flash", "math")])
def test_fake_timer_forces_each_attention_choice_apart(vit, cache_dir, train, infer):
    timer = FakeTimer({"attention_train": train, "attention_eval": infer})
    choice = choose(vit, timer)
    assert (choice.attention_train, choice.attention_eval) == (train, infer)
    assert choice.source["attention_train"] == choice.source["attention_eval"] == "measured"
    assert set(choice.timings["attention_train"]) == {"math", "flash", "efficient", "manual"}


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
def test_fake_timer_forces_the_memory_format(vit, cache_dir, layout):
    choice = choose(vit, FakeTimer({"memory_format": layout}))
    assert choice.memory_format == layout
    assert choice.layout == (torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("batch", [64, 256, 512])
def test_fake_timer_forces_the_eval_batch_size_capped_by_the_data(vit, cache_dir, batch):
    timer = FakeTimer({"eval_batch_size": str(batch)})
    choice = choose(vit, timer)
    assert choice.eval_batch_size == batch
    assert sorted(map(int, choice.timings["eval_batch_size"])) == [64, 128, 256, 512]
    capped = choose(vit, FakeTimer({"eval_batch_size": "300"}), data_size=300, name="few images")
    assert capped.eval_batch_size == 300 and sorted(map(int, capped.timings["eval_batch_size"])) == [64, 128, 256, 300]


@pytest.mark.parametrize("winner", ["on", "off"])
def test_compile_is_timed_only_when_auto(vit, cache_dir, winner):
    timer = FakeTimer({"compile": winner})
    assert choose(vit, timer, compile="auto").compile == winner
    assert "compile" in timer.kinds()
    timer = FakeTimer({"compile": "on"})
    choice = choose(vit, timer, compile="off", name="other")
    assert choice.compile == "off" and choice.source["compile"] == "flag" and "compile" not in timer.kinds()


def test_a_backend_that_raises_is_skipped(vit, cache_dir):
    # efficient attention is CUDA-only: preferred by the timer, it fails on the CPU and is not chosen
    timer = FakeTimer({"attention_train": "efficient", "attention_eval": "efficient"}, run=True)
    choice = choose(vit, timer, memory_format="contiguous", eval_batch_size=64)
    assert {choice.attention_train, choice.attention_eval} <= {"math", "flash", "manual"}
    assert choice.timings["attention_train"]["efficient"] is None
    assert choice.timings["attention_eval"]["math"] is not None


def test_flags_are_taken_as_given_and_not_timed(vit, cache_dir):
    timer = FakeTimer({"attention_train": "math", "memory_format": "channels_last"})
    choice = choose(vit, timer, attention="flash", memory_format="contiguous", compile="on", eval_batch_size=100)
    assert timer.calls == []
    assert (choice.attention_train, choice.attention_eval, choice.memory_format, choice.compile,
            choice.eval_batch_size) == ("flash", "flash", "contiguous", "on", 100)
    assert set(choice.source.values()) == {"flag", "n/a"} and choice.source["depthwise_train"] == "n/a"  # a ViT
    assert choice.config_values("flash", "auto") == {"attention": "flash", "depthwise_precision": "auto",
                                                     "memory_format": "contiguous", "compile": "on"}


def test_inference_alone_times_no_training_step(vit, cache_dir):
    # load_run and --cache-features: nothing trains through the model, so no training attention or compile
    timer = FakeTimer({"attention_eval": "flash", "memory_format": "contiguous"})
    choice = choose(vit, timer, compile="auto", train=False)
    assert (choice.attention_train, choice.attention_eval, choice.memory_format, choice.compile) == (
        "n/a", "flash", "contiguous", "off")
    assert timer.kinds() == {"attention_eval", "memory_format", "eval_batch_size"}


def test_a_model_without_sdpa_has_no_attention_to_time(cache_dir):
    timer = FakeTimer()
    choice = choose(create_model("fastnet_cifar_small", 10), timer, attention="auto")
    assert (choice.attention_train, choice.attention_eval) == ("n/a", "n/a")
    assert not {"attention_train", "attention_eval"} & timer.kinds()
    assert choice.config_values("auto", "auto")["attention"] == "auto"  # nothing chosen, the request is kept
    assert kernels.uses_sdpa(create_model("vit_cifar_tiny", 10))


def test_a_cache_hit_times_nothing_and_a_corrupt_cache_is_ignored(vit, cache_dir):
    first = FakeTimer({"attention_train": "flash", "attention_eval": "math", "eval_batch_size": "128"})
    measured = choose(vit, first)
    assert first.calls and (cache_dir / "kernels.json").is_file()
    again = FakeTimer({"attention_train": "math"})
    cached = choose(vit, again)
    assert again.calls == []
    assert {f: cached.source[f] for f in ("attention_train", "memory_format", "eval_batch_size")} == dict.fromkeys(
        ("attention_train", "memory_format", "eval_batch_size"), "cache")
    assert (cached.attention_train, cached.attention_eval, cached.eval_batch_size) == ("flash", "math", 128)
    assert cached.memory_format == measured.memory_format
    # another shape is another entry
    other = FakeTimer()
    choose_kernels(vit, (16, 3, 32, 32), CPU, "fp32", timer=other, data_size=1000)
    assert other.calls

    for damage in (b"{not json", b'{"version": %d, "entries": {"x": 3}}' % kernels.CACHE_VERSION, b"[1, 2]",
                   b"\xff\xfe", json.dumps({"version": 1, "entries": {}}).encode()):  # an older version's cache
        (cache_dir / "kernels.json").write_bytes(damage)
        timer = FakeTimer({"attention_train": "math"})
        choice = choose(vit, timer)
        assert timer.calls and choice.attention_train == "math" and choice.source["attention_train"] == "measured"
        assert json.loads((cache_dir / "kernels.json").read_text())["version"] == kernels.CACHE_VERSION  # rewritten

    # a value in the cache that is no choice is measured again, not used
    data = json.loads((cache_dir / "kernels.json").read_text())
    for entry in data["entries"].values():
        entry["attention_train"]["value"] = "warp-drive"
    (cache_dir / "kernels.json").write_text(json.dumps(data))
    timer = FakeTimer({"attention_train": "flash"})
    assert choose(vit, timer).attention_train == "flash" and timer.kinds() == {"attention_train"}


def test_an_unwritable_cache_never_breaks_a_choice(vit, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(blocker))
    timer = FakeTimer({"attention_eval": "flash"})
    assert choose(vit, timer).attention_eval == "flash"


def test_the_sdpa_context_selects_the_backend():
    q, k, v = (torch.randn(2, 3, 17, 8) for _ in range(3))
    reference = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1) @ v
    math_only = KernelChoice(attention_train="flash", attention_eval="math")
    none = torch.nn.Identity()
    with math_only.context(none, train=False):
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        assert torch.allclose(F.scaled_dot_product_attention(q, k, v), reference, atol=1e-5)
    with math_only.context(none, train=True):
        assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
        assert torch.allclose(F.scaled_dot_product_attention(q, k, v), reference, atol=1e-5)
    # documented: a backend that cannot run here raises, it does not fall back silently
    with KernelChoice(attention_eval="efficient").context(none, train=False), pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, v)
    with KernelChoice().context(none, train=True):  # "n/a": torch's own choice, all backends allowed
        assert torch.backends.cuda.math_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()


def test_predict_logits_uses_the_kernels_it_is_given(vit, mini):
    split = mini.test.subset(torch.arange(40))
    plain, labels = predict_logits(vit, split, mini.mean, mini.std, CPU, "fp32", 16)
    for choice in (KernelChoice("math", "math", "contiguous", eval_batch_size=7),
                   KernelChoice("flash", "flash", "channels_last", eval_batch_size=40)):
        logits, same = predict_logits(vit, split, mini.mean, mini.std, CPU, "fp32", kernels=choice)
        assert torch.equal(same, labels) and torch.allclose(logits, plain, atol=1e-4)
    with pytest.raises(RuntimeError):  # the choice is really applied: efficient attention cannot run on a CPU
        predict_logits(vit, split, mini.mean, mini.std, CPU, "fp32", kernels=KernelChoice("math", "efficient"))


def test_tta_over_several_batches_keeps_the_chosen_attention(vit, mini):
    # regression: predict_probs entered one sdpa_kernel context per batch, which fails from the second
    split = mini.test.subset(torch.arange(40))
    choice = KernelChoice("math", "math", "contiguous", eval_batch_size=12)  # 12 // 2 views: 7 batches
    probs, labels = predict_probs(vit, split, mini.mean, mini.std, CPU, "fp32", tta="flip", kernels=choice)
    assert probs.shape == (40, 10) and torch.allclose(probs.sum(1), torch.ones(40, dtype=probs.dtype))
    with pytest.raises(RuntimeError):
        predict_probs(vit, split, mini.mean, mini.std, CPU, "fp32", tta="flip",
                      kernels=KernelChoice("math", "efficient"))


def _kernel_config(run) -> dict:
    config = yaml.safe_load((run / rundir.CONFIG).read_text())
    return {k: config[k] for k in ("attention", "memory_format", "compile")}


def test_a_vit_run_records_its_kernels_and_its_config_holds_the_choice(tiny_folder, tmp_path):
    run = fit(build_config(data=str(tiny_folder), model="vit_cifar_tiny", epochs=1, batch_size=32, img_size=32,
                           quiet=True, out=str(tmp_path / "vit")))
    recorded = rundir.read_json(run / rundir.SUMMARY)["kernels"]
    assert recorded["attention_train"] in ("math", "flash", "manual")
    assert recorded["attention_eval"] in ("math", "flash", "manual")
    assert recorded["source"]["attention_train"] in ("measured", "cache")
    assert recorded["source"]["compile"] == "flag"
    assert set(recorded["timings"]["attention_train"]) == {"math", "flash", "efficient", "manual"}
    assert _kernel_config(run) == {"attention": recorded["attention_train"],
                                   "memory_format": recorded["memory_format"], "compile": "off"}
    # evaluation loads the run and chooses its inference kernels when it first predicts
    trained = load_run(run, "best")
    logits, _ = predict_logits(trained.model, tiny_split(tiny_folder), trained.dataset["mean"],
                               trained.dataset["std"], CPU, "fp32")
    choice = attached(trained.model)
    assert isinstance(choice, KernelChoice) and choice.attention_eval in ("math", "flash", "manual")
    assert choice.source["attention_eval"] in ("measured", "cache")  # not the training choice taken as a flag
    assert choice.attention_train == "n/a" and torch.isfinite(logits).all()


def tiny_split(folder):
    from imgcls.data import load_dataset

    return load_dataset(str(folder), img_size=32).test


def test_flags_reach_the_run_unchanged(tiny_folder, tmp_path):
    run = fit(build_config(data=str(tiny_folder), model="vit_cifar_tiny", epochs=1, batch_size=32, img_size=32,
                           quiet=True, out=str(tmp_path / "flags"), attention="math", memory_format="contiguous",
                           eval_batch_size=50))
    recorded = rundir.read_json(run / rundir.SUMMARY)["kernels"]
    assert (recorded["attention_train"], recorded["attention_eval"], recorded["memory_format"],
            recorded["eval_batch_size"]) == ("math", "math", "contiguous", 50)
    assert set(recorded["source"].values()) == {"flag", "n/a"} and recorded["timings"] == {}  # n/a: no depthwise
    assert _kernel_config(run) == {"attention": "math", "memory_format": "contiguous", "compile": "off"}


def test_a_layout_chosen_inside_inference_leaves_the_weights_trainable(tiny_folder, tmp_path, monkeypatch):
    # regression: the lazy choice ran inside predict's inference_mode and re-laid the weights out there,
    # as inference tensors; Grad-CAM (report, cam) then failed to backpropagate through them
    from imgcls.evaluation import predict
    from tests.conftest import tiny_config

    run = fit(tiny_config(tiny_folder, tmp_path / "run", epochs=1, memory_format="auto"))
    monkeypatch.setattr(predict, "choose_kernels", lambda *a, **k: KernelChoice(memory_format="contiguous"))
    trained = load_run(run, "best")  # loaded channels-last; the (forced) choice is contiguous
    predict_probs(trained.model, tiny_split(tiny_folder), trained.dataset["mean"], trained.dataset["std"], CPU,
                  "fp32")
    weights = [p for p in trained.model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous() and not p.is_inference() for p in weights)
    trained.model(torch.zeros(1, 3, 32, 32)).sum().backward()  # what Grad-CAM needs


# ------------------------------------------------------------- manual attention, float32 depthwise convolutions


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)


@pytest.mark.parametrize("make", [lambda: copy.deepcopy(create_model("vit_cifar_tiny", 10)), _timm_vit],
                         ids=["imgcls", "timm"])
def test_manual_attention_computes_what_sdpa_computes_and_is_switched_back(make):
    model, x = make().eval(), torch.randn(4, 3, 32, 32)
    assert kernels.uses_sdpa(model) and len(kernels.attention_modules(model)) >= 2
    fused = model(x)
    with KernelChoice(attention_eval="manual").context(model, train=False):
        assert not any(m.fused_attn for m in kernels.attention_modules(model))
        manual = model(x)
    assert all(m.fused_attn for m in kernels.attention_modules(model))  # restored on leaving
    assert torch.allclose(manual, fused, atol=1e-5)
    # and the written-out path backpropagates to the same gradients
    grads = []
    for choice in (KernelChoice(attention_train="math"), KernelChoice(attention_train="manual")):
        model.zero_grad()
        with choice.context(model, train=True):
            model(x).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_manual_attention_is_what_a_training_step_runs(tiny_folder, tmp_path, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: calls.append(len(q)) or sdpa(q, *a, **k))
    run = fit(build_config(data=str(tiny_folder), model="vit_cifar_tiny", epochs=1, batch_size=32, img_size=32,
                           quiet=True, out=str(tmp_path / "manual"), attention="manual", val_fraction=0.25))
    recorded = rundir.read_json(run / rundir.SUMMARY)["kernels"]
    assert (recorded["attention_train"], recorded["attention_eval"]) == ("manual", "manual")
    # training and its evaluation never called the fused kernel; only the one-image probes before training (the
    # model's output shape) and after (its FLOP count) did
    assert set(calls) == {1}
    assert _kernel_config(run)["attention"] == "manual"


def test_switchable_depthwise_keeps_the_parameters_and_computes_alike_until_switched():
    torch.manual_seed(0)
    model = create_model("convnext_cifar", 10).eval()
    params, keys = list(model.parameters()), list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        before = model(x)
    convs = kernels.switchable_depthwise(model)
    assert len(convs) == 12 and not any(c.float32 for c in convs)  # convnext_cifar: 2+2+6+2 blocks
    assert kernels.switchable_depthwise(model) == convs  # swapped once
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True)) and list(model.state_dict()) == keys
    dtypes = []
    convs[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert torch.equal(model(x), before)  # switched off: nn.Conv2d exactly
        with KernelChoice(depthwise_eval="float32").context(model, train=False):
            assert all(c.float32 for c in convs)
            model(x)
        with KernelChoice(depthwise_eval="float32", depthwise_train="autocast").context(model, train=True):
            model(x)
    assert dtypes == [torch.bfloat16, torch.float32, torch.bfloat16]
    assert not any(c.float32 for c in convs)


def test_timm_conv2d_same_is_not_switched():
    from timm.layers import Conv2dSame

    model = torch.nn.Sequential(Conv2dSame(8, 8, 3, groups=8), torch.nn.Conv2d(8, 8, 3, groups=2))
    assert not kernels.has_depthwise(model) and kernels.switchable_depthwise(model) == []


@pytest.mark.parametrize("train, infer", [("float32", "autocast"), ("autocast", "float32")])
def test_fake_timer_forces_the_depthwise_precision(cache_dir, train, infer):
    model = create_model("convnext_cifar", 10)
    timer = FakeTimer({"depthwise_train": train, "depthwise_eval": infer}, run=True)
    choice = choose(model, timer, precision="bf16", memory_format="channels_last", eval_batch_size=64)
    assert (choice.depthwise_train, choice.depthwise_eval) == (train, infer)
    assert set(choice.timings["depthwise_train"]) == {"autocast", "float32"}
    assert choice.source["depthwise_train"] == "measured" and choice.attention_train == "n/a"
    assert not any(isinstance(m, DepthwiseConv2d) for m in model.modules())  # measured on a copy
    assert f"depthwise {train} (train) / {infer} (inference)" in choice.describe()
    fp32 = FakeTimer()
    assert choose(model, fp32, name="fp32").depthwise_train == "n/a"  # no autocast: nothing to choose
    assert not {"depthwise_train", "depthwise_eval"} & fp32.kinds()


def test_a_convnext_run_trains_with_float32_depthwise_and_keeps_it(tiny_folder, tmp_path):
    run = fit(build_config(data=str(tiny_folder), model="convnext_cifar", epochs=1, batch_size=32, img_size=32,
                           quiet=True, out=str(tmp_path / "dw"), precision="bf16", depthwise_precision="float32",
                           memory_format="channels_last", val_fraction=0.25))
    recorded = rundir.read_json(run / rundir.SUMMARY)
    assert (recorded["kernels"]["depthwise_train"], recorded["kernels"]["depthwise_eval"]) == ("float32", "float32")
    assert yaml.safe_load((run / rundir.CONFIG).read_text())["depthwise_precision"] == "float32"
    trained = load_run(run, "best")  # the state_dict keys are nn.Conv2d's: the checkpoint loads into a fresh model
    logits, _ = predict_logits(trained.model, tiny_split(tiny_folder), trained.dataset["mean"],
                               trained.dataset["std"], CPU, "bf16")
    assert torch.isfinite(logits).all() and attached(trained.model).depthwise_eval == "float32"


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
        if kind == "memory_format":
            observed.append((candidate, set(_LayoutProbe.seen)))
        return 1.0

    choose_kernels(_LayoutProbe(), SHAPE, CPU, "fp32", timer=timer, data_size=100, eval_batch_size=64, train=train)
    assert len(observed) == 2 * (1 + kernels.REPEATS)
    assert all(seen == {candidate == "channels_last"} for candidate, seen in observed)


def test_a_resumed_run_trains_with_its_recorded_kernels_and_chooses_inference_again(tiny_folder, tmp_path,
                                                                                      cache_dir, monkeypatch):
    chosen = []
    real = kernels.choose_kernels

    def recording(*args, **kw):
        choice = real(*args, timer=FakeTimer({"attention_train": "math", "attention_eval": "flash"}), **kw)
        chosen.append((kw, choice))
        return choice

    monkeypatch.setattr("imgcls.training.train.choose_kernels", recording)
    cfg = build_config(data=str(tiny_folder), model="vit_cifar_tiny", epochs=2, batch_size=32, img_size=32,
                       quiet=True, out=str(tmp_path / "resumed"), val_fraction=0.25)
    with pytest.raises(Interrupted):
        fit(cfg, stop_after_steps=4)  # inside epoch 2
    run = fit(resume=tmp_path / "resumed")
    (_, first), (asked, again) = chosen
    assert (first.attention_train, first.attention_eval) == ("math", "flash")
    assert asked["attention"] == "math" and asked["attention_eval"] == "auto"  # training's from config.yaml
    assert (again.attention_train, again.source["attention_train"]) == ("math", "flag")
    assert again.attention_eval == "flash" and again.source["attention_eval"] in ("measured", "cache")
    recorded = rundir.read_json(run / rundir.SUMMARY)["kernels"]
    assert recorded["source"]["attention_eval"] != "flag"  # so eval and predict may choose it for themselves


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
