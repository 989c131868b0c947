"""The training core under faults: divergence, two writers, changed data, signals, kills, a full disk,
and run folders that failed early. Each test attacks the real code path (fit or the CLI)."""

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls import rundir
from imgcls.cli import main
from imgcls.config import build_config
from imgcls.errors import UserError
from imgcls.training import context
from imgcls.training.train import Diverged, Interrupted, fit
from tests.conftest import run_metrics, tiny_config

_cfg, _metrics = tiny_config, run_metrics


def _one_line_error(capsys) -> str:
    """The one error line; warnings before it (the tiny folder's few validation images) are the run's own."""
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("imgcls: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def straight(tiny_folder, tmp_path_factory):
    """The uninterrupted run every fault test must end up equal to."""
    return fit(_cfg(tiny_folder, tmp_path_factory.mktemp("straight") / "run"))


# ---------------------------------------------------------------- 1. divergence is never success


def test_huge_learning_rate_fails_in_one_line_and_leaves_no_run(tiny_folder, tmp_path, capsys):
    out = tmp_path / "nan"
    code = main(["train", "--data", str(tiny_folder), "--model", "fastnet_cifar_small", "--img-size", "32",
                 "--batch-size", "32", "--epochs", "2", "--lr", "1e6", "--out", str(out), "--quiet",
                 "--precision", "fp32"])
    assert code == 2
    line = _one_line_error(capsys)
    assert "training diverged" in line and "lower --lr (now 1e+06)" in line
    assert not out.exists()  # failed before its first checkpoint: nothing is left behind


def test_a_run_whose_validation_outputs_overflow_is_said_to_diverge(tmp_path, capsys):
    """Outputs that overflow only at validation (the training loss still finite): the divergence line, not the
    inference refusal that names a checkpoint and a flag train does not have."""
    rng = np.random.default_rng(1)
    for split, n in (("train", 24), ("test", 8)):
        for name, base in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            folder = tmp_path / "data" / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(np.array(base) + rng.integers(-40, 41, 3), 0, 255)
                Image.new("RGB", (20, 20), tuple(int(v) for v in pixels)).save(folder / f"{i}.png")
    out = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "data"), "--model", "fastnet_cifar_small", "--img-size", "32",
                 "--epochs", "2", "--lr", "1e3", "--out", str(out), "--quiet", "--precision", "fp32"]) == 2
    line = _one_line_error(capsys)
    assert "training diverged" in line and "lower --lr (now 1000)" in line and "--checkpoint" not in line, line
    assert not out.exists()


def _patch_loss(monkeypatch, wrap):
    """Make every run's loss `wrap(real_loss)`: the loop calls ctx.loss, built by context.make_loss."""
    real_make = context.make_loss
    monkeypatch.setattr(context, "make_loss", lambda cfg, weights: wrap(real_make(cfg, weights)))


