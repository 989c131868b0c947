"""Precision is a measured kernel choice: a lower precision only when it is clearly faster (the 10% rule),
for training and inference apart, recorded in the plan, kept by a resumed run, applied at inference."""

import pytest
import torch
import yaml

from imgcls import rundir
from imgcls.cli import main
from imgcls.inference.exported import open_engine
from imgcls.inference.run import load_run, run_engine
from imgcls.kernels import cache, measure
from imgcls.kernels.measure import PRECISION_MARGIN, choose_kernels, lowest_good_precision
from imgcls.models import create_model
from imgcls.training.train import Interrupted, fit
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def priced(train: dict, infer: dict | None = None, gemm: dict | None = None):
    """A fake machine: milliseconds per training step and per inference image by precision, and of the GEMM
    probe (by default the best ratio to fp32 the model shows, so the probe rules out nothing the model gains)."""
    infer = infer or train
    gemm = gemm or {p: min(train[p] / train["fp32"], infer[p] / infer["fp32"]) for p in train}

    def timer(kind, candidate, fn):
        case = fn.case
        if case["kind"] == "gemm":
            return gemm[case["precision"]]
        return train[case["precision"]] if case["kind"] == "train" else infer[case["precision"]] * case["batch"] * 1e-3

    return timer


@pytest.fixture(autouse=True)
def quiet_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cache, "machine_busy", lambda: False)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return create_model("fastnet_cifar_small", 10)


def choose(model, timer, precision="auto", **kw):
    return choose_kernels(model, (16, 3, 32, 32), CPU, precision, timer=timer, data_size=200,
                          **{"memory_format": "channels_last", "eval_batch_size": 64, **kw})


@pytest.mark.parametrize("bf16, expected", [(0.85, "bf16"), (0.9, "bf16"), (0.95, "fp32"), (1.3, "fp32")])
def test_a_lower_precision_only_when_clearly_faster(cnn, bf16, expected):
    """The rule: bf16 is taken when its time is at most 90% of fp32's; a 5% lead is noise, a loss is a loss."""
    assert PRECISION_MARGIN == 0.10
    choice = choose(cnn, priced({"fp32": 100.0, "bf16": 100.0 * bf16}, gemm={"fp32": 1.0, "bf16": 1.0}))
    assert choice.precision_train == choice.precision_eval == expected
    assert choice.source["precision_train"] == choice.source["precision_eval"] == "measured"
    assert set(choice.timings["precision_train"]) == {"fp32", "bf16"}


def test_training_and_inference_are_decided_apart(cnn):
    choice = choose(cnn, priced({"fp32": 100.0, "bf16": 60.0}, {"fp32": 1.0, "bf16": 1.2}))
    assert (choice.precision_train, choice.precision_eval) == ("bf16", "fp32")
    choice = choose(cnn, priced({"fp32": 100.0, "bf16": 130.0}, {"fp32": 1.0, "bf16": 0.5}), name="other")
    assert (choice.precision_train, choice.precision_eval) == ("fp32", "bf16")


def test_the_rule_among_several_lower_precisions_and_failures():
    assert lowest_good_precision({"fp32": 10.0, "bf16": 8.0, "fp16": 7.0}) == "fp16"  # the fastest clear winner
    assert lowest_good_precision({"fp32": 10.0, "bf16": 9.5, "fp16": 8.9}) == "fp16"
    assert lowest_good_precision({"fp32": 10.0, "bf16": 9.5, "fp16": None}) == "fp32"  # fp16 could not run
    assert lowest_good_precision({"fp32": None, "bf16": 9.5}) == "bf16"  # fp32 failed: what ran
    assert lowest_good_precision({"fp32": 10.0}) == "fp32"


def test_a_given_precision_is_not_timed_and_inference_follows_it(cnn):
    calls = []

    def timer(kind, candidate, fn):
        calls.append(kind)
        return 1.0

    choice = choose(cnn, timer, precision="bf16")
    assert (choice.precision_train, choice.precision_eval) == ("bf16", "bf16")
    assert choice.source["precision_train"] == choice.source["precision_eval"] == "given"
    assert not {"precision_train", "precision_eval"} & set(calls)
    choice = choose(cnn, timer, precision="bf16", precision_eval="fp32", name="apart")
    assert (choice.precision_train, choice.precision_eval) == ("bf16", "fp32")


def test_a_candidate_far_behind_on_its_warm_up_is_timed_no_more(cnn):
    """5x behind on its warm-up, bf16's step is not timed again: the choice costs seconds, not a minute (the GEMM
    probe let it through: its matrix products are as fast as fp32's on this fake machine)."""
    calls = []
    fake = priced({"fp32": 100.0, "bf16": 500.0}, gemm={"fp32": 1.0, "bf16": 1.0})

    def timer(kind, candidate, fn):
        calls.append((kind, fn.case["precision"]))
        return fake(kind, candidate, fn)

    choice = choose(cnn, timer)
    assert choice.precision_train == "fp32"
    assert calls.count(("precision_train", "bf16")) == 1  # its warm-up
    assert calls.count(("precision_train", "fp32")) == 1 + measure.REPEATS


