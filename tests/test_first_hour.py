"""What a new user meets first: output that reads in a log (no terminal), counts that say what they count."""

import subprocess
import sys
from pathlib import Path

import torch

from imgcls.models import count_parameters, create_model


def imgcls_piped(*args: str) -> str:
    """stdout of `imgcls ARGS` into a pipe, as in a CI log: no terminal, no COLUMNS."""
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    done = subprocess.run([sys.executable, "-m", "imgcls", *args], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_models_in_a_log_is_one_line_per_model_and_says_which_parameters_it_counts():
    out = imgcls_piped("models")
    header = next(line for line in out.splitlines() if "name" in line)
    assert "backbone" in header and "head (classes)" in header and "description" in header  # one header row
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    lite0 = rows["efficientnet_lite0"].split("│")
    model = create_model("efficientnet_lite0", 10)
    backbone = count_parameters(model) - count_parameters(model.get_classifier())
    # the backbone is what a 10-class run has, less its head; the 1000-class head is shown apart
    assert lite0[2].strip() == f"{backbone / 1e6:.2f}M" and lite0[3].strip() == "1.28M (1000)"
    assert "a head for its own classes" in out


def test_a_training_log_has_one_line_per_epoch_with_the_time_left(tiny_folder, tmp_path, capsys):
    from imgcls.cli import main

    assert main(["train", "--data", str(tiny_folder), "--model", "fastnet_cifar_small", "--epochs", "2",
                 "--batch-size", "32", "--img-size", "32", "--precision", "fp32", "--memory-format", "channels_last",
                 "--out", str(tmp_path / "run")]) == 0
    log = capsys.readouterr().err.splitlines()  # the bar and the epoch lines go to stderr; no terminal here
    epochs = [line for line in log if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"]  # epochs of seconds: no step lines
    assert not [line for line in log if line.lstrip().startswith("step ")]
    assert "left" in epochs[0] and "left" not in epochs[1]


class _Meter:
    steps, images, loss_sum, correct, seconds = 40, 320, 160.0, 100, 20.0


def test_a_long_epoch_adds_a_line_only_after_30_silent_seconds(monkeypatch):
    import io

    from rich.console import Console

    from imgcls.training import progress

    bar = progress.Progress(epochs=2, steps_per_epoch=100, batch_size=8)
    bar.console = Console(file=io.StringIO(), force_terminal=False, width=250)
    bar.start_epoch(0, _Meter())
    bar.update(_Meter())  # just started: the log is not silent yet
    assert bar.console.file.getvalue() == ""
    now = bar.last_line + progress.LOG_SILENCE_S
    monkeypatch.setattr(progress.time, "monotonic", lambda: now)
    bar.update(_Meter())  # 40 of 100 steps in 20 s: 30 s left
    assert bar.console.file.getvalue().strip() == "step 40/100  loss 0.5000  acc 0.3125  16 img/s  epoch left 30s"
    bar.update(_Meter())  # a line was just written
    assert bar.console.file.getvalue().count("\n") == 1


def test_monitor_auto_is_balanced_accuracy_on_imbalanced_classes_and_ties_go_to_the_lower_loss(tiny_folder, tmp_path,
                                                                                               capsys):
    import shutil

    import yaml

    from imgcls.cli import main
    from imgcls.training.loop import improved

    lopsided = tmp_path / "lopsided"
    shutil.copytree(tiny_folder, lopsided)
    for extra in sorted((lopsided / "train" / "airplane").iterdir())[20:]:  # 40 airplanes become 20
        extra.unlink()
    flags = ["--model", "fastnet_cifar_small", "--epochs", "1", "--img-size", "32", "--precision", "fp32",
             "--memory-format", "channels_last", "--quiet"]
    for data, expected in ((tiny_folder, "val_acc"), (lopsided, "balanced_acc")):
        out = tmp_path / f"run-{data.name}"
        assert main(["train", "--data", str(data), *flags, "--out", str(out)]) == 0
        assert yaml.safe_load((out / "config.yaml").read_text())["monitor"] == expected, data
    # 4 validation images per class here: the choice of epoch is said to rest on a handful of images
    assert "fewer than 20 validation images (airplane 2" in capsys.readouterr().err
    assert improved("balanced_acc", 0.5, 0.5, 0.0, loss=0.9, best_loss=1.0)  # a tie at a lower loss
    assert not improved("balanced_acc", 0.5, 0.5, 0.0, loss=1.1, best_loss=1.0)
    assert not improved("balanced_acc", 0.5, 0.5, 0.0)  # no losses known (an older run): no tie-break
    assert improved("val_loss", 0.8, 0.9, 0.0) and not improved("val_loss", 0.9, 0.9, 0.0, loss=0.9, best_loss=0.9)


def test_cached_features_are_reused_by_the_next_run_with_the_same_backbone_and_data(tiny_folder, tmp_path,
                                                                                    capsys, monkeypatch):
    from imgcls.cli import main
    from tests.conftest import run_metrics

    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "cache"))  # none cached yet by another test
    flags = ["--data", str(tiny_folder), "--model", "efficientnet_lite0", "--pretrained", "--strategy",
             "feature-extract", "--cache-features", "--img-size", "64", "--epochs", "2", "--precision", "fp32"]
    assert main(["train", *flags, "--out", str(tmp_path / "first")]) == 0
    first = capsys.readouterr().out
    assert first.index("run ") < first.index("features: computing")  # the header comes before the slow part
    assert "features: 108 train feature vectors in" in first and "(kept for reuse)" in first
    assert main(["train", *flags, "--out", str(tmp_path / "second")]) == 0
    second = capsys.readouterr().out
    assert "features: reused the 108 train feature vectors" in second and "computing" not in second
    assert run_metrics(tmp_path / "second") == run_metrics(tmp_path / "first")  # the same numbers, trained alike
    # a damaged cache file is computed again, never trusted; another split is another key
    for path in (Path(line.rsplit("(", 1)[1].rstrip(")")) for line in second.splitlines() if "reused" in line):
        path.write_bytes(path.read_bytes()[:100])
    assert main(["train", *flags, "--out", str(tmp_path / "third")]) == 0
    third = capsys.readouterr().out
    assert "reused" not in third and run_metrics(tmp_path / "third") == run_metrics(tmp_path / "first")
    # features edited in place (finite, the same shape and labels, the seal left as it was) are not trusted either
    from safetensors.torch import load_file, save_file

    for path in (tmp_path / "cache" / "features").glob("*.safetensors"):
        tensors = load_file(path)
        save_file({**tensors, "features": torch.randn_like(tensors["features"]) * 5}, path)
    assert main(["train", *flags, "--out", str(tmp_path / "forged")]) == 0
    forged = capsys.readouterr().out
    assert "reused" not in forged and run_metrics(tmp_path / "forged") == run_metrics(tmp_path / "first")
    assert main(["train", *flags, "--split-seed", "1", "--out", str(tmp_path / "fourth")]) == 0
    assert "features: computing" in capsys.readouterr().out


