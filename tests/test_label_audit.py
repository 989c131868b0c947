"""audit --labels (out-of-fold probabilities, cleanlab's ranking) and train --exclude."""

import csv
import os

import numpy as np
import pytest

from imgcls.cli import main
from imgcls.data import load_dataset
from imgcls.data.exclusions import read_exclusions
from imgcls.errors import UserError
from imgcls.evaluation.label_issues import label_issues, precision_recall
from imgcls.training.out_of_fold import fold_of, label_audit
from tests.conftest import shared_path, tiny_config

pytest.importorskip("cleanlab")


def plant_flips(source, out, per_class: int, fraction: float, seed: int = 0) -> set[str]:
    """A train/ folder of `per_class` images of each class of `source`/train, linked (not copied), with
    `fraction` of them filed under the other class; returns the names of the flipped ones."""
    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in (source / "train").iterdir())
    files = [(c, f) for c in classes for f in sorted((source / "train" / c).iterdir())[:per_class]]
    flipped = set(rng.choice(len(files), size=round(fraction * len(files)), replace=False).tolist())
    names = set()
    for i, (cls, f) in enumerate(files):
        filed = classes[(classes.index(cls) + 1) % len(classes)] if i in flipped else cls
        (out / "train" / filed).mkdir(parents=True, exist_ok=True)
        os.symlink(f, out / "train" / filed / f.name)
        if i in flipped:
            names.add(f"train/{filed}/{f.name}")
    return names


def test_planted_flips_are_found_among_real_photos(tmp_path):
    """5% of 400 Cats-vs-Dogs photos filed under the wrong class: the default recipe (pretrained features, a
    linear head per fold) must flag most of them and little else. Flagging at random would score ~5%
    precision; flagging everything 5%; flagging nothing 0 recall."""
    planted = plant_flips(shared_path("cats-vs-dogs"), tmp_path / "flipped", per_class=200, fraction=0.05)
    section, pictures = label_audit(str(tmp_path / "flipped"), progress=False)
    flagged = {issue["path"] for issue in section["issues"]}
    precision, recall = precision_recall(flagged, planted)
    assert precision >= 0.6 and recall >= 0.7, (precision, recall, len(flagged))
    assert len(pictures) == len(section["issues"]) and pictures[0].shape == (96, 96, 3)
    qualities = [issue["label_quality"] for issue in section["issues"]]
    assert qualities == sorted(qualities)  # most certainly wrong first
    assert all(issue["given"] != issue["suggested"] for issue in section["issues"] if issue["path"] in planted)


def test_ranking_of_probabilities_flags_the_contradicted_labels():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 100)
    probs = np.full((300, 3), 0.05)
    probs[np.arange(300), labels] = 0.9
    wrong = rng.choice(300, size=12, replace=False)
    for i in wrong:  # the model is sure of another class
        probs[i] = 0.05
        probs[i, (labels[i] + 1) % 3] = 0.9
    probs += rng.uniform(0, 0.01, probs.shape)
    names = [f"train/{i}" for i in range(300)]
    issues = label_issues(labels, probs, ["a", "b", "c"], names)
    assert {i["path"] for i in issues} == {names[i] for i in wrong}
    with pytest.raises(ValueError):
        label_issues(labels, np.full((300, 3), np.nan), ["a", "b", "c"], names)


def test_folds_are_stratified_and_too_few_images_are_refused():
    labels = np.repeat([0, 1], [50, 10])
    folds = fold_of(labels, 5, seed=1)
    for k in range(5):
        assert np.bincount(labels[folds == k]).tolist() == [10, 2]
    assert not np.array_equal(folds, fold_of(labels, 5, seed=2))
    with pytest.raises(UserError, match="fewer than --folds 20"):
        fold_of(labels, 20, seed=0)
    with pytest.raises(UserError, match="--folds must be from 2"):
        fold_of(labels, 1, seed=0)