def test_the_gemm_probe_rules_out_a_precision_slower_at_matrix_products(cnn):
    """Where bf16's matrix product is more than 10% slower than fp32's (emulated bf16; a CPU with a bf16 flag
    but slow bf16), bf16 is never timed on the model: the probe's timings are what the choice records."""
    calls = []
    fake = priced({"fp32": 100.0, "bf16": 50.0}, gemm={"fp32": 1.0, "bf16": 1.54})  # Xeon 207: 100 vs 65 GFLOP/s

    def timer(kind, candidate, fn):
        calls.append((kind, fn.case["precision"]))
        return fake(kind, candidate, fn)

    choice = choose(cnn, timer)
    assert (choice.precision_train, choice.precision_eval) == ("fp32", "fp32")
    assert not [c for c in calls if c[0].startswith("precision")]
    assert choice.timings["precision_train"] == {"gemm fp32": 1.0, "gemm bf16": 1.54}
    assert measure.GEMM_BEHIND == 1.10


def test_a_slow_first_matrix_product_is_setup_not_emulation(cnn):
    """On a Xeon with AMX the first bf16 product of a process (tile setup) took more than 3x fp32's: the probe
    called bf16 emulated after that one call, and every model trained in fp32 at a sixth of bf16's speed."""
    calls = []
    fake = priced({"fp32": 100.0, "bf16": 40.0})

    def timer(kind, candidate, fn):
        calls.append((kind, fn.case["precision"]))
        first_bf16 = fn.case["kind"] == "gemm" and fn.case["precision"] == "bf16" and \
            calls.count(("gemm", "bf16")) == 1
        return 50.0 if first_bf16 else fake(kind, candidate, fn)

    choice = choose(cnn, timer)
    assert (choice.precision_train, choice.precision_eval) == ("bf16", "bf16")
    assert calls.count(("gemm", "bf16")) == 2 + measure.REPEATS  # the slow first call, the fast second, then timed
    cache.cache_path().unlink()  # the probe is cached per machine: measure it again
    emulated = []  # slow on the second call too: emulated, no more calls
    choose(cnn, lambda kind, candidate, fn: emulated.append((kind, fn.case["precision"])) or
           (50.0 if fn.case["kind"] == "gemm" and fn.case["precision"] == "bf16" else 1.0), name="emulated")
    assert emulated.count(("gemm", "bf16")) == 2


def test_the_choice_is_cached_with_its_precisions(cnn):
    first = choose(cnn, priced({"fp32": 100.0, "bf16": 50.0}))
    calls = []
    again = choose(cnn, lambda kind, candidate, fn: calls.append(kind) or 1.0)
    assert again.precision_train == first.precision_train == "bf16" and calls == []
    assert again.source["precision_train"] == "cache"


def test_a_bf16_choice_is_recorded_resumed_and_applied_at_inference(tiny_folder, tmp_path, monkeypatch):
    """Measured bf16 (a fake timer stands in for a CPU with fast bf16) goes into config.yaml and plan.json;
    a resumed run keeps it without measuring; eval and predict score at the plan's inference precision."""
    monkeypatch.setattr(measure, "time_ms", priced({"fp32": 100.0, "bf16": 50.0}))
    cfg = tiny_config(tiny_folder, tmp_path / "bf16", precision="auto", memory_format="channels_last")
    with pytest.raises(Interrupted):
        fit(cfg, stop_after_steps=5)
    run = tmp_path / "bf16"
    config = yaml.safe_load((run / rundir.CONFIG).read_text())
    assert (config["precision"], config["eval_precision"]) == ("bf16", "bf16")
    assert {"precision", "eval_precision"} <= set(rundir.read_plan(run)["measured"])

    def no_timing(*args):
        raise AssertionError("a resumed run measures nothing")

    monkeypatch.setattr(measure, "time_ms", no_timing)
    fit(resume=run)
    assert yaml.safe_load((run / rundir.CONFIG).read_text())["precision"] == "bf16"
    assert rundir.read_json(run / rundir.SUMMARY)["precision"] == "bf16"

    engine = open_engine(run)
    assert engine.precision == "bf16"
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    assert rundir.read_json(run / "eval-test.json")["precision"] == "bf16"
    fp32 = run_engine(load_run(run), precision="fp32")  # what export parity compares against
    assert fp32.precision == "fp32"
    images = load_run(run).split("test").images[:16].permute(0, 2, 3, 1)
    bf16_probs, fp32_probs = engine.score(images).probs, fp32.score(images).probs
    assert not torch.equal(bf16_probs, fp32_probs) and torch.allclose(bf16_probs, fp32_probs, atol=0.05)
