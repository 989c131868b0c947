"""The one inference engine: predict and eval score the same images alike, with the plan's kernels, the
same from eight threads as from one, and within its batch policy."""

import csv
import json
import threading

import pytest
import torch

from imgcls import rundir
from imgcls.cli import main
from imgcls.data import folder
from imgcls.inference.engine import Engine
from imgcls.inference.exported import open_engine
from imgcls.inference.run import load_run, run_engine
from imgcls.kernels.apply import DepthwiseConv2d
from imgcls.models.contract import attention_modules
from imgcls.training.train import fit
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def vit_run(tiny_folder, tmp_path_factory):
    """A ViT (attention to choose) whose inference kernels the plan measured (no --eval-attention given)."""
    out = tmp_path_factory.mktemp("engine") / "vit"
    return fit(tiny_config(tiny_folder, out, model="vit_cifar_tiny", epochs=1))


def _csv_probs(path, classes) -> dict[str, list[float]]:
    """{file: probability per class} from a predict CSV whose top-k covers every class."""
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            probs = {row[f"top{n}"]: float(row[f"top{n}_prob"]) for n in range(1, len(classes) + 1)}
            out[row["path"]] = [probs[c] for c in classes]
    return out


def test_predict_and_eval_give_the_same_probabilities(vit_run, tiny_folder, tmp_path, capsys):
    """`imgcls predict RUN test/ --out x.csv` and `imgcls eval RUN` score the test images through the same
    engine: the same calibrated probabilities per file (same precision), and the same accuracy."""
    assert main(["calibrate", str(vit_run), "--device", "cpu"]) == 2  # 4 val images a class: too few to fit one
    classes = load_run(vit_run).classes
    out = tmp_path / "x.csv"
    assert main(["predict", str(vit_run), str(tiny_folder / "test"), "--out", str(out), "--topk", str(len(classes)),
                 "--quiet"]) == 0
    predicted = _csv_probs(out, classes)
    assert main(["eval", str(vit_run), "--device", "cpu"]) == 0
    capsys.readouterr()
    evaluated = json.loads((vit_run / "eval-test.json").read_text())

    trained = load_run(vit_run)
    engine = run_engine(trained)  # what evaluate_run scores with
    scores, labels = engine.score_split(trained.split("test"))
    _, found = folder.scan(tiny_folder)
    files, _ = found["test"]  # the split's images in order: decoded from these files
    assert len(files) == len(scores.probs) == len(predicted)
    for path, probs in zip(files, scores.probs, strict=True):
        assert predicted[str(path)] == pytest.approx(probs.tolist(), abs=1e-6)
    hits = [max(range(len(classes)), key=predicted[str(p)].__getitem__) == y for p, y in zip(files, labels.tolist(),
                                                                                              strict=True)]
    assert evaluated["accuracy"] == pytest.approx(sum(hits) / len(hits))
    assert evaluated["precision"] == engine.precision == trained.config.eval_precision


def test_predict_uses_the_plans_measured_kernels(vit_run):
    """The run's plan measured its inference kernels (plan.json says so); the engine predict builds runs with
    exactly those: the attention kernel, the layout, the batch size and the precision."""
    cfg = load_run(vit_run).config
    plan = rundir.read_plan(vit_run)
    assert {"eval_attention", "eval_batch_size"} <= set(plan["measured"])
    engine = open_engine(vit_run)
    assert engine.kernels.attention_eval == cfg.eval_attention in ("sdpa", "manual")
    assert engine.batch_size == cfg.eval_batch_size
    assert engine.precision == cfg.eval_precision
    fused = {m.fused_attn for m in attention_modules(engine.module)}
    assert fused == {cfg.eval_attention == "sdpa"}
    assert engine.kernels.source == {}  # taken from the plan, nothing measured again on this machine


def test_another_machine_measures_the_inference_kernels_again(vit_run, tmp_path):
    """Used where it was not planned (plan.json names another machine), a run's measured inference kernels
    are chosen again for this machine (then cached); values the user gave would be kept."""
    plan = rundir.read_plan(vit_run)
    rundir.write_json(vit_run / rundir.PLAN, {**plan, "machine": "some other CPU; torch 0"})
    try:
        engine = open_engine(vit_run)
        assert engine.kernels.source["attention_eval"] in ("measured", "cache")
        assert engine.kernels.source["eval_batch_size"] in ("measured", "cache")
    finally:
        rundir.write_json(vit_run / rundir.PLAN, plan)


def test_given_inference_kernels_are_kept(tiny_folder, tmp_path):
    """--eval-attention and --eval-batch-size given: the plan records them and the engine runs with them."""
    run = fit(tiny_config(tiny_folder, tmp_path / "given", model="vit_cifar_tiny", epochs=1, eval_attention="manual",
                          eval_batch_size=7))
    engine = open_engine(run)
    assert engine.batch_size == 7 and engine.kernels.attention_eval == "manual"
    assert {m.fused_attn for m in attention_modules(engine.module)} == {False}
    assert "eval_attention" not in rundir.read_plan(run)["measured"]


def test_the_engine_is_safe_to_call_from_eight_threads(vit_run):
    """Eight threads scoring the same images at once get exactly what one thread gets, TTA included."""
    engine = open_engine(vit_run, batch_size=16)
    images = load_run(vit_run).split("test").images[:48].permute(0, 2, 3, 1)
    serial = [engine.score(images, tta) for tta in ("none", "flip", 3)]
    results, errors = {}, []

    def work(k: int):
        try:
            results[k] = [engine.score(images, tta) for tta in ("none", "flip", 3)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    for got in results.values():
        for a, b in zip(got, serial, strict=True):
            assert torch.equal(a.probs, b.probs) and torch.equal(a.logits, b.logits)


def test_views_count_against_the_batch_and_calibration_is_applied(vit_run):
    """A backend call never holds more than batch_size images, TTA views included, and probabilities are the
    calibrated softmax of the plain view's logits."""
    engine = open_engine(vit_run)
    sizes = []

    def spy(images):
        sizes.append(len(images))
        return engine.backend(images)

    from imgcls.inference.scaling import Scaling

    scaling = Scaling("temperature", [0.5], [0.0] * len(engine.classes))
    small = Engine(spy, engine.classes, engine.preprocessing, 7, engine.recipe, scaling)
    images = load_run(vit_run).split("test").images[:10].permute(0, 2, 3, 1)
    scores = small.score(images, "flip-crop")  # 6 views an image: one image a call
    assert max(sizes) <= 7 and sum(sizes) == 6 * 10
    plain = small.score(images)
    assert torch.allclose(plain.probs, (plain.logits.double() * 0.5).softmax(1))
    assert not torch.allclose(scores.probs, plain.probs)  # the views changed something


def test_float32_depthwise_is_built_into_the_inference_model(tiny_folder, tmp_path):
    """A bf16 ConvNeXt whose plan says float32 depthwise for inference gets DepthwiseConv2d(float32=True)
    modules when its engine is built: configured once, not switched around each call."""
    run = fit(tiny_config(tiny_folder, tmp_path / "cnx", model="convnext_cifar", epochs=1, precision="bf16",
                          eval_precision="bf16", depthwise_precision="autocast", eval_depthwise_precision="float32"))
    engine = open_engine(run)
    depthwise = [m for m in engine.module.modules() if isinstance(m, DepthwiseConv2d)]
    assert depthwise and all(m.float32 for m in depthwise)
    assert engine.precision == "bf16"