def test_audit_labels_writes_a_list_that_train_excludes(tiny_folder, tmp_path, capsys):
    """The scratch recipe (fit per fold) end to end through the CLI, then train --exclude of its CSV."""
    out = tmp_path / "audit.json"
    assert main(["audit", str(tiny_folder), "--labels", "--folds", "2", "--label-model", "fastnet_cifar_small",
                 "--label-epochs", "1", "--img-size", "32", "--html", "--out", str(out), "--quiet"]) == 0
    table = tmp_path / "audit-label-issues.csv"
    rows = list(csv.DictReader(table.open()))
    assert list(rows[0]) == ["path", "split", "given", "suggested", "label_quality", "p_given", "p_suggested"]
    assert "Probable label errors" in (tmp_path / "audit.html").read_text()
    train_rows = [r for r in rows if r["split"] == "train"]
    assert train_rows, "an untrained 1-epoch model disagrees with many labels"
    full = load_dataset(str(tiny_folder), img_size=32, val_fraction=0.1)
    cut = load_dataset(str(tiny_folder), img_size=32, val_fraction=0.1, exclude=read_exclusions(table))
    assert len(cut.train) + len(cut.val) == len(full.train) + len(full.val) - len(train_rows)
    assert len(cut.test) == len(full.test)  # test images stay, whatever the list says
    assert cut.fingerprint["excluded"] == len(train_rows) and "excluded" not in full.fingerprint
    from imgcls.inference.run import load_run
    from imgcls.training.train import fit

    run = fit(tiny_config(tiny_folder, tmp_path / "run", epochs=1, exclude=str(table)))
    assert "exclude" in (run / "config.yaml").read_text()
    assert len(load_run(run).split("val")) == len(cut.val)  # the run's own data, as it trained on it
    table.write_text("path\n" + train_rows[0]["path"] + "\n")  # a new audit over the list the run read
    assert len(load_run(run).split("val")) == len(cut.val)  # the run keeps its own copy of the names
    table.unlink()
    assert len(load_run(run).split("val")) == len(cut.val)
    (run / "excluded.json").write_text('{"names": []}')
    with pytest.raises(UserError, match="excluded.json was edited"):
        load_run(run).split("val")


def test_exclusion_lists_are_checked_row_by_row(tmp_path):
    bad = tmp_path / "bad.csv"
    for text, message in (("path,split\ntrain/1,train\n../etc/passwd,x\n", "row 3"),
                          ("split,path\ntrain,train/1\nval\n", "row 3 has 1 field"),
                          ("", "lists no images"),
                          ("# nothing\n\n", "lists no images"),
                          ("train/1\nfoo/2\n", "row 2: foo/2 does not start with train/")):
        bad.write_text(text)
        with pytest.raises(UserError, match=message):
            read_exclusions(bad)
    bad.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UserError, match="not UTF-8"):
        read_exclusions(bad)
    with pytest.raises(UserError, match="is not a file"):
        read_exclusions(tmp_path)
    with pytest.raises(UserError, match="no image of cifar10-mini"):
        load_dataset("cifar10-mini", exclude=["train/5000"])
    with pytest.raises(UserError, match="no image of cifar10-mini"):
        load_dataset("cifar10-mini", exclude=["val/3"])  # cifar10-mini has no val on disk: train indices name it


def test_excluding_cifar_images_drops_them_before_val_is_carved(mini, capsys):
    cut = load_dataset("cifar10-mini", exclude=["train/0", "train/1", "test/7"])
    assert len(cut.train) + len(cut.val) == len(mini.train) + len(mini.val) - 2
    assert len(cut.test) == len(mini.test)
    assert "test/7" in capsys.readouterr().err
    everything = [f"train/{i}" for i in range(5000) if mini_label(i) == 0]
    with pytest.raises(UserError, match="no training image"):
        load_dataset("cifar10-mini", exclude=everything)


def mini_label(i: int) -> int:
    import json
    from importlib import resources

    return json.loads((resources.files("imgcls.data") / "cifar10_mini" / "labels.json").read_text())["train"][i]


