"""torchrun: two CPU processes (gloo) train one model as one process with the same global batch would."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from imgcls import rundir
from imgcls.config import build_config
from imgcls.training.distributed import World, rank_order
from imgcls.training.train import Interrupted, fit

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")

# vit_cifar_tiny has LayerNorm only, so a sharded batch computes exactly what the whole batch does;
# 108 training images in batches of 24: four full steps and a last one of 12 (6 per rank). SGD,
# because Adam divides by sqrt(v) and so magnifies float summation-order differences in tiny
# gradients: with AdamW the two runs part by 1e-3 after 15 steps, with SGD by 3e-7.
# fp32: where the CPU runs bf16 natively, `auto` would train in bf16, whose rounding parts the runs by 1e-3.
OPTIONS = dict(model="vit_cifar_tiny", img_size=32, batch_size=24, epochs=3, aug="none", optimizer="sgd", lr=0.05,
               warmup_epochs=0.5, seed=3, precision="fp32")


def torchrun(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "imgcls", "train", *args],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )


def flags(options: dict) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]


def losses(run) -> list[float]:
    """Train and val loss of every epoch, in one list."""
    return [m[k] for m in rundir.read_metrics(run) for k in ("train_loss", "val_loss")]


def test_rank_order_splits_every_global_batch():
    order = torch.arange(10)
    shares = [rank_order(order, 4, World(rank, 2)) for rank in (0, 1)]
    assert shares[0].tolist() == [0, 2, 4, 6, 8] and shares[1].tolist() == [1, 3, 5, 7, 9]
    assert rank_order(order, 4, World()).tolist() == list(range(10))


def test_torchrun_matches_one_process_and_only_rank0_writes(tiny_folder, tmp_path):
    single = fit(build_config(data=str(tiny_folder), out=str(tmp_path / "single"), quiet=True, **OPTIONS))

    parent = tmp_path / "runs"
    done = torchrun(*flags(dict(OPTIONS, data=tiny_folder, out=parent / "ddp")), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name for p in parent.iterdir()] == ["ddp"]  # one run folder, not one per process
    assert done.stdout.count("test accuracy, final epoch") == 1  # rank 0 alone reports
    metrics = rundir.read_metrics(parent / "ddp")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]  # each epoch logged once
    summary = json.loads((parent / "ddp" / rundir.SUMMARY).read_text())
    assert summary["processes"] == 2
    assert losses(parent / "ddp") == pytest.approx(losses(single), rel=1e-5)
    assert losses(single)[-2] < losses(single)[0]  # it did learn, so the match means something

    # Stopped at the end of epoch 1 by one process, finished by two: the same trajectory again.
    try:
        fit(build_config(data=str(tiny_folder), out=str(tmp_path / "resumed"), quiet=True, **OPTIONS),
            stop_after_steps=5)
        raise AssertionError("expected the step limit to stop the run")
    except Interrupted:
        pass
    done = torchrun("--resume", str(tmp_path / "resumed"), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert losses(tmp_path / "resumed") == pytest.approx(losses(single), rel=1e-5)


def test_torchrun_refuses_a_batch_that_does_not_split(tiny_folder, tmp_path):
    done = torchrun(*flags(dict(OPTIONS, data=tiny_folder, batch_size=25, out=tmp_path / "odd")), tmp_path=tmp_path)
    assert done.returncode != 0
    assert "--batch-size 25 is the global batch" in done.stdout + done.stderr  # each rank's one-line error
    assert not (tmp_path / "odd").exists()


def test_torchrun_feature_extraction_trains_the_head_as_one_process_does(tiny_folder, tmp_path):
    start = fit(build_config(data=str(tiny_folder), out=str(tmp_path / "start"), quiet=True, **dict(OPTIONS, epochs=1)))
    frozen = dict(OPTIONS, epochs=2, pretrained=start / rundir.BEST, strategy="feature-extract")
    single = fit(build_config(data=str(tiny_folder), out=str(tmp_path / "single"), quiet=True,
                              **dict(frozen, pretrained=str(frozen["pretrained"]))))
    done = torchrun(*flags(dict(frozen, data=tiny_folder, out=tmp_path / "ddp")), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]  # DDP must be built after the backbone is frozen
    assert losses(tmp_path / "ddp") == pytest.approx(losses(single), rel=1e-5)


def test_torchrun_balanced_sampler_accumulation_and_early_stop_match_one_process(tiny_folder, tmp_path):
    """The controls keep torchrun's promise: the same order shares, the all-reduce only at a window's end
    (no_sync before it), and every rank stopping early at the epoch one process stops at."""
    options = dict(OPTIONS, epochs=5, sampler="balanced", accum_steps=2, patience=1, min_delta=100.0)
    recipe = tmp_path / "monitor.yaml"  # torchrun's parser takes a --monitor flag for its own --monitor-interval
    recipe.write_text("monitor: val_loss\n")
    single = fit(build_config(recipe, data=str(tiny_folder), out=str(tmp_path / "single"), quiet=True, **options))
    done = torchrun("--recipe", str(recipe), *flags(dict(options, data=tiny_folder, out=tmp_path / "ddp")),
                    tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [m["epoch"] for m in rundir.read_metrics(tmp_path / "ddp")] == [1, 2]  # stopped after epoch 2, as one
    assert len(rundir.read_metrics(single)) == 2
    assert losses(tmp_path / "ddp") == pytest.approx(losses(single), rel=1e-5)
    summary = json.loads((tmp_path / "ddp" / rundir.SUMMARY).read_text())
    assert summary["ended"].startswith("early stop after epoch 2") and summary["effective_batch_size"] == 48
