"""Past one machine: two torchrun launchers standing in for two nodes, `--resume auto` (the rule that lets a
cluster restart the same command line), torchrun's elastic restart after kill -9 of a worker, SIGUSR1, and
recipes/slurm.sbatch run with stand-ins for srun, scancel and scontrol."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from imgcls import rundir
from imgcls.cli import main
from imgcls.config import build_config
from imgcls.errors import UserError
from imgcls.training.train import Interrupted, fit
from tests.conftest import run_metrics, tiny_config
from tests.test_distributed import OPTIONS, flags, losses

gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")


def train_flags(data, out, **options) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--model", "fastnet_cifar_small", "--img-size", "32",
            "--batch-size", "32", "--precision", "fp32", "--memory-format", "channels_last", "--quiet",
            *flags(options)]


@pytest.fixture(scope="module")
def straight(tiny_folder, tmp_path_factory):
    """tiny_config's run, uninterrupted (2 epochs): what every restarted run must end equal to."""
    return fit(tiny_config(tiny_folder, tmp_path_factory.mktemp("straight") / "run"))


# ---------------------------------------------------------------- --resume auto


def test_resume_auto_starts_a_new_run_continues_it_and_finds_it_finished(tiny_folder, tmp_path, straight, capsys):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):  # the first start, stopped inside epoch 1 (as a preemption would)
        fit(tiny_config(tiny_folder, out), auto_resume=True, stop_after_steps=3)
    assert (out / rundir.LAST).exists() and not (out / rundir.SUMMARY).exists()
    assert main(train_flags(tiny_folder, out, epochs=2, resume="auto")) == 0  # the same command again
    assert run_metrics(out) == run_metrics(straight)  # exactly the uninterrupted run
    summary = json.loads((out / rundir.SUMMARY).read_text())
    assert summary["processes"] == 1 and summary["nodes"] == 1 and "options" not in summary["kernels"]
    before = (out / rundir.SUMMARY).read_bytes()
    capsys.readouterr()
    assert main(train_flags(tiny_folder, out, epochs=2, resume="auto")) == 0  # a requeue after the end
    assert "already finished training with these options; nothing to do" in capsys.readouterr().err
    assert (out / rundir.SUMMARY).read_bytes() == before