def test_a_nan_after_the_first_epoch_keeps_the_last_good_checkpoint(tiny_folder, tmp_path, monkeypatch, straight):
    calls = []

    def nan_at_step_6(real):
        def loss(logits, targets):
            calls.append(1)
            value = real(logits, targets)
            return value * float("nan") if len(calls) == 6 else value

        return loss

    _patch_loss(monkeypatch, nan_at_step_6)
    with pytest.raises(Diverged, match=r"loss became nan in epoch 2 \(step 2\).*last good state \(epoch 1\)"):
        fit(_cfg(tiny_folder, tmp_path / "run"))
    run = tmp_path / "run"
    assert not (run / rundir.SUMMARY).exists()
    assert _metrics(run) == _metrics(straight)[:1]  # epoch 1 logged, nothing after it
    last = torch.load(run / rundir.LAST, weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    # the saved state is good: resumed without the fault, the run ends exactly as the straight one
    monkeypatch.undo()
    assert _metrics(fit(resume=run)) == _metrics(straight)


# ---------------------------------------------------------------- 2. one writer per run folder

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from imgcls.rundir import RunLock
    lock = RunLock(sys.argv[1]); lock.acquire(); print("locked", flush=True); time.sleep(60)
""")


def test_a_run_being_trained_cannot_be_resumed_until_its_trainer_dies(tiny_folder, tmp_path, straight):
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        fit(_cfg(tiny_folder, run), stop_after_steps=2)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"being trained by process {holder.pid}"):
            fit(resume=run)
        before = (run / rundir.LAST).read_bytes()
        assert (run / rundir.LAST).read_bytes() == before  # the refused writer touched nothing
    finally:
        holder.kill()  # a kill -9 leaves the lock file behind; the kernel released the lock itself
        holder.wait()
    assert _metrics(fit(resume=run)) == _metrics(straight)


HOLD_LOCK_WITH_A_WORKER = textwrap.dedent("""
    import multiprocessing, sys, time
    from imgcls.rundir import RunLock
    lock = RunLock(sys.argv[1]); lock.acquire()
    fork = multiprocessing.get_context("fork")  # as a DataLoader starts its workers
    running = fork.Event()
    worker = fork.Process(target=lambda: (running.set(), time.sleep(60)))
    worker.start(); running.wait()  # the child runs (its at-fork hooks have run)
    print(worker.pid, flush=True); time.sleep(60)
""")


def test_a_worker_that_outlives_its_killed_trainer_holds_no_lock(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK_WITH_A_WORKER, str(run)], stdout=subprocess.PIPE,
                              text=True)
    worker = int(holder.stdout.readline())
    try:
        assert rundir.RunLock(run).held_elsewhere()
        holder.kill()  # kill -9 of the trainer: its worker lives on, orphaned
        holder.wait()
        os.kill(worker, 0)  # still alive
        assert not rundir.RunLock(run).held_elsewhere()
        lock = rundir.RunLock(run)
        lock.acquire()  # the restarted trainer takes the run at once
        lock.release()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


# ---------------------------------------------------------------- 3. a run's data is pinned


def test_resume_refuses_data_that_changed_unless_allowed(tiny_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        fit(_cfg(data, run), stop_after_steps=2)
    extra = sorted((data / "train" / "bird").iterdir())[0]
    shutil.copy(extra, data / "train" / "bird" / f"copy{extra.suffix}")
    with pytest.raises(UserError, match=r"data of .* changed since it was trained \(train split .*--allow-data-change"):
        fit(resume=run)
    assert (run / rundir.LAST).exists()
    assert (fit(resume=run, allow_data_change=True) / rundir.SUMMARY).exists()


def test_same_size_but_other_pixels_is_a_change_too(tiny_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        fit(_cfg(data, run), stop_after_steps=2)
    a, b = sorted((data / "train" / "bird").glob("*.png"))[:2]
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)  # swap two images: same files, sizes and labels, other content
    b.write_bytes(a_bytes)
    with pytest.raises(UserError, match=r"changed since it was trained \(image content differs\)"):
        fit(resume=run)


# ---------------------------------------------------------------- 4. signals, kills, a full disk


TRAIN_ARGS = ["--model", "fastnet_cifar_small", "--img-size", "32", "--batch-size", "32", "--epochs", "2",
              "--precision", "fp32"]


def _train_process(data, out, *extra):
    return subprocess.Popen([sys.executable, "-m", "imgcls", "train", "--data", str(data), *TRAIN_ARGS,
                             "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_saves_and_resumes_like_ctrl_c(tiny_folder, tmp_path, straight):
    out = tmp_path / "run"
    proc = _train_process(tiny_folder, out, "--quiet")
    while not (out / rundir.CONFIG).exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert f"imgcls train --resume {out}" in err
    assert _metrics(fit(resume=out)) == _metrics(straight)


@pytest.mark.parametrize("kills", [2])
def test_kill_9_at_random_moments_then_resume_ends_as_uninterrupted(tiny_folder, tmp_path, straight, kills):
    assert _kill_and_resume(tiny_folder, tmp_path / "run", kills, seed=0) == _metrics(straight)


@pytest.mark.slow
def test_kill_9_soak(tiny_folder, tmp_path, straight):
    """The longer soak (about a minute): more kills at more moments."""
    for seed in range(3):
        assert _kill_and_resume(tiny_folder, tmp_path / f"run{seed}", 4, seed) == _metrics(straight)


def _kill_and_resume(data, out, kills: int, seed: int) -> list[dict]:
    """Start (or resume) the run, kill -9 it after a random delay, `kills` times; then finish it."""
    import random

    rng = random.Random(seed)
    for _ in range(kills):
        started = (out / rundir.CONFIG).exists()
        extra = ["--resume", str(out)] if started else ["--data", str(data), *TRAIN_ARGS, "--out", str(out)]
        proc = subprocess.Popen([sys.executable, "-m", "imgcls", "train", "--quiet", *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=rng.uniform(2.0, 6.0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if (out / rundir.SUMMARY).exists():
            break
    if not (out / rundir.CONFIG).exists():  # every kill came before the run folder was made
        fit(_cfg(data, out))
    elif not (out / rundir.SUMMARY).exists():
        fit(resume=out)
    assert not list(out.glob(f".*{rundir.TMP_MARK}*"))  # a killed save's temporary file does not stay
    return _metrics(out)


def test_a_full_disk_keeps_the_previous_checkpoint_and_the_run_resumes(tiny_folder, tmp_path, monkeypatch,
                                                                       straight):
    real_replace, saves = os.replace, []

    def no_space_on_third_save(src, dst):
        saves.append(os.path.basename(dst))
        if saves.count(rundir.LAST) == 2:  # the end of epoch 2
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    run = tmp_path / "run"
    monkeypatch.setattr(rundir.os, "replace", no_space_on_third_save)
    with pytest.raises(UserError, match="no space left on the device to write .*; the previous .* is intact"):
        fit(_cfg(tiny_folder, run))
    monkeypatch.setattr(rundir.os, "replace", real_replace)
    assert not list(run.glob(f".*{rundir.TMP_MARK}*"))
    assert torch.load(run / rundir.LAST, weights_only=True)["epoch"] == 1
    assert _metrics(fit(resume=run)) == _metrics(straight)


@pytest.fixture
def small_disk(tmp_path):
    """A real 6 MiB tmpfs where the machine lets us mount one (root in a container or VM), else skip."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here; the patched-ENOSPC test covers the same path")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_keeps_the_previous_checkpoint(tiny_folder, small_disk, straight):
    """6 MiB holds epoch 1's files (best.pt 1.2 MB, last.pt 3.6 MB) but not a second last.pt beside the first."""
    run = small_disk / "run"
    with pytest.raises(UserError, match="no space left on the device"):
        fit(_cfg(tiny_folder, run))
    assert torch.load(run / rundir.LAST, weights_only=True)["epoch"] == 1  # the previous one, intact
    assert not list(run.glob(f".*{rundir.TMP_MARK}*"))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # space freed
    assert _metrics(fit(resume=run)) == _metrics(straight)


