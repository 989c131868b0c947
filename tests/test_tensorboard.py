"""TensorBoard logging: what a run's event files hold, read back with TensorBoard's own reader."""

import builtins

import pytest

from imgcls.errors import UserError
from imgcls.training.tensorboard import INSTALL, TensorBoardLog, check_installed

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

STEPS_PER_EPOCH = 5
HPARAMS = {"model": "fastnet_cifar_small", "lr": 1e-3, "epochs": 3, "mixup": 0.0, "compile": False,
           "group_lrs": [1e-4, 1e-3], "out": None}


def _records(epochs: int) -> list[dict]:
    """Lines as run_epochs writes them to metrics.jsonl, with the clipping norms of issue 16."""
    return [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.2 * e, "val_loss": 2.1 / e, "val_acc": 0.19 * e,
             "lr": 1e-3 / e, "epoch_time": 1.5, "data_time": 0.1, "images_per_s": 1000.0 + e,
             "grad_norm_mean": 1.0 + e, "grad_norm_max": 3.0 + e} for e in range(1, epochs + 1)]


def _write(log: TensorBoardLog, epochs: int, first_epoch: int = 1) -> None:
    for record in _records(epochs)[first_epoch - 1:]:
        e = record["epoch"]
        for s in range((e - 1) * STEPS_PER_EPOCH + 1, e * STEPS_PER_EPOCH + 1):
            log.step(s, loss=1.0 / s, lr=1e-3 * s)
        log.epoch(e, record, global_step=e * STEPS_PER_EPOCH)


def _read(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_event_files_hold_steps_epochs_figures_and_hparams(tmp_path):
    log = TensorBoardLog(tmp_path, HPARAMS)
    _write(log, epochs=3)
    confusion = [[5, 1, 0], [2, 4, 0], [0, 0, 6]]
    reliability = {"edges": [0.0, 0.5, 1.0], "count": [4, 14], "confidence": [0.4, 0.8], "accuracy": [0.5, 0.75]}
    log.finish({"test_acc": 0.83, "best_val_acc": 0.57, "test_ece": None, "model": "x"}, confusion, reliability,
               classes=["cat", "dog", "ship"])
    log.close()

    acc = _read(tmp_path / "tb")
    scalars = set(acc.Tags()["scalars"])
    expected = {"step/loss", "step/lr"} | {f"epoch/{k}" for k in _records(1)[0]} | {"hparam/test_acc",
                                                                                     "hparam/best_val_acc"}
    assert expected <= scalars
    assert "hparam/test_ece" not in scalars  # None: no test split, nothing to plot
    assert [e.step for e in acc.Scalars("step/loss")] == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    val_acc = acc.Scalars("epoch/val_acc")
    assert [e.step for e in val_acc] == [5, 10, 15]
    assert [e.value for e in val_acc] == pytest.approx([r["val_acc"] for r in _records(3)])
    assert [e.value for e in acc.Scalars("epoch/grad_norm_max")] == pytest.approx([4.0, 5.0, 6.0])
    assert acc.Scalars("hparam/test_acc")[0].value == pytest.approx(0.83)
    assert set(acc.Tags()["images"]) == {"eval/confusion_matrix", "eval/reliability"}
    assert acc.Images("eval/confusion_matrix")[0].width > 100
    # the HPARAMS tab: the plugin's session summaries, written into this run's folder, not beside it
    assert set(acc.PluginTagToContent("hparams")) == {"_hparams_/experiment", "_hparams_/session_start_info",
                                                      "_hparams_/session_end_info"}
    assert [p.name for p in (tmp_path / "tb").iterdir() if p.is_dir()] == []


def test_hparams_keep_the_config_values(tmp_path):
    from tensorboard.plugins.hparams import plugin_data_pb2

    log = TensorBoardLog(tmp_path, HPARAMS)
    log.finish({"test_acc": 0.5}, None, None)
    log.close()
    acc = _read(tmp_path / "tb")
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    assert info.hparams["model"].string_value == "fastnet_cifar_small"
    assert info.hparams["lr"].number_value == pytest.approx(1e-3)
    assert info.hparams["compile"].bool_value is False
    assert info.hparams["group_lrs"].string_value == "[0.0001, 0.001]"
    assert info.hparams["out"].string_value == "none"
    assert acc.Tags()["images"] == []


def test_resume_purges_what_the_killed_process_logged_after_the_checkpoint(tmp_path):
    first = TensorBoardLog(tmp_path, HPARAMS)
    _write(first, epochs=2)  # killed after epoch 2, but its checkpoint holds epoch 1 only
    first.close()
    again = TensorBoardLog(tmp_path, HPARAMS, purge_step=STEPS_PER_EPOCH + 1)
    _write(again, epochs=3, first_epoch=2)
    again.close()
    acc = _read(tmp_path / "tb")
    assert [e.step for e in acc.Scalars("step/loss")] == list(range(1, 3 * STEPS_PER_EPOCH + 1))
    assert [e.step for e in acc.Scalars("epoch/val_acc")] == [5, 10, 15]


def test_missing_package_is_one_line(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard" or name.startswith(("tensorboard.", "torch.utils.tensorboard")):
            raise ModuleNotFoundError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(UserError, match="pip install"):
        check_installed()
    with pytest.raises(UserError) as e:
        TensorBoardLog(tmp_path, HPARAMS)
    assert str(e.value) == INSTALL
    assert "\n" not in str(e.value) and "pip install 'imgcls[tensorboard]'" in str(e.value)
    assert not (tmp_path / "tb").exists()