def test_audit_options_are_checked_before_any_work_in_their_own_names(tiny_folder, tmp_path, capsys):
    out = str(tmp_path / "a.json")
    for argv, message in ((["--folds", "3"], "--folds is an option of --labels"),
                          (["--labels", "--label-epochs", "0"], "--label-epochs must be from 1"),
                          (["--labels", "--label-epochs", "1000000000"], "--label-epochs must be from 1"),
                          (["--labels", "--seed", "-1"], "--seed must be from 0"),
                          (["--labels", "--seed", "99999999999"], "--seed must be from 0"),
                          (["--labels", "--folds", "0"], "--folds must be from 2")):
        assert main(["audit", str(tiny_folder), *argv, "--out", out, "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "\n" not in err, (argv, err)
    (tmp_path / "b-label-issues.csv").mkdir()  # the CSV's place is taken: refused before the folds train
    assert main(["audit", str(tiny_folder), "--labels", "--out", str(tmp_path / "b.json"), "--quiet"]) == 2
    assert "(--out" in capsys.readouterr().err and not (tmp_path / "b.json").exists()
    assert main(["audit", str(tiny_folder), "--out", str(tiny_folder / "train" / "audit.json"), "--quiet"]) == 2
    assert "lies inside" in capsys.readouterr().err


def test_a_label_recipe_is_used_as_given_or_refused(tiny_folder, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: fastnet_cifar_small\nepochs: 1\nbatch-size: 32\nprecision: fp32\nlabel-smoothing: 0.3\n")
    with pytest.raises(UserError, match="sets label_smoothing, which audit --labels decides"):
        label_audit(str(tiny_folder), folds=2, recipe_file=str(recipe), img_size=32, progress=False)
    recipe.write_text("model: resnet18_cifar\nepochs: 1\nbatch-size: 32\nprecision: fp32\n")
    section, _ = label_audit(str(tiny_folder), folds=2, recipe_file=str(recipe), img_size=32, progress=False)
    assert (section["model"], section["epochs"]) == ("resnet18_cifar", 1)  # the recipe's epochs, not the default
    section, _ = label_audit(str(tiny_folder), folds=2, model="resnet18_cifar", epochs=1, img_size=32,
                             progress=False)  # another model than fastnet trains without fastnet's stem
    assert section["model"] == "resnet18_cifar"


def test_a_list_of_other_data_is_refused_by_its_given_labels(tmp_path, tiny_folder):
    table = tmp_path / "other.csv"
    table.write_text("path,split,given\ntrain/0,train,cat\n")  # cifar10-mini's train/0 is no cat
    from imgcls.data.datasets import load_dataset as load

    label = load("cifar10-mini", val_fraction=0.0).classes[mini_label(0)]
    assert label != "cat"
    with pytest.raises(UserError, match="as cat, but it is"):
        load("cifar10-mini", exclude=read_exclusions(table))
    table.write_text(f"path,split,given\ntrain/0,train,{label}\n")
    assert len(load("cifar10-mini", exclude=read_exclusions(table), val_fraction=0.0).train) == 4999
    everything = [f"val/{p.parent.name}/{p.name}" for p in (tiny_folder / "test").rglob("*.*")]
    with pytest.raises(UserError):
        load(str(tiny_folder), exclude=everything)  # no val/ there: the names are of no image


def test_compare_keys_an_exclusion_list_by_its_content(tmp_path):
    from imgcls.training.compare import EXCLUDE_DIGEST, _keyed

    listed = tmp_path / "x.txt"
    listed.write_text("train/1\n")
    first = _keyed({"exclude": str(listed), "model": "fastnet_cifar_small"})
    listed.write_text("train/2\n")
    assert _keyed({"exclude": str(listed), "model": "fastnet_cifar_small"})[EXCLUDE_DIGEST] != first[EXCLUDE_DIGEST]


def test_excluding_every_val_image_says_so(tiny_folder, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_folder / "train", data / "train")
    shutil.copytree(tiny_folder / "test", data / "val")
    every = [f"val/{p.parent.name}/{p.name}" for p in sorted((data / "val").rglob("*.*"))]
    with pytest.raises(UserError, match="lists every image of .*val; exclude fewer, or remove the val/ folder"):
        load_dataset(str(data), img_size=32, exclude=every)


def test_one_image_named_two_ways_is_excluded_and_counted_once(tiny_folder, tmp_path):
    name = sorted((tiny_folder / "train").rglob("*.*"))[0].relative_to(tiny_folder).as_posix()
    listed = tmp_path / "ex.txt"
    listed.write_text(f"{name}\n{name.replace('/', chr(92))}\n")
    assert read_exclusions(listed) == [name]
    whole = load_dataset(str(tiny_folder), img_size=32)
    kept = load_dataset(str(tiny_folder), img_size=32, exclude=read_exclusions(listed))
    assert len(kept.train) + len(kept.val) == len(whole.train) + len(whole.val) - 1
    assert kept.fingerprint["excluded"] == 1


# ---------------------------------------------------------------- multi-label manifests

def photo_mosaics(source, out, n: int, fraction: float, seed: int = 0) -> dict[str, str]:
    """A manifest of `n` 224 px canvases, each with 1 or 2 Cats-vs-Dogs photos in random cells of a 2 x 2 grid (the
    rest gray), labelled by the classes present; `fraction` of the rows then get one label wrong (a present one
    dropped, or the absent one added). Returns the name of each changed row and the label changed."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    photos = {c: sorted((source / "train" / c).iterdir()) for c in ("cat", "dog")}
    out.mkdir(parents=True)
    rows = []
    for i in range(n):
        canvas, labels = Image.new("RGB", (224, 224), (128, 128, 128)), set()
        for cell in rng.choice(4, size=rng.integers(1, 3), replace=False):
            c = ("cat", "dog")[rng.integers(2)]
            labels.add(c)
            with Image.open(photos[c][rng.integers(len(photos[c]))]) as photo:
                canvas.paste(photo.convert("RGB").resize((112, 112)), ((cell % 2) * 112, (cell // 2) * 112))
        canvas.save(out / f"{i:04d}.jpg", quality=90)
        rows.append([f"{i:04d}.jpg", labels])
    changed = {}
    for i in rng.choice(n, size=round(fraction * n), replace=False):
        labels = rows[i][1]
        label = sorted(labels)[rng.integers(len(labels))] if len(labels) == 2 else ({"cat", "dog"} - labels).pop()
        labels ^= {label}
        changed[f"train/{rows[i][0]}"] = label
    (out / "manifest.csv").write_text("path,labels\n" + "".join(f"{p},{';'.join(sorted(ls))}\n" for p, ls in rows))
    return changed


def test_planted_label_errors_are_found_in_a_multilabel_manifest_of_real_photos(tmp_path, capsys):
    """5% of 400 two-label photo canvases with one label wrong: the default recipe (pretrained features, a binary
    linear head per label and fold) and cleanlab's multi-label confident learning. Flagging at random would score
    ~5% precision and, flagging as many, ~10% recall."""
    planted = photo_mosaics(shared_path("cats-vs-dogs"), tmp_path / "canvases", 400, 0.05)
    manifest = tmp_path / "canvases" / "manifest.csv"
    section, pictures = label_audit(str(manifest), progress=False)
    flagged = {issue["path"]: issue for issue in section["issues"]}
    precision, recall = precision_recall(set(flagged), set(planted))
    assert section["out_of_fold_map"] > 0.9 and "multilabel" in section["method"]
    assert precision >= 0.25 and recall >= 0.6, (precision, recall, len(flagged))
    found = [name for name in planted if name in flagged]
    assert sum(planted[name] in flagged[name]["doubtful"].split(";") for name in found) >= 0.8 * len(found)
    assert len(pictures) == len(flagged) and sum(section["by_doubtful_label"].values()) >= len(flagged)
    # the CLI writes the suspects as a list that train --exclude reads for the manifest: those rows leave train
    out = tmp_path / "audit.json"
    assert main(["audit", str(manifest), "--labels", "--out", str(out), "--quiet"]) == 0
    suspects = tmp_path / "audit-label-issues.csv"
    header = suspects.read_text().splitlines()[0]
    assert header == "path,split,given,suggested,doubtful,label_quality"
    whole = load_dataset(str(manifest), img_size=32, val_fraction=0.0)
    listed = read_exclusions(suspects)  # a second audit: its precision is measured again, so its list may differ
    kept = load_dataset(str(manifest), img_size=32, val_fraction=0.0, exclude=listed)
    assert len(kept.train) == len(whole.train) - len(listed) and abs(len(listed) - len(flagged)) <= 0.2 * len(flagged)
    assert kept.fingerprint["excluded"] == len(listed) and kept.fingerprint["task"] == "multilabel"


def test_multilabel_label_issues_flag_the_contradicted_labels():
    from imgcls.evaluation.label_issues import multilabel_label_issues

    rng = np.random.default_rng(0)
    targets = (rng.random((300, 3)) < 0.4).astype(np.int64)
    probs = np.where(targets == 1, 0.9, 0.08) + rng.uniform(0, 0.02, targets.shape)
    wrong = rng.choice(300, size=12, replace=False)
    column = rng.integers(0, 3, size=12)
    for i, k in zip(wrong, column, strict=True):  # the model is sure the label is the other way round
        probs[i, k] = 0.95 if targets[i, k] == 0 else 0.03
    names = [f"train/{i}.png" for i in range(300)]
    issues = multilabel_label_issues(targets, probs, ["a", "b", "c"], names)
    assert {i["path"] for i in issues} == {names[i] for i in wrong}
    for issue in issues:
        i = names.index(issue["path"])
        assert issue["doubtful"] == "abc"[column[list(wrong).index(i)]]
        assert issue["suggested"] == ";".join(c for c, p in zip("abc", probs[i], strict=True) if p >= 0.5)
    with pytest.raises(ValueError):
        multilabel_label_issues(targets, probs * 2, ["a", "b", "c"], names)


def test_multilabel_folds_are_seeded_and_a_rare_label_is_refused():
    rng = np.random.default_rng(0)
    targets = (rng.random((100, 3)) < 0.5).astype(np.int64)
    folds = fold_of(targets, 5, seed=3)
    assert sorted(np.bincount(folds).tolist()) == [20] * 5 and np.array_equal(folds, fold_of(targets, 5, seed=3))
    assert not np.array_equal(folds, fold_of(targets, 5, seed=4))
    targets[:, 2] = 0
    targets[:3, 2] = 1
    with pytest.raises(UserError, match="only 3 image"):
        fold_of(targets, 5, seed=0)


def test_excluding_manifest_rows_checks_names_and_given_labels(tmp_path):
    from PIL import Image

    for i in range(6):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "m.csv").write_text("path,labels,split\n" + "".join(
        f"{i}.png,{'a;b' if i % 2 else 'a'},{'test' if i == 5 else 'train'}\n" for i in range(6)))
    data = str(tmp_path / "m.csv")
    kept = load_dataset(data, img_size=8, val_fraction=0.0, exclude=["train/1.png", "train/2.png"])
    assert len(kept.train) == 3 and kept.fingerprint["excluded"] == 2
    assert len(kept.test) == 1  # a listed test row would stay: test scores stay comparable
    with pytest.raises(UserError, match="no image of"):
        load_dataset(data, img_size=8, val_fraction=0.0, exclude=["train/9.png"])
    listed = tmp_path / "suspects.csv"
    listed.write_text("path,given\ntrain/1.png,a\n")  # row 1 holds a;b: a list of other labels
    with pytest.raises(UserError, match="lists train/1.png as a, but it is a;b"):
        load_dataset(data, img_size=8, val_fraction=0.0, exclude=read_exclusions(listed))
    with pytest.raises(UserError, match="every training row"):
        load_dataset(data, img_size=8, val_fraction=0.0, exclude=[f"train/{i}.png" for i in range(5)])
