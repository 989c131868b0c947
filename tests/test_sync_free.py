"""The training loop never waits for the device per step: its sums stay on the device and are read
only at the progress interval and the epoch's end. And the epoch's time splits into data and compute."""

import collections
import sys

import pytest
import torch
import torch.nn.functional as F

from imgcls import rundir
from imgcls.config import build_config
from imgcls.training.checkpointer import EpochMeter, TrainState
from imgcls.training.context import build_context
from imgcls.training.distributed import World
from imgcls.training.loop import train_one_epoch
from imgcls.training.progress import Progress
from imgcls.training.train import fit, prepare_inputs

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
BATCH = 16


def _context(device="cpu", **kw):
    cfg = build_config(data="cifar10-mini", model="fastnet_cifar_small", batch_size=BATCH, epochs=1, quiet=True,
                       precision="fp32", device=device, **kw)
    ctx = build_context(cfg, World(), device, fresh=True)
    return ctx, prepare_inputs(ctx, TrainState())


def _count_reads(monkeypatch) -> collections.Counter:
    """Count every tensor-to-Python read, by the file that made it. Augmentation (imgcls/data) draws its
    random numbers from a CPU generator on the host on every device: those reads are not device syncs."""
    counts = collections.Counter()
    for name in READS:
        real = getattr(torch.Tensor, name)

        def read(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if "/imgcls/data/" not in caller:
                counts[f"{_name} in {caller}"] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, read)
    return counts


def _train(ctx, inputs, steps: int, transform=None, epoch_steps: int = 1000) -> EpochMeter:
    """`steps` real steps of train_one_epoch; progress reads every tenth of an epoch of `epoch_steps`."""
    meter, gen = EpochMeter(), torch.Generator().manual_seed(0)
    order = torch.arange(steps * BATCH)
    progress = Progress(1, epoch_steps, BATCH, quiet=True)
    assert train_one_epoch(ctx, inputs.trainee, inputs.train.batches(order, BATCH),
                           transform or inputs.transform, gen, meter, should_stop=lambda read=True: False,
                           progress=progress)
    return meter


@pytest.mark.parametrize("options", [{}, {"accum_steps": 2, "clip_grad": 1.0, "prefetch": "on"}],
                         ids=["default", "accum-clip-prefetch"])
def test_reads_do_not_grow_with_the_step_count(monkeypatch, options):
    ctx, inputs = _context(**options)
    _train(ctx, inputs, 2)  # warm-up: one-time reads (lazy initialisation) happen here
    counts = _count_reads(monkeypatch)
    meter = _train(ctx, inputs, 4)
    short = dict(counts)
    counts.clear()
    _train(ctx, inputs, 8)
    assert dict(counts) == short, "reads that grow with the steps: per-step syncs"
    assert sum(short.values()) <= 2  # the epoch-end read of the sums
    assert meter.steps == 4 and meter.images == 4 * BATCH and meter.optimizer_steps == 4 // ctx.cfg.accum_steps
    assert 0 < meter.loss_sum and 0 <= meter.correct <= meter.images and meter.grad_norm_max > 0


def test_reads_follow_the_progress_interval_not_the_steps(monkeypatch):
    ctx, inputs = _context()
    _train(ctx, inputs, 2)
    counts = _count_reads(monkeypatch)
    _train(ctx, inputs, 8, epoch_steps=20)  # a read every 2 steps: at steps 2, 4, 6, and the end
    assert sum(counts.values()) == 4, counts


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prefetch", ["on", "off"])
def test_no_step_synchronises_with_the_gpu(monkeypatch, prefetch):
    """CUDA's own check: any implicit sync (a read, a blocking copy) in the steps raises. The reads of
    the sums are let through; the batches are made on the GPU with device-only ops, so this checks the
    loop, the step, the meter and the prefetch stream, not the augmentation's host-side draws."""
    ctx, inputs = _context("cuda", prefetch=prefetch)
    k = ctx.dataset.num_classes

    def on_gpu(images, labels, gen):
        return images.float().div(255), F.one_hot(labels, k).float()

    real_read = EpochMeter.read

    def read(self):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real_read(self)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    _train(ctx, inputs, 2, on_gpu)  # warm-up: cuDNN and allocator set-up may synchronise
    monkeypatch.setattr(EpochMeter, "read", read)
    torch.cuda.set_sync_debug_mode("error")
    try:
        meter = _train(ctx, inputs, 6, on_gpu)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert meter.steps == 6 and meter.loss_sum > 0


def test_data_and_compute_time_are_logged_apart(tmp_path):
    run = fit(build_config(data="cifar10-mini", model="fastnet_cifar_small", batch_size=256, epochs=1,
                           quiet=True, precision="fp32", out=str(tmp_path / "run")))
    (record,) = rundir.read_metrics(run)
    assert record["data_time"] >= 0 and record["compute_time"] > 0
    assert record["data_time"] + record["compute_time"] <= record["epoch_time"] * (1 + 1e-9)
    assert record["compute_time"] > record["data_time"]  # batches in memory: the step is the cost


def test_a_prefetched_run_stopped_and_resumed_ends_as_an_inline_one(tiny_folder, tmp_path):
    """The prefetch thread augments ahead; a stop sets the augmentation stream back to the first batch
    not trained on, so the checkpoint holds what an inline run's does and the resumed run adds up."""
    from imgcls.training.train import Interrupted
    from tests.conftest import run_metrics, tiny_config

    straight = fit(tiny_config(tiny_folder, tmp_path / "inline", prefetch="off"))
    with pytest.raises(Interrupted):
        fit(tiny_config(tiny_folder, tmp_path / "ahead", prefetch="on"), stop_after_steps=2)
    assert run_metrics(fit(resume=tmp_path / "ahead")) == run_metrics(straight)


def test_the_summed_meter_keeps_the_other_ranks_sums(monkeypatch):
    """global_meter reads the device sums, then sums them over ranks: what last.pt saves is that sum,
    not this rank's device tensor read again."""
    from types import SimpleNamespace

    from imgcls.training import checkpointer

    meter = EpochMeter()
    meter.start(torch.device("cpu"))
    meter.add_batch(torch.tensor(2.0), torch.eye(4), torch.eye(4))
    monkeypatch.setattr(checkpointer.distributed, "all_sum", lambda world, values: [2 * v for v in values])
    summed = checkpointer.global_meter(SimpleNamespace(world=World()), meter).as_dict()
    assert (summed["images"], summed["loss_sum"], summed["correct"]) == (8, 16.0, 8)
    assert "live" not in summed and meter.loss_sum == 8.0
