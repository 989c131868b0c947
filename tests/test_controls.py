"""Training controls and imbalanced data, through fit: class weights, focal loss, balanced sampling,
--monitor, early stopping, the plateau schedule, gradient accumulation and clipping."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from imgcls import rundir
from imgcls.config import build_config
from imgcls.errors import UserError
from imgcls.models import create_model
from imgcls.training.imbalance import class_weights, epoch_order, focal_loss, make_loss
from imgcls.training.loop import window_of
from imgcls.training.train import Interrupted, fit
from tests.conftest import run_metrics, tiny_config

_cfg, _metrics = tiny_config, run_metrics


# ---------------------------------------------------------------- class weights and losses


def test_class_weights_equal_a_hand_computation():
    labels, classes = torch.tensor([0, 0, 0, 1]), ["a", "b"]
    # inverse frequency, scaled so the average image weighs 1: N / (K n_k) = 4/6 and 4/2
    assert torch.allclose(class_weights("auto", labels, classes), torch.tensor([2 / 3, 2.0]))
    # effective number (1 - b) / (1 - b^n) with b = 0.9: 0.1/0.271 and 1.0, then scaled so 3 w0 + w1 = 4
    raw = torch.tensor([0.1 / (1 - 0.9**3), 1.0])
    assert torch.allclose(class_weights("effective:0.9", labels, classes), raw * 4 / (3 * raw[0] + raw[1]))
    assert class_weights("none", labels, classes) is None
    # given weights too: 3 * w0 + w1 = 4 with w1 = 3 w0 (only the ratio is the user's), so 1e38 each cannot overflow
    assert torch.allclose(class_weights("1,3", labels, classes), torch.tensor([2 / 3, 2.0]))
    assert torch.allclose(class_weights("1e38,3e38", labels, classes), torch.tensor([2 / 3, 2.0]))
    with pytest.raises(UserError, match="gives 3 weights for 2 classes"):
        class_weights("1,2,3", labels, classes)


def test_weights_file_names_every_class(tmp_path):
    path = tmp_path / "w.json"
    path.write_text(json.dumps({"a": 1, "b": 5}))
    assert torch.allclose(class_weights(str(path), torch.tensor([0, 1]), ["a", "b"]), torch.tensor([1 / 3, 5 / 3]))
    path.write_text(json.dumps({"a": 1}))
    with pytest.raises(UserError, match="must map every class"):
        class_weights(str(path), torch.tensor([0, 1]), ["a", "b"])


def test_weighted_loss_with_soft_targets_is_the_hand_computation():
    torch.manual_seed(0)
    logits, weights = torch.randn(4, 3), torch.tensor([0.5, 2.0, 1.0])
    targets = torch.tensor([[0.7, 0.3, 0.0], [0.0, 1.0, 0.0], [0.1, 0.1, 0.8], [0.5, 0.0, 0.5]])  # mixed, smoothed
    loss = make_loss(build_config(), weights)(logits, targets)
    hand = -(weights * targets * logits.log_softmax(1)).sum(1).mean()
    assert loss.item() == pytest.approx(hand.item(), rel=1e-6)
    unweighted = make_loss(build_config(), None)(logits, targets)
    # the weights move the loss towards the heavy class: class 1's images count four times class 0's
    assert loss.item() != pytest.approx(unweighted.item(), rel=1e-3)


def test_focal_loss_is_the_hand_computation_and_gamma_0_is_cross_entropy():
    logits, targets = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]]), F.one_hot(torch.tensor([0, 2]), 3).float()
    p = logits.softmax(1)
    hand = -((1 - p[0, 0]) ** 2 * p[0, 0].log() + (1 - p[1, 2]) ** 2 * p[1, 2].log()) / 2
    assert focal_loss(logits, targets, 2.0).item() == pytest.approx(hand.item(), rel=1e-6)
    assert focal_loss(logits, targets, 0.0).item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    # the easy first image (p = 0.84) counts far less than under cross-entropy
    assert focal_loss(logits[:1], targets[:1], 2.0) < 0.05 * F.cross_entropy(logits[:1], targets[:1])


# ---------------------------------------------------------------- sampling


def test_balanced_sampler_draws_classes_uniformly_within_sampling_error():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)  # 90:9:1
    order = epoch_order("balanced", labels, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[order], minlength=3).double()
    expected, sd = len(labels) / 3, math.sqrt(len(labels) * (1 / 3) * (2 / 3))
    assert len(order) == len(labels) and ((counts - expected).abs() < 4 * sd).all(), counts
    sqrt = torch.bincount(labels[epoch_order("sqrt", labels, torch.Generator().manual_seed(0))], minlength=3)
    share = torch.tensor([30.0, math.sqrt(90), math.sqrt(10)]) / (30 + math.sqrt(90) + math.sqrt(10))
    assert ((sqrt / 1000 - share).abs() < 0.05).all(), sqrt
    same = epoch_order("balanced", labels, torch.Generator().manual_seed(0))
    assert torch.equal(order, same)  # one seed, one order: what resume and torchrun rely on


def test_balanced_sampler_resumes_exactly(tiny_folder, tmp_path):
    straight = fit(_cfg(tiny_folder, tmp_path / "straight", sampler="balanced", class_weights="auto"))
    with pytest.raises(Interrupted):
        fit(_cfg(tiny_folder, tmp_path / "stopped", sampler="balanced", class_weights="auto"), stop_after_steps=5)
    assert _metrics(fit(resume=tmp_path / "stopped")) == _metrics(straight)


def test_a_resumed_run_weighs_its_classes_as_it_began(tiny_folder, tmp_path):
    """A --class-weights FILE edited between the stop and --resume changed the loss half-way, and the summary
    reported the new weights for the whole run."""
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"airplane": 1, "automobile": 1, "bird": 1}))
    with pytest.raises(Interrupted):
        fit(_cfg(tiny_folder, tmp_path / "stopped", class_weights=str(weights)), stop_after_steps=5)
    weights.write_text(json.dumps({"airplane": 1, "automobile": 1, "bird": 50}))
    with pytest.raises(UserError, match="now gives other weights than .* began with .*the file was edited"):
        fit(resume=tmp_path / "stopped")
    weights.write_text(json.dumps({"airplane": 2, "automobile": 2, "bird": 2}))  # the same ratios: the same run
    config = (tmp_path / "stopped" / rundir.CONFIG).read_text()
    (tmp_path / "stopped" / rundir.CONFIG).write_text(config.replace("weight_decay: 0.05", "weight_decay: 0.0"))
    with pytest.raises(UserError, match="was edited since the run began .weight_decay 0.0 against 0.05"):
        fit(resume=tmp_path / "stopped")  # trained on with the checkpoint's options, it would report the new ones
    (tmp_path / "stopped" / rundir.CONFIG).write_text(config)
    fit(resume=tmp_path / "stopped")


# ---------------------------------------------------------------- monitor, early stopping, plateau


def test_monitor_chooses_best_pt_and_the_summary_says_so(tiny_folder, tmp_path):
    run = fit(_cfg(tiny_folder, tmp_path / "run", epochs=3, monitor="val_loss", lr=3e-3))
    metrics, summary = rundir.read_metrics(run), rundir.read_json(run / rundir.SUMMARY)
    best = min(range(3), key=lambda i: metrics[i]["val_loss"])
    assert summary["monitor"] == "val_loss" and summary["best_epoch"] == best + 1
    assert summary["best_score"] == metrics[best]["val_loss"]
    assert torch.load(run / rundir.BEST, weights_only=True)["epoch"] == best + 1
    assert all(0 <= m["val_balanced_acc"] <= 1 and 0 <= m["val_macro_f1"] <= 1 for m in metrics)


def test_early_stop_at_the_right_epoch_and_the_same_after_a_resume(tiny_folder, tmp_path):
    # a min-delta no loss can beat: epoch 1 sets the best, epochs 2 and 3 fail to improve, patience 2 stops there
    options = dict(epochs=6, monitor="val_loss", min_delta=100.0, patience=2)
    straight = fit(_cfg(tiny_folder, tmp_path / "straight", **options))
    summary = rundir.read_json(straight / rundir.SUMMARY)
    assert len(rundir.read_metrics(straight)) == 3 and summary["epochs_run"] == 3 and summary["best_epoch"] == 1
    assert summary["ended"].startswith("early stop after epoch 3: val_loss did not improve")
    with pytest.raises(Interrupted):
        fit(_cfg(tiny_folder, tmp_path / "stopped", **options), stop_after_steps=6)  # inside epoch 2
    resumed = fit(resume=tmp_path / "stopped")
    assert _metrics(resumed) == _metrics(straight)
    assert rundir.read_json(resumed / rundir.SUMMARY)["ended"] == summary["ended"]


def test_plateau_schedule_cuts_the_rate_when_the_monitor_stalls_and_resumes_exactly(tiny_folder, tmp_path):
    options = dict(epochs=4, schedule="plateau", plateau_patience=0, plateau_factor=0.1, min_delta=100.0,
                   monitor="val_loss", warmup_epochs=0.0)
    run = fit(_cfg(tiny_folder, tmp_path / "run", **options))
    lrs = [m["lr"] for m in rundir.read_metrics(run)]  # read before each epoch's end-of-epoch cut
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])
    with pytest.raises(Interrupted):
        fit(_cfg(tiny_folder, tmp_path / "stopped", **options), stop_after_steps=9)
    assert _metrics(fit(resume=tmp_path / "stopped")) == _metrics(run)


# ---------------------------------------------------------------- accumulation and clipping


def test_accumulation_windows_cover_the_epoch():
    assert [window_of(s, 9, 2) for s in range(9)] == [(2, False), (2, True)] * 4 + [(1, True)]
    assert [window_of(s, 3, 1) for s in range(3)] == [(1, True)] * 3


def test_k_micro_batches_of_b_equal_one_batch_of_k_times_b(tiny_folder, tmp_path):
    """vit_cifar_tiny has LayerNorm only, so accumulation is exact up to float summation order."""
    options = dict(model="vit_cifar_tiny", aug="none", optimizer="sgd", lr=0.05, warmup_epochs=0.5, epochs=2)
    whole = fit(_cfg(tiny_folder, tmp_path / "whole", batch_size=24, **options))
    accumulated = fit(_cfg(tiny_folder, tmp_path / "accum", batch_size=12, accum_steps=2, **options))
    def losses(run):
        return [m[k] for m in rundir.read_metrics(run) for k in ("train_loss", "val_loss")]

    assert losses(accumulated) == pytest.approx(losses(whole), rel=1e-5)
    a = torch.load(whole / rundir.LAST, weights_only=True)["model"]
    b = torch.load(accumulated / rundir.LAST, weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert rundir.read_json(accumulated / rundir.SUMMARY)["effective_batch_size"] == 24


def test_a_stop_inside_an_accumulation_window_waits_for_its_end_and_resumes_exactly(tiny_folder, tmp_path):
    options = dict(batch_size=12, accum_steps=3)
    straight = fit(_cfg(tiny_folder, tmp_path / "straight", **options))
    with pytest.raises(Interrupted) as stopped:
        fit(_cfg(tiny_folder, tmp_path / "stopped", **options), stop_after_steps=4)  # asked mid-window
    assert stopped.value.step == 6  # the window of micro-steps 4-6 was finished first
    assert _metrics(fit(resume=tmp_path / "stopped")) == _metrics(straight)


def test_clipping_bounds_the_update_and_logs_the_norm_before_clipping(tiny_folder, tmp_path):
    # one SGD step without momentum or decay at lr 1: the update is exactly the clipped gradient
    options = dict(epochs=1, batch_size=128, optimizer="sgd", momentum=0.0, weight_decay=0.0, lr=1.0,
                   warmup_epochs=0.0, clip_grad=1e-3)
    run = fit(_cfg(tiny_folder, tmp_path / "run", **options))
    torch.manual_seed(0)
    start = create_model("fastnet_cifar_small", 3).state_dict()
    trained = torch.load(run / rundir.LAST, weights_only=True)["model"]
    params = [n for n, _ in create_model("fastnet_cifar_small", 3).named_parameters()]
    update = torch.sqrt(sum(((trained[n] - start[n]) ** 2).sum() for n in params))
    assert 0 < update.item() <= 1e-3 * (1 + 1e-4)
    (epoch,) = rundir.read_metrics(run)
    assert epoch["grad_norm_max"] > 1e-2 and epoch["grad_norm_mean"] == epoch["grad_norm_max"]  # one step


def test_clip_mode_without_clip_grad_is_refused():
    with pytest.raises(UserError, match="--clip-mode agc says how to clip; add --clip-grad"):
        build_config(clip_mode="agc")


# ---------------------------------------------------------------- TensorBoard, wired into fit


def test_tensorboard_event_files_hold_steps_epochs_figures_and_hparams(tiny_folder, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        fit(_cfg(tiny_folder, run, tensorboard=True), stop_after_steps=6)  # inside epoch 2
    fit(resume=run)
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"step/loss", "step/lr", "epoch/val_acc", "epoch/train_loss", "epoch/grad_norm_max",
            "epoch/images_per_s"} <= set(tags["scalars"])
    assert {"eval/confusion_matrix", "eval/reliability"} <= set(tags["images"])
    steps = [e.step for e in events.Scalars("step/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 8  # one point per logged step, none twice after resume
    assert [e.step for e in events.Scalars("epoch/val_acc")] == [4, 8]
    val_acc = [e.value for e in events.Scalars("epoch/val_acc")]
    assert val_acc == pytest.approx([m["val_acc"] for m in rundir.read_metrics(run)])