def test_a_phase_in_a_log_is_silent_when_short_and_gives_size_rate_and_time_left_when_long(monkeypatch, capsys):
    import time

    from imgcls import progress

    monkeypatch.setattr(progress, "FIRST_LINE_S", 0.5)
    with progress.Phase("scoring x", 10) as phase:  # over long before the first line is due
        phase.advance(10)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "FIRST_LINE_S", 0.05)
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.1)
    with progress.Phase("scoring x", 10) as phase:
        phase.advance(3)
        time.sleep(0.45)  # one slow item: the timer still writes, the log is never silent for long
        phase.advance(7)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("scoring x: 10 images, 3/10 (30%), ") and lines[0].endswith(" left")
    assert len(lines) >= 4 and all(line.startswith("scoring x: 3/10 (30%)") for line in lines[1:-1])
    assert lines[-1].startswith("scoring x: 10 images in ") and lines[-1].endswith(" images/s)")


def test_every_slow_phase_of_every_command_shows_progress(tiny_folder, tmp_path, monkeypatch, capsys):
    """Each command's first line says what it does and where it writes; each long phase (decoding, scoring,
    calibration, parity, Grad-CAM, audit, predict) is a progress phase with its size."""
    from imgcls import progress
    from imgcls.cli import main

    monkeypatch.setenv("IMGCLS_CACHE_DIR", str(tmp_path / "kernels"))  # nothing measured yet: kernels are timed
    phases = []
    enter = progress.Phase.__enter__
    monkeypatch.setattr(progress.Phase, "__enter__", lambda self: self.enabled and phases.append(
        (self.label, self.total)) or enter(self))

    def command(*args: str) -> list[tuple[str, int]]:
        phases.clear()
        assert main(list(args)) == 0
        first = capsys.readouterr().out.splitlines()[0]
        assert first.startswith(args[0]), first  # the command's own first line, before any work
        decoded = {label: total for label, total in phases if label.startswith("decoding ")}
        assert not decoded or decoded == {f"decoding {tiny_folder.name}/train": 120,  # a run's data is checked
                                          f"decoding {tiny_folder.name}/test": 30}  # against its fingerprint
        return [(label.split(":")[0] if args[0] == "export" else label, total) for label, total in phases
                if args[0] == "train" or label not in decoded]

    run = tmp_path / "run"
    trained = command("train", "--data", str(tiny_folder), "--model", "fastnet_cifar_small", "--epochs", "6",
                      "--lr", "3e-3", "--batch-size", "32", "--img-size", "32", "--val-fraction", "0.3",
                      "--precision", "fp32", "--out", str(run))  # trained enough that a temperature fits
    assert trained[:2] == [(f"decoding {tiny_folder.name}/train", 120), (f"decoding {tiny_folder.name}/test", 30)]
    assert ("scoring the test split", 30) in trained
    assert [label for label, _ in trained].count("kernels: timing the candidates") == 1  # an empty cache here
    assert command("eval", str(run), "--tta", "flip") == [("scoring the test split", 30),
                                                          ("scoring the test split (2 views each)", 30)]
    assert command("calibrate", str(run)) == [("scoring the val split", 36), ("scoring the test split", 30)]
    assert command("export", str(run), "--format", "onnx") == [("parity onnxruntime", 36)] * 2 + [
        ("scoring the test split", 30)]  # the model card's test metrics
    reported = command("report", str(run))
    assert ("scoring the test split (2 views each)", 30) in reported and ("Grad-CAM", 8) in reported
    assert ("report: drawing figures", 6) in reported
    images = sorted((tiny_folder / "test").rglob("*.png"))[:3]
    assert command("cam", str(run), *map(str, images), "--out", str(tmp_path / "cam")) == [("Grad-CAM", 3)]
    assert command("predict", str(run), str(tiny_folder / "test"), "--out", str(tmp_path / "p.csv")) == [
        ("predict", 30)]
    assert command("audit", str(tiny_folder), "--out", str(tmp_path / "audit.json")) == [
        (f"audit: hashing {tiny_folder.name}", 150)]