# ---------------------------------------------------------------- 5. no stuck run folders


def test_a_run_killed_before_its_first_checkpoint_can_be_resumed_or_replaced(tiny_folder, tmp_path, straight):
    """kill -9 between creating the folder and the first checkpoint leaves config and dataset files only."""
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed, ignore=shutil.ignore_patterns("*.pt", "*.npz", "summary.json", "metrics.jsonl"))
    config = (killed / rundir.CONFIG).read_text().replace(str(straight.resolve()), str(killed.resolve()))
    (killed / rundir.CONFIG).write_text(config)
    (killed / f".{rundir.LAST}{rundir.TMP_MARK}99999").write_bytes(b"half a checkpoint")
    assert _metrics(fit(resume=killed)) == _metrics(straight)  # resumable: it starts from the beginning

    again = tmp_path / "again"
    shutil.copytree(straight, again, ignore=shutil.ignore_patterns("*.pt", "*.npz", "summary.json", "metrics.jsonl"))
    config = (again / rundir.CONFIG).read_text().replace(str(straight.resolve()), str(again.resolve()))
    (again / rundir.CONFIG).write_text(config)
    (again / rundir.LOCK).touch()  # a killed run keeps its lock file (a finished one removes it)
    assert _metrics(fit(_cfg(tiny_folder, again))) == _metrics(straight)  # or a new run may take the folder


