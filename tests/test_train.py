import json
import math

import pytest
import torch
import yaml

from imgcls import rundir
from imgcls.config import build_config, load_config, unresolved
from imgcls.errors import UserError
from imgcls.models import count_parameters, create_model
from imgcls.training.context import warmup_cosine
from imgcls.training.train import Interrupted, fit

TIMING = ("epoch_time", "data_time", "compute_time", "images_per_s")


def _cfg(data, out, **kw):
    base = dict(data=str(data), model="fastnet_cifar_small", epochs=2, batch_size=32, img_size=32,
                out=str(out), quiet=True, memory_format="channels_last")  # runs compared exactly: no timed layout
    return build_config(**{**base, **kw})


def _metrics(run):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in rundir.read_metrics(run)]


def test_run_directory_is_complete(tiny_folder, tmp_path):
    run = fit(_cfg(tiny_folder, tmp_path / "run", epochs=1))
    for name in (rundir.CONFIG, rundir.PLAN, rundir.DATASET, rundir.METRICS, rundir.SUMMARY, rundir.LAST,
                 rundir.BEST):
        assert (run / name).is_file(), name
    assert not (run / rundir.LOCK).exists()  # a finished run keeps no lock file
    assert unresolved(load_config(run / rundir.CONFIG)) == []  # the plan: every auto decided
    assert rundir.read_plan(run)["machine"] and isinstance(rundir.read_plan(run)["measured"], list)
    config = yaml.safe_load((run / rundir.CONFIG).read_text())
    assert config["model"] == "fastnet_cifar_small" and config["img_size"] == 32 and config["aug"] == "basic"
    # resolved values, not "auto" or None
    assert (config["normalize"], config["random_erasing"], config["mixup"]) == ("imagenet", 0.0, 0.0)
    (epoch1,) = rundir.read_metrics(run)
    assert set(epoch1) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc",
                           "val_macro_f1", "lr", "grad_norm_mean", "grad_norm_max", "epoch_time", "data_time",
                           "compute_time", "images_per_s"}
    assert 0 <= epoch1["data_time"] <= epoch1["epoch_time"]
    assert config["data"] == str(tiny_folder.resolve())  # absolute: eval from another folder reads the same data
    summary = json.loads((run / rundir.SUMMARY).read_text())
    assert summary["params"] == count_parameters(create_model("fastnet_cifar_small", 3))
    assert 0.0 <= summary["test_acc"] <= 1.0 and summary["test_split"] == "test"
    assert summary["versions"]["torch"] == torch.__version__ and summary["seed"] == 0


