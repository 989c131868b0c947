"""imgcls compare and imgcls report against hostile experiment files, flags and folders.

Most of these need no training: the whole experiment is validated before anything trains, which
the `no_fit` fixture checks by making any call to fit() fail the test.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from imgcls import rundir
from imgcls.cli import main
from imgcls.errors import UserError
from imgcls.training import compare
from imgcls.training.compare import experiment_from_flags, read_experiment, run_experiment
from imgcls.yamlio import load_yaml_mapping

FAST = {"model": "fastnet_cifar_small", "epochs": 1, "batch-size": 32}


@pytest.fixture
def no_fit(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("fit() was called before the experiment was fully validated")

    monkeypatch.setattr(compare, "fit", fail)


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def experiment(tmp_path: Path, data, variants: dict, train: dict | None = None, seeds=(0,)) -> Path:
    """An experiment file (JSON is YAML) with the fast shared budget."""
    raw = {"data": str(data), "train": {**FAST, **(train or {})}, "seeds": list(seeds), "variants": variants}
    return write(tmp_path, json.dumps(raw))


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------- YAML that is not what it seems


def test_duplicate_variant_is_refused_not_dropped(tmp_path):
    path = write(tmp_path, "data: cifar10-mini\nvariants:\n  a: {lr: 0.001}\n  b: {lr: 0.002}\n  a: {lr: 0.003}\n")
    with pytest.raises(UserError, match=r"'a' twice \(lines 3 and 5\)") as e:
        read_experiment(path)
    one_line(e)


@pytest.mark.parametrize("text, match", [
    ("data: cifar10-mini\ntrain:\n  lr: 0.1\n  lr: 0.2\nvariants: {a: {}}\n", "'lr' twice"),
    ("data: [cifar10\nvariants: {a: {}}\n", "not valid YAML"),
    ("- a\n- b\n", "mapping .* not a list"),
    ("just text\n", "not a str"),
])
def test_bad_yaml_is_one_line(tmp_path, text, match):
    with pytest.raises(UserError, match=match) as e:
        load_yaml_mapping(write(tmp_path, text), "experiment file")
    one_line(e)


def test_missing_experiment_file(tmp_path):
    with pytest.raises(UserError, match="does not exist") as e:
        read_experiment(tmp_path / "nope.yaml")
    one_line(e)


@pytest.mark.parametrize("text, match", [
    ("variants: {}\n", "needs a 'variants' mapping"),
    ("variants: [a, b]\n", "needs a 'variants' mapping"),
    ("variants: {a: [1, 2]}\n", "variant a must be a mapping"),
    ("variants: {a: fastnet_cifar_small}\n", "variant a must be a mapping"),
    ("train: [lr, 0.1]\nvariants: {a: {}}\n", "train must be a mapping"),
    ("epochs: 3\nvariants: {a: {}}\n", "unknown key.*epochs"),
    ("data: 5\nvariants: {a: {}}\n", "data must be a dataset name"),
    ("data: cifar10-mini\ntrain: {data: cifar10}\nvariants: {a: {}}\n", "data both"),
    ("data: ${IMGCLS_NO_SUCH_VARIABLE}/cats\nvariants: {a: {}}\n", r"IMGCLS_NO_SUCH_VARIABLE.*not set"),
    ("train: {seed: 3}\nvariants: {a: {}}\n", "sets seed.*seeds:"),
    ("variants: {a: {out: /tmp/elsewhere}}\n", "sets out.*--out"),
    ("train: {batch-size: 32, batch_size: 64}\nvariants: {a: {}}\n", "batch_size twice"),
    ("variants: {a: {}, A: {}}\n", "differ only in case"),
    ("variants: {a: {epochs: 3}}\n", "sets epochs"),
])
def test_malformed_experiment_is_refused(tmp_path, monkeypatch, text, match):
    monkeypatch.delenv("IMGCLS_NO_SUCH_VARIABLE", raising=False)
    with pytest.raises(UserError, match=match) as e:
        read_experiment(write(tmp_path, text))
    one_line(e)


@pytest.mark.parametrize("seeds, match", [
    ('["a"]', "'a' is not a non-negative integer"), ("[1.5]", "1.5"), ("[true]", "True"), ("[-1]", "-1"),
    ("[]", "non-empty list"), ("3", "non-empty list"), ("[0, 0]", "seed 0 is given twice"),
])
def test_bad_seeds_in_the_file(tmp_path, seeds, match):
    with pytest.raises(UserError, match=match) as e:
        read_experiment(write(tmp_path, f"seeds: {seeds}\nvariants: {{a: {{}}}}\n"))
    one_line(e)


# ---------------------------------------------------------------- names that would escape --out


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "", ".", "..", ".hidden", "a\nb", "a\x00b", "a b",
                                  "results.json", "report.html", "x" * 101])
def test_unsafe_variant_names_are_refused(tmp_path, name):
    path = write(tmp_path, json.dumps({"data": "cifar10-mini", "variants": {name: {"model": "fastnet_cifar_small"}}}))
    with pytest.raises(UserError, match="variant name") as e:
        read_experiment(path)
    one_line(e)
    assert [p.name for p in tmp_path.iterdir()] == ["exp.yaml"]


@pytest.mark.parametrize("text", ["variants: {5: {}}\n", "variants: {null: {}}\n", "variants: {true: {}}\n"])
def test_variant_names_must_be_text(tmp_path, text):
    with pytest.raises(UserError, match="is not text; quote it") as e:
        read_experiment(write(tmp_path, text))
    one_line(e)


def test_safe_names_pass_and_flag_form_names_timm_models(tmp_path):
    exp = read_experiment(write(tmp_path, "variants: {mixup+cutmix: {}, 'lr=1e-3,bs_32': {}, v1.2-b: {}}\n"))
    assert list(exp.variants) == ["mixup+cutmix", "lr=1e-3,bs_32", "v1.2-b"]
    exp = experiment_from_flags("cifar10-mini", ["timm/convnext_atto", "vit_cifar"], 1, [0], {})
    assert exp.variants == {"timm_convnext_atto": {"model": "timm/convnext_atto"}, "vit_cifar": {"model": "vit_cifar"}}


# ---------------------------------------------------------------- the whole experiment checked before training


@pytest.mark.parametrize("bad", [
    {"model": "no_such_model"},
    {"model": "fastnet_cifar_small", "lr": -1},
    {"model": "fastnet_cifar_small", "strategy": "finetune"},
    {"model": "fastnet_cifar_small", "pretrained": "missing.safetensors"},
    {"model": "fastnet_cifar_small", "lr": "fast"},
])
def test_an_invalid_later_variant_is_found_before_anything_trains(tmp_path, tiny_folder, no_fit, bad):
    path = experiment(tmp_path, tiny_folder, {"good": {"model": "fastnet_cifar_small"}, "bad": bad})
    with pytest.raises(UserError, match="variant bad") as e:
        run_experiment(read_experiment(path), tmp_path / "out")
    one_line(e)
    assert not (tmp_path / "out").exists()


def test_variants_at_different_native_sizes_are_refused_before_training(tmp_path, tiny_folder, no_fit):
    path = experiment(tmp_path, tiny_folder, {"small": {"model": "fastnet_cifar_small"},
                                              "big": {"model": "efficientnet_lite0"}})
    with pytest.raises(UserError, match=r"different image sizes \(small 32px, big 224px\)") as e:
        run_experiment(read_experiment(path), tmp_path / "out")
    one_line(e)


@pytest.mark.parametrize("extra, match", [
    (["--seeds", "0,0"], "seed 0 is given twice"),
    (["--seeds", "a"], "--seeds takes comma-separated integers"),
    (["--seeds", ""], "--seeds takes comma-separated integers"),
    (["--seeds", "-1"], "not a non-negative integer"),
    (["--epochs", "0"], "epochs"),
    (["--models", "fastnet_cifar_small,fastnet_cifar_small"], "twice"),
    (["--models", "../../x"], "variant name"),
])
def test_bad_flags_are_one_line_errors(tmp_path, tiny_folder, no_fit, capsys, extra, match):
    argv = ["compare", "--data", str(tiny_folder), "--models", "fastnet_cifar_small", "--epochs", "1", "--seeds", "0",
            "--out", str(tmp_path / "out"), "--quiet"]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        argv[argv.index(flag) + 1] = value
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("imgcls: error:")
    assert re.search(match, err)
    assert not (tmp_path / "out").exists()


def test_flags_that_the_experiment_file_would_ignore_are_refused(tmp_path, no_fit, capsys):
    path = write(tmp_path, "variants: {a: {}}\n")
    assert main(["compare", str(path), "--epochs", "3", "--out", str(tmp_path / "out")]) == 2
    assert "--epochs" in capsys.readouterr().err


def test_out_that_is_a_file_or_a_run_is_refused(tmp_path, tiny_folder, no_fit):
    exp = experiment_from_flags(str(tiny_folder), ["fastnet_cifar_small"], 1, [0], {})
    (tmp_path / "file").write_text("x")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("model: fastnet_cifar_small\n")
    for out in ("file", "run"):
        with pytest.raises(UserError, match="not a comparison folder"):
            run_experiment(exp, tmp_path / out)


# ---------------------------------------------------------------- reruns: stale runs, changed data


def test_changed_options_refuse_the_stale_run_and_the_same_options_reuse_it(tmp_path, tiny_folder, capsys):
    out = tmp_path / "out"
    argv = ["compare", None, "--out", str(out), "--quiet"]
    argv[1] = str(experiment(tmp_path, tiny_folder, {"a": {"lr": 0.001}}))
    assert main(argv) == 0
    summary = out / "a" / "seed-0" / "summary.json"
    before = summary.read_bytes(), summary.stat().st_mtime_ns
    record = json.loads((out / "a" / "seed-0.options.json").read_text())
    assert record["options"]["lr"] == 0.001 and "out" not in record["options"]

    argv[1] = str(experiment(tmp_path, tiny_folder, {"a": {"lr": 0.002}}))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lr 0.001 -> 0.002" in err and "fresh --out" in err and err.count("\n") == 1
    assert (summary.read_bytes(), summary.stat().st_mtime_ns) == before
    assert json.loads((out / "results.json").read_text())["variants"]["a"]["lr"] == 0.001  # not rewritten

    argv[1] = str(experiment(tmp_path, tiny_folder, {"a": {"lr": 0.001}}))
    assert main(argv) == 0  # the same options again: reused, not retrained
    assert (summary.read_bytes(), summary.stat().st_mtime_ns) == before


def test_runs_without_a_record_are_checked_against_their_config(tmp_path, tiny_folder, capsys):
    out = tmp_path / "out"
    argv = ["compare", str(experiment(tmp_path, tiny_folder, {"a": {"lr": 0.001}})), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    (out / "a" / "seed-0.options.json").unlink()  # as an older imgcls left it
    argv[1] = str(experiment(tmp_path, tiny_folder, {"a": {"lr": 0.001}}, train={"weight-decay": 0.01}))
    assert main(argv) == 2
    assert "weight_decay 0.05 -> 0.01" in capsys.readouterr().err
    argv[1] = str(experiment(tmp_path, tiny_folder, {"a": {"lr": 0.001}}))
    assert main(argv) == 0
    assert (out / "a" / "seed-0.options.json").is_file()  # recorded from now on


def test_a_run_folder_moved_under_another_variant_or_seed_is_refused(tmp_path, tiny_folder, capsys):
    """Two variants' seed-0 folders swapped (each beside the other's options record), or seed-0 copied over
    seed-1, were tabled under the wrong variant, or as two seeds with ± 0.00: a run's config.yaml says what it
    was made with, and must be the plan's too."""
    out = tmp_path / "out"
    argv = ["compare", str(experiment(tmp_path, tiny_folder, {"a": {"lr": 0.001}, "b": {"lr": 0.002}},
                                      seeds=(0, 1))), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    swapped, copied = tmp_path / "swapped", tmp_path / "copied"
    shutil.copytree(out, swapped)
    (swapped / "a" / "seed-0").rename(swapped / "t")
    (swapped / "b" / "seed-0").rename(swapped / "a" / "seed-0")
    (swapped / "t").rename(swapped / "b" / "seed-0")
    shutil.copytree(out, copied)
    shutil.rmtree(copied / "b" / "seed-1")
    shutil.copytree(copied / "b" / "seed-0", copied / "b" / "seed-1")
    for folder, words in ((swapped, "lr 0.002 -> 0.001"), (copied, "seed 0 -> 1")):
        before = (folder / "results.json").read_bytes()
        capsys.readouterr()
        assert main([*argv[:2], "--out", str(folder), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
        assert (folder / "results.json").read_bytes() == before


def test_a_class_weights_file_keys_a_run_by_its_content(tmp_path, tiny_folder, capsys):
    """The options record held the file's path alone: an edited file (1:1 made 1:50) was averaged with the
    runs trained before the edit as one variant."""
    weights = tmp_path / "w.json"
    weights.write_text(json.dumps({"airplane": 1, "automobile": 1, "bird": 1}))
    out = tmp_path / "out"
    argv = ["compare", str(experiment(tmp_path, tiny_folder, {"a": {"class-weights": str(weights)}})), "--out",
            str(out), "--quiet"]
    assert main(argv) == 0
    weights.write_text(json.dumps({"airplane": 1, "automobile": 1, "bird": 50}))
    capsys.readouterr()
    assert main(argv) == 2
    assert "class_weights_sha256" in capsys.readouterr().err


def test_changed_data_is_refused_before_new_runs_train(tmp_path, tiny_folder, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    out = tmp_path / "out"
    argv = ["compare", str(experiment(tmp_path, data, {"a": {}})), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    first = next((data / "train").iterdir())
    for i, image in enumerate(sorted(first.iterdir())[:5]):
        shutil.copy(image, first / f"extra-{i}{image.suffix}")
    argv[1] = str(experiment(tmp_path, data, {"a": {}, "b": {"lr": 0.002}}))
    assert main(argv) == 2
    assert "has changed since" in capsys.readouterr().err
    assert not (out / "b" / "seed-0").exists()


def test_finished_runs_are_not_tabled_again_after_the_data_changed(tmp_path, tiny_folder, capsys):
    """Two images swap classes (same names, same count, same labels per name: only their pixels moved)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    out = tmp_path / "out"
    argv = ["compare", str(experiment(tmp_path, data, {"a": {}})), "--out", str(out), "--quiet"]
    assert main(argv) == 0
    before = (out / "results.json").read_bytes()
    a, b = (sorted((data / "train" / c).iterdir())[1] for c in sorted(p.name for p in (data / "train").iterdir())[:2])
    a_bytes = a.read_bytes()
    a.write_bytes(b.read_bytes())
    b.write_bytes(a_bytes)
    capsys.readouterr()
    assert main(argv) == 2
    assert "has changed since" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_a_summary_copied_from_another_run_is_refused(tmp_path, tiny_folder):
    from imgcls.evaluation.analysis import training_record
    from imgcls.training.train import fit
    from tests.conftest import tiny_config

    runs = [fit(tiny_config(tiny_folder, tmp_path / f"run{seed}", epochs=1, seed=seed)) for seed in (0, 7)]
    shutil.copy(runs[1] / rundir.METRICS, runs[0] / rundir.METRICS)  # the epoch lines alone
    with pytest.raises(UserError, match="it is not the file of epochs this summary was written from"):
        training_record(runs[0])
    shutil.copy(runs[1] / rundir.SUMMARY, runs[0] / rundir.SUMMARY)  # and the summary with them
    with pytest.raises(UserError, match="seed 7 in the summary, 0 in the config"):
        training_record(runs[0])


# ---------------------------------------------------------------- report on a copied comparison


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def finished(tmp_path, tiny_folder) -> Path:
    out = tmp_path / "orig"
    exp = experiment(tmp_path, tiny_folder, {"a": {}})
    assert main(["compare", str(exp), "--out", str(out), "--quiet"]) == 0
    return out


def test_report_on_a_copy_never_writes_into_the_original(tmp_path, finished):
    assert json.loads((finished / "results.json").read_text())["runs"][0]["run"] == "a/seed-0"
    before = snapshot(finished)
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    assert main(["report", str(copy), "--device", "cpu"]) == 0
    assert snapshot(finished) == before
    assert (copy / "report.html").is_file() and (copy / "a" / "seed-0" / "report" / "report.html").is_file()


def test_report_reads_old_absolute_paths_inside_the_copy(tmp_path, finished):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    results = json.loads((copy / "results.json").read_text())
    results["runs"][0]["run"] = str((finished / "a" / "seed-0").resolve())  # as older imgcls wrote it
    rundir.write_sealed_json(copy / "results.json", results)  # sealed as this imgcls writes
    before = snapshot(finished)
    assert main(["report", str(copy), "--device", "cpu"]) == 0
    assert snapshot(finished) == before
    assert (copy / "a" / "seed-0" / "report" / "report.html").is_file()


@pytest.mark.parametrize("run", ["../orig/a/seed-0", "/nowhere/a/seed-9"])
def test_report_refuses_runs_outside_the_folder(tmp_path, finished, capsys, run):
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    results = json.loads((copy / "results.json").read_text())
    results["runs"][0].update(run=run, seed=9 if run.endswith("9") else 0)
    (copy / "results.json").write_text(json.dumps(results))
    before = snapshot(finished)
    assert main(["report", str(copy), "--device", "cpu"]) == 2
    assert "results.json was edited after imgcls wrote it" in capsys.readouterr().err
    rundir.write_sealed_json(copy / "results.json", results)  # past the seal: the check behind it
    assert main(["report", str(copy), "--device", "cpu"]) == 2
    assert "not a run inside" in capsys.readouterr().err
    assert snapshot(finished) == before


def test_a_comparison_report_shows_only_what_compare_wrote_and_each_runs_own_report(tmp_path, finished, capsys):
    """results.md edited to 97.00 reached report.html's table; a report.html taken from another run into a run's
    report/ folder was linked as that run's."""
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    table = (copy / "results.md").read_text()
    params = table.splitlines()[2].strip("|").split("|")[2].strip()  # the params column: 0.29M
    (copy / "results.md").write_text(table.replace(f"| {params} |", "| 97.00M |", 1))
    run_report = copy / "a" / "seed-0" / "report"
    run_report.mkdir(parents=True, exist_ok=True)
    (run_report / "report.html").write_text("<h1>another run</h1>")
    assert main(["report", str(copy), "--device", "cpu"]) == 0
    assert "97.00M" in (copy / "results.md").read_text() and "97.00M" not in (copy / "report.html").read_text()
    assert "another run" not in (run_report / "report.html").read_text()  # made again for this run's best.pt


def test_report_on_a_damaged_results_file_is_one_line(tmp_path, finished, capsys):
    (finished / "results.json").write_text('{"runs": [')
    assert main(["report", str(finished), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "results.json" in err and err.count("\n") == 1


def test_a_file_where_a_variant_folder_goes_is_refused(tmp_path, tiny_folder, no_fit):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").write_text("not a folder")
    exp = read_experiment(experiment(tmp_path, tiny_folder, {"a": {}}))
    with pytest.raises(UserError, match="is a file") as e:
        run_experiment(exp, tmp_path / "out")
    one_line(e)


def test_an_interrupted_run_resumes_only_with_its_own_options(tmp_path, tiny_folder, monkeypatch, capsys):
    real_fit = compare.fit
    out = tmp_path / "out"
    argv = ["compare", str(experiment(tmp_path, tiny_folder, {"a": {"lr": 0.001}})), "--out", str(out), "--quiet"]
    monkeypatch.setattr(compare, "fit", lambda cfg=None, resume=None: real_fit(cfg, resume, stop_after_steps=1))
    assert main(argv) not in (0, 2)  # stopped as Ctrl-C would stop it
    monkeypatch.setattr(compare, "fit", real_fit)
    run = out / "a" / "seed-0"
    assert (run / "last.pt").is_file() and not (run / "summary.json").exists()
    last = (run / "last.pt").read_bytes()

    changed = ["compare", str(experiment(tmp_path, tiny_folder, {"a": {"lr": 0.002}})), "--out", str(out), "--quiet"]
    capsys.readouterr()
    assert main(changed) == 2
    assert "lr 0.001 -> 0.002" in capsys.readouterr().err
    assert (run / "last.pt").read_bytes() == last  # not resumed under the new options

    argv[1] = str(experiment(tmp_path, tiny_folder, {"a": {"lr": 0.001}}))
    assert main(argv) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1


@pytest.mark.parametrize("text", ["1_0", "\u0663", "\uff12", "0x1", "1.0"])
def test_seeds_on_the_command_line_are_ascii_decimal_as_every_integer_flag(text):
    from imgcls.training.compare import parse_seeds

    with pytest.raises(UserError, match="--seeds takes comma-separated integers"):
        parse_seeds(f"0,{text}")
    assert parse_seeds("0, 1,2") == [0, 1, 2]


def test_a_report_killed_between_its_analysis_and_its_page_is_not_taken_as_current(tmp_path, tiny_folder):
    from imgcls.evaluation.analysis import analyze_run, report_is_current
    from imgcls.reporting.html import write_run_report
    from imgcls.training.train import fit
    from tests.conftest import tiny_config

    run = fit(tiny_config(tiny_folder, tmp_path / "run", epochs=1))
    analyze_run(run, "none", gallery=2)
    write_run_report(run)
    assert report_is_current(run, "none")
    analyze_run(run, "flip", gallery=2)  # the next report's analysis landed; it was killed before its page
    assert not report_is_current(run, "flip") and not report_is_current(run, "none")
    write_run_report(run)
    assert report_is_current(run, "flip")