def test_resume_auto_refuses_other_options_foreign_folders_and_older_runs(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        fit(tiny_config(tiny_folder, out), auto_resume=True, stop_after_steps=1)
    last = (out / rundir.LAST).read_bytes()

    def refusal(argv) -> str:
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        return err

    err = refusal(train_flags(tiny_folder, out, epochs=3, lr=0.01, resume="auto"))
    assert "was started with other options" in err and "--epochs 2 there, 3 now" in err and "--lr" in err
    assert (out / rundir.LAST).read_bytes() == last  # nothing of the run was touched
    assert "needs --out RUN" in refusal(["train", "--data", str(tiny_folder), "--resume", "auto"])
    assert "drop --allow-data-change" in refusal(train_flags(tiny_folder, out, resume="auto") + ["--allow-data-change"])

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert "holds other files, not an imgcls run" in refusal(train_flags(tiny_folder, foreign, resume="auto"))
    assert (foreign / "notes.txt").read_text() == "keep me"

    older = tmp_path / "older"  # a run from before the options were recorded
    shutil.copytree(out, older)
    plan = json.loads((older / rundir.PLAN).read_text())
    del plan["options"]
    (older / rundir.PLAN).write_text(json.dumps(plan))
    assert f"continue it with imgcls train --resume {older}" in refusal(train_flags(tiny_folder, older, epochs=2,
                                                                                    resume="auto"))


def test_resume_auto_refuses_a_run_whose_data_changed(tiny_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        fit(tiny_config(data, out), auto_resume=True, stop_after_steps=1)
    a, b = sorted((data / "train" / "bird").glob("*.png"))[:2]
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    a.write_bytes(b_bytes)
    b.write_bytes(a_bytes)
    with pytest.raises(UserError, match=r"changed since it was trained \(image content differs\)"):
        fit(tiny_config(data, out), auto_resume=True)


def test_resume_auto_starts_in_an_empty_folder(tiny_folder, tmp_path, straight):
    out = tmp_path / "empty"
    out.mkdir()
    assert run_metrics(fit(tiny_config(tiny_folder, out), auto_resume=True)) == run_metrics(straight)


def test_sigusr1_saves_and_the_same_command_continues(tiny_folder, tmp_path, straight):
    """SLURM's pre-preemption signal: finish the step, save, exit as the signal would; the requeued job, the
    same command line, ends as the uninterrupted run."""
    out = tmp_path / "run"
    argv = train_flags(tiny_folder, out, epochs=2, resume="auto")
    proc = subprocess.Popen([sys.executable, "-m", "imgcls", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    while not (out / rundir.CONFIG).exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGUSR1 arrived")
    assert proc.returncode == 128 + signal.SIGUSR1, err
    assert "with --resume auto: the same command" in err
    assert main(argv) == 0
    assert run_metrics(out) == run_metrics(straight)


# ---------------------------------------------------------------- several nodes, elastic restarts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher(*torchrun_args: str, train_args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "imgcls", "train",
                             *train_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)


@gloo
def test_two_launchers_as_two_nodes_train_as_one_process(tiny_folder, tmp_path):
    single = fit(build_config(data=str(tiny_folder), out=str(tmp_path / "single"), quiet=True, **OPTIONS))
    out = tmp_path / "runs" / "two-nodes"
    port = free_port()
    nodes = [launcher("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                      "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
                      train_args=flags(dict(OPTIONS, data=tiny_folder, out=out)), cwd=tmp_path) for rank in (0, 1)]
    done = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [err[-2000:] for _, err in done]
    assert [p.name for p in out.parent.iterdir()] == ["two-nodes"]
    assert sum(stdout.count("test accuracy, final epoch") for stdout, _ in done) == 1  # global rank 0 alone
    assert [m["epoch"] for m in rundir.read_metrics(out)] == [1, 2, 3]
    summary = json.loads((out / rundir.SUMMARY).read_text())
    assert (summary["nodes"], summary["processes"]) == (2, 2)
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)


def workers(pid: int) -> list[int]:
    """The imgcls processes torchrun (`pid`) started."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"imgcls" in Path(f"/proc/{c}/cmdline").read_bytes()]


@gloo
def test_kill_9_of_a_worker_is_restarted_by_torchrun_and_ends_as_uninterrupted(tiny_folder, tmp_path):
    options = dict(OPTIONS, epochs=6)
    single = fit(build_config(data=str(tiny_folder), out=str(tmp_path / "single"), quiet=True, **options))
    out = tmp_path / "elastic"
    proc = launcher("--nnodes", "1:2", "--nproc-per-node", "2", "--max-restarts", "2", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-conf", "last_call_timeout=1",
                    "--monitor-interval", "0.1", train_args=flags(dict(options, data=tiny_folder, out=out,
                                                                       resume="auto")), cwd=tmp_path)
    while proc.poll() is None and not (out / rundir.LAST).exists():  # past epoch 1: a checkpoint to resume
        time.sleep(0.02)
    victims = workers(proc.pid) if proc.poll() is None else []
    if victims:
        os.kill(victims[-1], signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert victims, "the run ended before a worker could be killed"
    summary = json.loads((out / rundir.SUMMARY).read_text())
    assert summary["restarts"] == 1 and summary["processes"] == 2  # torchrun restarted it once, and it resumed
    assert [m["epoch"] for m in rundir.read_metrics(out)] == list(range(1, 7))
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)


# ---------------------------------------------------------------- the SLURM recipe, on one machine

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "slurm.sbatch"

# Stand-ins for SLURM's commands: srun starts the command once per node, here, each in its own process
# group as slurmstepd would; scancel signals those groups (the job's steps, never the batch script);
# scontrol names this machine as every node and logs a requeue.
SHIMS = {
    "srun": """#!/bin/bash
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node setsid "$@" &
    pids+=($!)
    echo $! >> "$SHIM_DIR/tasks"
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
""",
    "scancel": """#!/bin/bash
signal=${1#--signal=}
while read -r pid; do kill -s "$signal" -- "-$pid" 2>/dev/null; done < "$SHIM_DIR/tasks"
""",
    "scontrol": """#!/bin/bash
case $1 in
    show) echo 127.0.0.1 ;;
    requeue) echo "requeue $2" >> "$SHIM_DIR/log" ;;
esac
""",
}


def slurm_job(tmp_path: Path, run: Path, train_args: list[str]) -> subprocess.Popen:
    shims = tmp_path / "shims"
    shims.mkdir(exist_ok=True)
    for name, text in SHIMS.items():
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    (shims / "tasks").write_text("")
    env = dict(os.environ, PATH=f"{shims}:{Path(sys.executable).parent}:{os.environ['PATH']}", SHIM_DIR=str(shims),
               SLURM_JOB_ID="4242", SLURM_JOB_NAME="imgcls", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[1-2]",
               SLURM_GPUS_ON_NODE="1", SLURM_CPUS_PER_TASK="1", RUN=str(run), PORT=str(free_port()))
    return subprocess.Popen(["bash", str(RECIPE), *train_args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path)


@gloo
def test_the_slurm_recipe_trains_on_two_nodes_requeues_on_sigusr1_and_continues(tiny_folder, tmp_path):
    options = dict(OPTIONS, epochs=4, data=tiny_folder)
    single = fit(build_config(out=str(tmp_path / "single"), quiet=True, **options))
    run = tmp_path / "runs" / "job"
    job = slurm_job(tmp_path, run, flags(options))
    while job.poll() is None and not (run / rundir.LAST).exists():  # past epoch 1: the time limit is near
        time.sleep(0.02)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=600)
    if (run / rundir.SUMMARY).exists():
        pytest.skip("the job finished before SIGUSR1 arrived")
    assert job.returncode == 0, err[-3000:]
    assert "saving" in out and (tmp_path / "shims" / "log").read_text() == "requeue 4242\n"
    requeued = slurm_job(tmp_path, run, flags(options))  # SLURM starts the same script again
    out, err = requeued.communicate(timeout=600)
    assert requeued.returncode == 0, err[-3000:]
    summary = json.loads((run / rundir.SUMMARY).read_text())
    assert (summary["nodes"], summary["processes"]) == (2, 2)
    assert [m["epoch"] for m in rundir.read_metrics(run)] == [1, 2, 3, 4]
    assert losses(run) == pytest.approx(losses(single), rel=1e-5)