@pytest.mark.parametrize("options", [{}, {"optimizer": "sgd", "lr": 0.05, "ema": 0.9, "whiten": True}],
                         ids=["adamw", "sgd-ema-whiten"])
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tiny_folder, tmp_path, options):
    straight = fit(_cfg(tiny_folder, tmp_path / "straight", **options))
    # 108 training images at batch 32: 4 steps an epoch. Stop inside epoch 1, then inside epoch 2.
    with pytest.raises(Interrupted):
        fit(_cfg(tiny_folder, tmp_path / "stopped", **options), stop_after_steps=2)
    assert not (tmp_path / "stopped" / rundir.SUMMARY).exists()
    assert (tmp_path / "stopped" / rundir.LOCK).exists()  # unfinished: the file stays (nobody holds it now)
    with pytest.raises(Interrupted):
        fit(resume=tmp_path / "stopped", stop_after_steps=6)
    resumed = fit(resume=tmp_path / "stopped")
    assert _metrics(resumed) == _metrics(straight)
    a, b = (json.loads((r / rundir.SUMMARY).read_text()) for r in (straight, resumed))
    for key in ("test_acc", "test_acc_final", "best_epoch", "best_val_acc"):
        assert a[key] == b[key], key
    wa = torch.load(straight / rundir.LAST, weights_only=True)["model"]
    wb = torch.load(resumed / rundir.LAST, weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_ema_weights_are_the_ones_evaluated_and_saved(tiny_folder, tmp_path):
    run = fit(_cfg(tiny_folder, tmp_path / "ema", epochs=1, optimizer="sgd", lr=0.05, ema=0.5))
    last = torch.load(run / rundir.LAST, weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    best = torch.load(run / rundir.BEST, weights_only=True)["model"]
    assert all(torch.equal(best[k], ema[k]) for k in best)  # one epoch, so best.pt is the final average
    # last.pt's weights are what the summary evaluated (the average), so `--checkpoint last` scores the same;
    # the raw weights, which a resume continues from, are kept apart.
    assert all(torch.equal(last["model"][k], ema[k]) for k in best)
    assert not all(torch.equal(last["train_weights"][k], ema[k]) for k in best)
    assert int(last["ema"]["n_averaged"]) == 4  # one update per step


def test_same_seed_same_metrics_other_seed_differs(tiny_folder, tmp_path):
    a = fit(_cfg(tiny_folder, tmp_path / "a", epochs=1))
    b = fit(_cfg(tiny_folder, tmp_path / "b", epochs=1))
    c = fit(_cfg(tiny_folder, tmp_path / "c", epochs=1, seed=1))
    assert _metrics(a) == _metrics(b)
    assert _metrics(a) != _metrics(c)


def test_finished_run_cannot_be_resumed_and_existing_out_is_kept(tiny_folder, tmp_path):
    run = fit(_cfg(tiny_folder, tmp_path / "done", epochs=1))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(UserError, match="already finished"):
        fit(resume=run)
    with pytest.raises(UserError, match="already exists"):
        fit(_cfg(tiny_folder, run, epochs=1))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_warmup_then_cosine_schedule():
    f = warmup_cosine(total_steps=110, warmup_steps=10)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_recipe_then_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: vit_cifar\nepochs: 3\nbatch-size: 64\n")
    cfg = build_config(recipe, epochs=5)
    assert (cfg.model, cfg.epochs, cfg.batch_size, cfg.lr) == ("vit_cifar", 5, 64, 1e-3)
    recipe.write_text("epochz: 3\n")
    with pytest.raises(UserError, match="unknown option.*epochz"):
        build_config(recipe)
    for bad in ("lr: -1", "lr: 1e-50", "epochs: 0"):  # a value out of bounds names the file it came from
        recipe.write_text(bad + "\n")
        with pytest.raises(UserError, match=f"recipe {recipe}: --"):
            build_config(recipe)
    with pytest.raises(UserError, match="give a value above 1e-45"):  # not "give 0": --lr must be > 0
        build_config(lr=1e-50)


def test_default_quickstart_reaches_a_sensible_accuracy_on_mini(tmp_path):
    """The default data path end to end: two epochs of the small CNN beat chance by far."""
    run = fit(build_config(model="fastnet_cifar_small", epochs=2, out=str(tmp_path / "q"), quiet=True))
    summary = json.loads((run / rundir.SUMMARY).read_text())
    assert summary["test_acc"] > 0.25  # chance is 0.10
    assert math.isclose(summary["best_val_acc"], max(m["val_acc"] for m in rundir.read_metrics(run)))


def test_streamed_folder_trains_with_the_torchvision_twin(tiny_folder, tmp_path):
    run = fit(_cfg(tiny_folder, tmp_path / "stream", epochs=1, data_mode="stream", workers=0, aug="randaugment"))
    summary = json.loads((run / rundir.SUMMARY).read_text())
    assert summary["test_acc"] is not None and len(rundir.read_metrics(run)) == 1


def test_every_augmentation_setting_is_recorded(tiny_folder, tmp_path):
    run = fit(_cfg(tiny_folder, tmp_path / "aug", epochs=1, aug="randaugment", mixup=0.2, cutmix=1.0,
                   label_smoothing=0.1))
    config = yaml.safe_load((run / rundir.CONFIG).read_text())
    recorded = {k: config[k] for k in ("aug", "random_erasing", "mixup", "cutmix", "mix_prob", "mix_switch_prob",
                                       "label_smoothing", "normalize")}
    assert recorded == {"aug": "randaugment", "random_erasing": 0.0, "mixup": 0.2, "cutmix": 1.0, "mix_prob": 1.0,
                        "mix_switch_prob": 0.5, "label_smoothing": 0.1, "normalize": "imagenet"}
