"""Transfer learning: offline pretrained weights, local weight files, and the four strategies."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import rundir
from imgcls.cli import main
from imgcls.config import build_config
from imgcls.data import Preprocessing
from imgcls.errors import UserError
from imgcls.evaluation.evaluate import evaluate_run
from imgcls.inference.files import load_images
from imgcls.models import create_model
from imgcls.models.efficientnet import map_efficientnet_pytorch_keys, package_weights
from imgcls.models.surface import classifier_name, layer_groups
from imgcls.training.context import build_optimizer, warmup_cosine
from imgcls.training.train import Interrupted, fit
from imgcls.training.transfer import plan_groups

DOMESTIC_CATS = {281, 282, 283, 284, 285}  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("imgcls: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A 'pretrained' fastnet_cifar_small: 10-class weights with non-trivial BatchNorm statistics."""
    torch.manual_seed(1)
    model = create_model("fastnet_cifar_small", 10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32) * 2 + 0.5)  # moves running_mean / running_var off their init
    path = tmp_path_factory.mktemp("weights") / "fastnet.pth"
    torch.save(model.state_dict(), path)
    return path


def _cfg(data, out, **kw):
    base = dict(data=str(data), model="fastnet_cifar_small", epochs=2, batch_size=32, img_size=32,
                out=str(out), quiet=True)
    return build_config(**{**base, **kw})


def _weights(run, name=rundir.LAST):
    return torch.load(run / name, weights_only=True)


# --- pretrained weights -------------------------------------------------------------------------

def test_efficientnet_lite0_package_weights_map_strictly_onto_timm():
    model = create_model("efficientnet_lite0", 1000)
    mapped = map_efficientnet_pytorch_keys(package_weights(0), [len(stage) for stage in model.blocks])
    model.load_state_dict(mapped, strict=True)  # raises on any unmatched or missing key
    assert len(mapped) == len(model.state_dict())