def test_a_users_own_folder_is_never_taken_for_an_unstarted_run(tiny_folder, tmp_path):
    """`imgcls train --recipe exp/config.yaml --out exp`: exp holds the user's recipe, not a killed run."""
    mine = tmp_path / "exp"
    mine.mkdir()
    (mine / rundir.CONFIG).write_text("lr: 0.01\n")
    with pytest.raises(UserError, match="already exists and is not empty"):
        fit(_cfg(tiny_folder, mine))
    assert (mine / rundir.CONFIG).read_text() == "lr: 0.01\n"


def test_a_failed_resume_never_removes_the_run(tiny_folder, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        fit(_cfg(tiny_folder, run, epochs=3), stop_after_steps=6)
    (run / rundir.LAST).write_bytes((run / rundir.LAST).read_bytes()[:1000])  # damaged
    with pytest.raises(UserError, match="damaged or truncated"):
        fit(resume=run)
    assert (run / rundir.BEST).exists() and (run / rundir.CONFIG).exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_data_resumes_exactly_mid_epoch(tiny_folder, tmp_path, workers):
    """Per-image augmentation in the DataLoader workers is seeded by the image's place in the epoch,
    not by which worker decodes it or what the process drew before."""
    options = dict(data_mode="stream", workers=workers, aug="randaugment")
    straight = fit(_cfg(tiny_folder, tmp_path / "straight", **options))
    with pytest.raises(Interrupted):
        fit(_cfg(tiny_folder, tmp_path / "stopped", **options), stop_after_steps=3)
    assert _metrics(fit(resume=tmp_path / "stopped")) == _metrics(straight)


def test_a_failure_before_the_first_checkpoint_removes_the_run_folder(tiny_folder, tmp_path, monkeypatch):
    def broken(real):
        def loss(logits, targets):
            raise RuntimeError("simulated failure in the first step")

        return loss

    _patch_loss(monkeypatch, broken)
    with pytest.raises(RuntimeError, match="simulated"):
        fit(_cfg(tiny_folder, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_an_impossible_image_size_fails_before_any_folder(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="--img-size must be >= 8 and <= 1024"):
        _cfg(tiny_folder, tmp_path / "big", img_size=100_000)
    with pytest.raises(UserError, match="fastnet_cifar_small cannot take 8x8 inputs"):  # three 2x pools: 8 is too small
        fit(_cfg(tiny_folder, tmp_path / "odd", img_size=8))
    assert not (tmp_path / "big").exists() and not (tmp_path / "odd").exists()


# ---------------------------------------------------------------- 6. the CLI keeps its word


def test_resume_honours_quiet(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        fit(_cfg(tiny_folder, run, quiet=False), stop_after_steps=2)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "epoch   2/2" not in captured.out + captured.err  # no per-epoch lines, only the summary table
    assert "test accuracy" in captured.out


def test_help_does_not_import_torch():
    code = ("import sys; from imgcls.cli import build_parser; build_parser().format_help(); "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_yaml_values_are_coerced_by_the_schema(tmp_path, tiny_folder):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1e-3\nepochs: '3'\nwhiten: 'yes'\nmodel: fastnet_cifar_small\ngroup_lrs: null\n")
    cfg = build_config(recipe)
    assert (cfg.lr, cfg.epochs, cfg.whiten) == (1e-3, 3, True)
    for bad, message in (("lr: abc\n", "--lr takes a number"), ("epochs: 2.5\n", "--epochs takes an integer"),
                         ("lr: .nan\n", "--lr takes a number"), ("aug: [basic]\n", "--aug takes a single value"),
                         ("lr: 1\nlr: 2\n", "lr"), ("- a\n", "mapping")):
        recipe.write_text(bad)
        with pytest.raises(UserError, match=message):
            build_config(recipe)


def test_config_is_never_mutated_by_training(tiny_folder, tmp_path):
    cfg = _cfg(tiny_folder, tmp_path / "run", epochs=1, aug="standard")
    before = cfg.to_dict()
    fit(cfg)
    assert cfg.to_dict() == before  # the run's resolved values went to config.yaml, not into the caller's object
    written = json.loads(json.dumps(rundir.read_json(tmp_path / "run" / rundir.DATASET)))
    assert written["fingerprint"]["content_sha256"]
