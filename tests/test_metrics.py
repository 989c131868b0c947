import pytest
import torch

from imgcls.evaluation.metrics import classification_metrics, confusion_matrix, topk_accuracy


def test_hand_computed_report():
    # true:  0 0 0 1 1 2     pred: 0 0 1 1 2 2
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    probs = (torch.nn.functional.one_hot(preds, 3).float() * 5).softmax(1)
    m = classification_metrics(probs, labels, ["a", "b", "c"])
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == 4 / 6  # in float64, as the other shares (float32 wrote 0.6666666865348816)
    a, b, c = m["per_class"]
    assert (a["precision"], a["recall"], a["support"]) == (1.0, pytest.approx(2 / 3), 3)
    assert (b["precision"], b["recall"]) == (0.5, 0.5)
    assert (c["precision"], c["recall"], c["f1"]) == (0.5, 1.0, pytest.approx(2 / 3))
    assert a["f1"] == pytest.approx(0.8)
    assert m["loss"] == pytest.approx(-probs[torch.arange(6), labels].log().mean().item())
    assert m["most_confused"] == [{"true": "a", "predicted": "b", "count": 1},
                                  {"true": "b", "predicted": "c", "count": 1}]


def test_class_never_predicted_has_zero_precision_not_nan():
    cm = confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 1]), 2)
    assert cm.tolist() == [[1, 0], [1, 0]]
    m = classification_metrics(torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([0, 1]), ["x", "y"])
    assert m["per_class"][1] == {"class": "y", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_topk():
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.02, 0.08]])
    assert topk_accuracy(logits, torch.tensor([2, 1]), 1) == 0.0
    assert topk_accuracy(logits, torch.tensor([2, 1]), 2) == 0.5


def test_balanced_accuracy_is_mean_recall_over_present_classes():
    # true: 0 0 0 0 1 1 (class 2 absent)   pred: 0 0 0 1 1 2
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    preds = torch.tensor([0, 0, 0, 1, 1, 2])
    probs = torch.nn.functional.one_hot(preds, 3).float()
    m = classification_metrics(probs, labels, ["a", "b", "c"])
    # recalls: a 3/4, b 1/2; c has no images and is left out, not counted as 0
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # macro-F1 over the three classes: a 2*1*0.75/1.75, b 2*0.5*0.5/1, c 0
    assert m["macro_f1"] == pytest.approx((6 / 7 + 0.5 + 0.0) / 3)