def test_every_command_says_what_it_does_before_torch_is_loaded(tmp_path):
    """The first line within a second or two, on any machine: before `import torch`, which takes seconds."""
    missing = str(tmp_path / "no-run")
    commands = [["train", "--epochs", "1", "--data", missing], ["eval", missing], ["calibrate", missing],
                ["export", missing], ["report", missing], ["cam", missing, "x.png"],
                ["predict", missing, "x.png", "--out", str(tmp_path / "p.csv")], ["audit", missing],
                ["compare", "--data", missing, "--models", "fastnet_cifar_small", "--out", str(tmp_path / "c")],
                ["lr-find", "--data", missing]]
    code = ("import sys, imgcls.cli as cli\n"
            "cli._about = lambda line: print('torch' in sys.modules, line, flush=True)\n"
            "cli.main(sys.argv[1:])\n")
    for argv in commands:  # the first line is all that is read: the command is stopped there
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        first = proc.stdout.readline()
        proc.kill()
        proc.communicate(timeout=60)
        assert first.startswith(f"False {argv[0]}"), (argv, first)


def test_a_slow_step_still_gets_a_line_from_the_timer(monkeypatch):
    """One step longer than LOG_SILENCE_S (no read to print at): the log is not left silent past it."""
    import io
    import time

    from rich.console import Console

    from imgcls.training import progress

    monkeypatch.setattr(progress, "LOG_SILENCE_S", 0.2)
    with progress.Progress(epochs=2, steps_per_epoch=100, batch_size=8) as bar:
        bar.console = Console(file=io.StringIO(), force_terminal=False, width=250)
        bar.start_epoch(0, _Meter())
        bar.advance(_Meter())  # then the step takes long: no update() comes
        time.sleep(1.5)
        lines = bar.console.file.getvalue().splitlines()
    assert lines and all(line == "  step 40/100  16 img/s  epoch left 30s" for line in lines)  # no loss read yet