def test_pretrained_efficientnet_lite0_sees_a_cat_in_a_real_photo(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    path = tmp_path / "chelsea.png"
    Image.fromarray(skimage_data.chelsea()).save(path)
    model = create_model("efficientnet_lite0", 1000, pretrained=True).eval()
    prep = Preprocessing(224, (0.5,) * 3, (0.5,) * 3, crop_pct=0.875)  # the weights' own preprocessing
    images = load_images([path], prep)  # uint8 N x H x W x 3
    assert images.shape == (1, 224, 224, 3)
    with torch.inference_mode():
        probs = model(prep.normalize(images.permute(0, 3, 1, 2))).softmax(1)[0]
    top3 = set(probs.topk(3).indices.tolist())
    assert top3 & DOMESTIC_CATS, top3


def test_weights_file_loads_with_a_new_head_and_a_report(weights_file):
    from imgcls.models.registry import model_spec
    from imgcls.models.weights import load_pretrained

    model = create_model("fastnet_cifar_small", 3)
    report = load_pretrained(model, model_spec("fastnet_cifar_small"), str(weights_file))
    source = torch.load(weights_file, weights_only=True)
    own = model.state_dict()
    assert report.new_head == ["head.weight", "head.bias"] and not report.unexpected
    assert all(torch.equal(own[k], v) for k, v in source.items() if not k.startswith("head."))
    assert torch.count_nonzero(model.head.weight) == 0  # a new head starts at zero
    assert "new head" in str(report)


def test_weights_of_another_architecture_are_refused(weights_file, tmp_path, tiny_folder, capsys):
    other = tmp_path / "resnet.pth"
    torch.save(create_model("resnet18_cifar", 10).state_dict(), other)
    argv = ["train", "--data", str(tiny_folder), "--model", "fastnet_cifar_small", "--pretrained", str(other),
            "--strategy", "feature-extract", "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "do not fit fastnet_cifar_small" in line and "pass weights saved from fastnet_cifar_small" in line
    assert not (tmp_path / "run").exists()


def test_hub_weights_offline_fail_with_one_line(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("IMGCLS_OFFLINE", "1")
    argv = ["train", "--data", str(tiny_folder), "--model", "timm/resnet18", "--pretrained",
            "--out", str(tmp_path / "r")]
    assert main(argv) == 2
    assert "--pretrained path/to/weights.safetensors" in _error_line(capsys)


@pytest.mark.parametrize("flags, problem", [
    (["--strategy", "feature-extract"], "starts from pretrained weights"),
    (["--pretrained", "--strategy", "scratch"], "trains from random weights"),
    (["--pretrained", "--strategy", "finetune", "--cache-features"], "--cache-features do(es) not apply"),
    (["--pretrained", "--strategy", "gradual", "--unfreeze-at", "3,2"], "increasing epoch numbers"),
])
def test_strategy_misuse_is_one_line(flags, problem, capsys):
    assert main(["train", "--model", "efficientnet_lite0", *flags]) == 2
    assert problem in _error_line(capsys)


# --- layer groups -------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("resnet18_cifar", ["stem", "layer1", "layer2", "layer3", "layer4", "head"]),
    ("efficientnet_lite0", ["conv_stem+bn1", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4",
                            "blocks.5", "blocks.6+conv_head+bn2", "head"]),
    ("vit_cifar_tiny", ["cls_token+pos_embed+patch_embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3+norm",
                        "head"]),
    ("convnext_cifar", ["stem", "stages.0", "stages.1", "stages.2", "stages.3", "head.norm", "head"]),
])
def test_layer_groups_cover_every_parameter_once(name, expected):
    model = create_model(name, 10)
    groups = layer_groups(model)
    assert [g for g, _ in groups] == expected
    names = [n for _, params in groups for n in params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert all(n.startswith(classifier_name(model) + ".") for n in groups[-1][1])


# --- strategies ---------------------------------------------------------------------------------

def test_feature_extract_changes_the_head_and_nothing_else(tiny_folder, tmp_path, weights_file):
    before = create_model("fastnet_cifar_small", 3)
    from imgcls.models.registry import model_spec
    from imgcls.models.weights import load_pretrained

    load_pretrained(before, model_spec("fastnet_cifar_small"), str(weights_file))
    run = fit(_cfg(tiny_folder, tmp_path / "fe", pretrained=str(weights_file), strategy="feature-extract",
                   aug="standard"))
    after = _weights(run)["model"]
    for key, value in before.state_dict().items():  # parameters and BatchNorm buffers alike
        if key.startswith("head."):
            assert not torch.equal(value, after[key]), key
        else:
            assert torch.equal(value, after[key]), key
    summary = json.loads((run / rundir.SUMMARY).read_text())
    assert summary["trainable_params"] == before.head.weight.numel() + before.head.bias.numel()


def test_cached_features_train_the_same_head_the_full_model_evaluates(tiny_folder, tmp_path, weights_file):
    run = fit(_cfg(tiny_folder, tmp_path / "cached", pretrained=str(weights_file), strategy="feature-extract",
                   cache_features=True, head="mlp", epochs=3, lr=3e-3))
    config = (run / rundir.CONFIG).read_text()
    assert "aug: none" in config and "cache_features: true" in config
    last_val = rundir.read_metrics(run)[-1]["val_acc"]
    # The full model (backbone + trained MLP head) on the val images agrees with the cached-feature metric.
    result, _ = evaluate_run(run, split="val", checkpoint="last")
    assert result["accuracy"] == pytest.approx(last_val, abs=1e-6)


def test_finetune_gives_each_group_its_rate_and_follows_the_schedule(weights_file):
    model = create_model("fastnet_cifar_small", 3)
    cfg = build_config(model="fastnet_cifar_small", pretrained=str(weights_file), strategy="finetune",
                       layer_decay=0.5, lr=1e-2, warmup_epochs=0, epochs=4)
    groups = plan_groups(model, cfg)
    assert [g.name for g in groups] == ["stem", "group1", "group2", "group3", "head"]
    expected = {"head": 1e-2, "group3": 5e-3, "group2": 2.5e-3, "group1": 1.25e-3, "stem": 6.25e-4}
    optimizer, scheduler = build_optimizer(model, cfg, steps_per_epoch=5, groups=groups)
    for pg in optimizer.param_groups:  # step 0
        assert pg["lr"] == pytest.approx(expected[pg["group"]])
    factor = warmup_cosine(20, 0)
    for step in range(1, 13):
        optimizer.step()
        scheduler.step()
        for pg in optimizer.param_groups:
            assert pg["lr"] == pytest.approx(expected[pg["group"]] * factor(step))
    explicit = build_config(model="fastnet_cifar_small", pretrained=True, strategy="finetune",
                            group_lrs="1e-5,2e-5,5e-5,1e-4,5e-4")
    assert [g.lr for g in plan_groups(model, explicit)] == [1e-5, 2e-5, 5e-5, 1e-4, 5e-4]
    with pytest.raises(UserError, match="5 layer groups"):
        plan_groups(model, build_config(model="fastnet_cifar_small", pretrained=True, strategy="finetune",
                                        group_lrs="1e-5,1e-4"))


def test_gradual_unfreezes_on_schedule_and_keeps_earlier_optimizer_state(tiny_folder, tmp_path, weights_file):
    # 108 training images at batch 32: 4 steps an epoch. head from epoch 1, group3 from epoch 2, group2 from 3.
    cfg = _cfg(tiny_folder, tmp_path / "gradual", pretrained=str(weights_file), strategy="gradual",
               unfreeze_at=[1, 2], epochs=3)
    initial = create_model("fastnet_cifar_small", 3)
    from imgcls.models.registry import model_spec
    from imgcls.models.weights import load_pretrained

    load_pretrained(initial, model_spec("fastnet_cifar_small"), str(weights_file))
    start = initial.state_dict()
    snapshots = []
    for stop in (4, 8):  # stop at the end of epochs 1 and 2, then finish
        with pytest.raises(Interrupted):
            fit(cfg if stop == 4 else None, resume=None if stop == 4 else tmp_path / "gradual", stop_after_steps=stop)
        snapshots.append(_weights(tmp_path / "gradual"))
    run = fit(resume=tmp_path / "gradual")
    snapshots.append(_weights(run))

    def changed(ckpt, prefix):
        return any(not torch.equal(v, ckpt["model"][k]) for k, v in start.items() if k.startswith(prefix))

    # requires_grad flipped at exactly the scheduled epochs: what has moved by the end of each epoch.
    assert [changed(s, "head.") for s in snapshots] == [True, True, True]
    assert [changed(s, "group3.") for s in snapshots] == [False, True, True]
    assert [changed(s, "group2.") for s in snapshots] == [False, False, True]
    assert [changed(s, "group1.") or changed(s, "stem.") for s in snapshots] == [False, False, False]
    # AdamW state: the head's step count runs on across the unfreezing; group3 starts at its epoch.
    final = snapshots[-1]["optimizer"]
    groups = {pg["group"]: pg["params"] for pg in final["param_groups"]}
    steps = {g: {int(final["state"][i]["step"]) for i in ids if i in final["state"]} for g, ids in groups.items()}
    assert steps["head"] == {12} and steps["group3"] == {8} and steps["group2"] == {4}
    assert steps["group1"] == set() and steps["stem"] == set()
    summary = json.loads((run / rundir.SUMMARY).read_text())
    assert [g["unfreeze_epoch"] for g in summary["layer_groups"]] == [None, None, 2, 1, 0]


def test_efficientnet_pretrained_run_records_its_preprocessing(tiny_folder, tmp_path):
    run = fit(_cfg(tiny_folder, tmp_path / "eff", model="efficientnet_lite0", img_size=64, pretrained=True,
                   strategy="feature-extract", cache_features=True, epochs=1))
    info = json.loads((run / rundir.DATASET).read_text())
    assert info["mean"] == [0.5, 0.5, 0.5] and info["crop_pct"] == 0.875
    assert "normalize: inception" in (run / rundir.CONFIG).read_text()
    assert np.isfinite(json.loads((run / rundir.SUMMARY).read_text())["test_acc"])


# --- weights that would train on wrong features ---------------------------------------------------

def _load_into_fastnet(path):
    from imgcls.models.registry import model_spec
    from imgcls.models.weights import load_pretrained

    return load_pretrained(create_model("fastnet_cifar_small", 3), model_spec("fastnet_cifar_small"), str(path))


def test_weights_without_batchnorm_statistics_are_refused(weights_file, tmp_path):
    state = torch.load(weights_file, weights_only=True)
    stripped = {k: v for k, v in state.items() if not k.endswith(("running_mean", "running_var"))}
    path = tmp_path / "no_stats.pth"
    torch.save(stripped, path)
    with pytest.raises(UserError) as info:
        _load_into_fastnet(path)
    message = str(info.value)
    assert "BatchNorm statistics" in message and "running_mean" in message and "\n" not in message


def test_weights_finite_only_in_float64_are_refused(weights_file, tmp_path):
    state = torch.load(weights_file, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    state[name] = state[name].double().clone()
    state[name].view(-1)[0] = 1e39  # finite in float64, infinite in the float32 the model holds it in
    path = tmp_path / "big.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match=f"non-finite weights \\(NaN or Inf in float32 in 1 tensors, e.g. {name}\\)"):
        _load_into_fastnet(path)


def test_weights_without_only_batch_counters_load_with_a_note(weights_file, tmp_path):
    state = torch.load(weights_file, weights_only=True)
    path = tmp_path / "no_counters.pth"
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    report = _load_into_fastnet(path)
    assert report.missing and all(k.endswith("num_batches_tracked") for k in report.missing)
    assert "not in the file" in str(report)


@pytest.mark.parametrize("content, problem", [
    ("nan", "non-finite weights"),
    ("inf", "non-finite weights"),
    ("text", "damaged or truncated"),
    ("empty", "damaged or truncated"),
])
def test_broken_weights_files_are_one_line_errors(weights_file, tmp_path, content, problem):
    path = tmp_path / "broken.pth"
    if content in ("nan", "inf"):
        state = torch.load(weights_file, weights_only=True)
        state["group2.0.weight"][0, 0, 0, 0] = float(content)
        torch.save(state, path)
    else:
        path.write_bytes(b"not a torch file at all\n" if content == "text" else b"")
    with pytest.raises(UserError) as info:
        _load_into_fastnet(path)
    assert problem in str(info.value) and "\n" not in str(info.value)
