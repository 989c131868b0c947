import json
import math

import numpy as np
import pytest

from imgcls.cli import main
from imgcls.errors import UserError
from imgcls.evaluation.significance import (
    TEST_PREDICTIONS,
    compare_to_first,
    mcnemar_exact,
    paired_bootstrap,
    read_test_predictions,
    write_test_predictions,
)
from imgcls.reporting.tables import aggregate, to_markdown


def test_mcnemar_exact_matches_a_hand_computation():
    # b=10, c=2: P(X <= 2) for X ~ Binomial(12, 1/2) is (1 + 12 + 66) / 4096; two-sided doubles it
    assert mcnemar_exact(10, 2) == pytest.approx(2 * 79 / 4096)
    assert round(mcnemar_exact(10, 2), 4) == 0.0386
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    # large counts stay finite and agree with the normal approximation's order of magnitude
    p = mcnemar_exact(5200, 4800)
    z = (5200 - 4800) / math.sqrt(10000)
    assert p == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.1)


def _correct(rng, p, seeds, n):
    return rng.random((seeds, n)) < p


def test_bootstrap_interval_covers_the_true_difference():
    rng = np.random.default_rng(0)
    n, seeds, gap = 3000, 3, 0.05
    # the variant is right on every image the first is, and on 5% more of the images (a known gap)
    first = _correct(rng, 0.7, seeds, n)
    extra = rng.random((seeds, n)) < gap / 0.3
    other = first | extra
    true = (other.mean() - first.mean())
    diff, low, high = paired_bootstrap(first, other)
    assert diff == pytest.approx(true)
    assert low < true < high and low > 0
    # no gap: the interval holds 0
    same = _correct(rng, 0.7, seeds, n)
    _, low0, high0 = paired_bootstrap(first, same)
    assert low0 < 0 < high0


def _preds(labels, correct, k=3):
    probs = np.full((len(labels), k), 0.1, dtype=np.float32)
    wrong = (labels + 1) % k
    probs[np.arange(len(labels)), np.where(correct, labels, wrong)] = 0.8
    return labels, probs


def test_compare_to_first_pairs_runs_by_seed_and_marks_significance():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 400)
    base = {s: _preds(labels, rng.random(400) < 0.6) for s in (0, 1)}
    better = {s: _preds(labels, (base[s][1].argmax(1) == labels) | (rng.random(400) < 0.5)) for s in (0, 1)}
    noise = {s: _preds(labels, rng.random(400) < 0.6) for s in (0, 1)}
    out = compare_to_first({"a": base, "b": better, "c": noise})
    assert out["a"] is None
    b = out["b"]
    assert b["seeds"] == [0, 1] and b["first_only_right"] == 0 and b["variant_only_right"] > 100
    assert b["mcnemar_p"] < 1e-6 and b["significant"] and b["ci_low"] > 0
    assert not out["c"]["significant"]
    with pytest.raises(UserError, match="other images"):
        compare_to_first({"a": base, "b": {0: (labels[::-1].copy(), better[0][1])}})


def test_predictions_round_trip_and_damage_is_one_line(tmp_path):
    labels = np.array([0, 2, 1])
    probs = np.eye(3)[[0, 1, 1]]
    write_test_predictions(tmp_path, labels, probs)
    got_labels, got_probs = read_test_predictions(tmp_path)
    assert got_labels.dtype == np.int64 and got_probs.dtype == np.float32
    assert got_labels.tolist() == [0, 2, 1] and np.array_equal(got_probs, probs.astype(np.float32))
    (tmp_path / TEST_PREDICTIONS).write_bytes(b"not a zip")
    with pytest.raises(UserError, match="delete it"):
        read_test_predictions(tmp_path)
    assert read_test_predictions(tmp_path / "nowhere") is None


def test_table_shows_delta_with_interval_and_mcnemar():
    summary = {"model": "m", "params": 1e6, "test_acc": 0.8, "test_acc_final": 0.8, "best_val_acc": 0.8,
               "final_val_acc": 0.8, "test_split": "test", "train_time_s": 1.0, "train_images_per_s": 10.0}
    vs = {"vs": "a", "acc_diff": 0.03, "ci_low": 0.01, "ci_high": 0.05, "mcnemar_p": 0.002, "significant": True}
    test = {"balanced_accuracy": 0.75, "macro_f1": 0.7}
    rows = aggregate([{"variant": "a", "summary": summary, "test": test, "vs_first": None},
                      {"variant": "b", "summary": summary, "test": test, "vs_first": vs}])
    table = to_markdown(rows)
    assert "Δ acc vs a [95% CI]" in table and "McNemar p" in table and "balanced acc %" in table
    assert "| +3.00 [+1.00, +5.00] * | 0.0020 |" in table and "| 75.00 | 70.00 |" in table  # 1 seed: no ± 0.00
    assert "do not say" in table and "1 seed per variant" in table


def test_compare_writes_predictions_and_significance_columns(tiny_folder, tmp_path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"data: {tiny_folder}\ntrain: {{model: fastnet_cifar_small, epochs: 1}}\nseeds: [0]\n"
                   "variants:\n  base: {}\n  fast: {lr: 3.0e-3}\n")
    out = tmp_path / "cmp"
    assert main(["compare", str(exp), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    base, fast = results["runs"]
    assert (out / "base" / "seed-0" / TEST_PREDICTIONS).is_file()
    labels, probs = read_test_predictions(out / "fast" / "seed-0")
    assert probs.shape == (30, 3) and labels.shape == (30,)
    # the stored predictions are the val-selected checkpoint's: they score what the summary scored
    assert fast["test"]["accuracy"] == pytest.approx(fast["summary"]["test_acc"])
    assert base["vs_first"] is None and 0 <= fast["vs_first"]["mcnemar_p"] <= 1
    assert "McNemar p" in (out / "results.md").read_text()
    assert "mcnemar_p" in (out / "results.csv").read_text().splitlines()[0]
