from __future__ import annotations

import importlib
import math

import pytest
import torch

from vgg import metrics

# Three classes, eight images: true classes and predictions written out so every number below can be counted.
TARGETS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
PREDICTED = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])


def test_confusion_matrix_counts_pairs_and_sums_to_the_number_of_images():
    confusion = metrics.confusion_matrix(TARGETS, PREDICTED, 3)
    assert confusion.tolist() == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert int(confusion.sum()) == len(TARGETS)


def test_per_class_scores_equal_hand_computed_values():
    scores = metrics.per_class_scores(metrics.confusion_matrix(TARGETS, PREDICTED, 3))
    # class 0: 2 of 3 predicted-0 are right, 2 of 3 true-0 found; class 1: 1/2, 1/2; class 2: 2/3, 2/3
    assert scores.precision == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert scores.recall == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert scores.f1 == pytest.approx([2 / 3, 1 / 2, 2 / 3])
    assert scores.support == [3, 2, 3]
    avg = metrics.averages(scores)
    assert avg["macro"]["f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert avg["weighted"]["recall"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2 + 3 * 2 / 3) / 8)
    assert metrics.balanced_accuracy(metrics.confusion_matrix(TARGETS, PREDICTED, 3)) == pytest.approx(
        (2 / 3 + 1 / 2 + 2 / 3) / 3
    )


def test_a_class_never_predicted_or_absent_scores_zero_without_dividing_by_zero():
    confusion = metrics.confusion_matrix(torch.tensor([0, 0, 1]), torch.tensor([0, 0, 0]), 3)
    scores = metrics.per_class_scores(confusion)
    assert scores.precision == pytest.approx([2 / 3, 0.0, 0.0])
    assert scores.recall == pytest.approx([1.0, 0.0, 0.0])
    assert scores.support == [2, 1, 0]
    # class 2 has no images: balanced accuracy averages over the two classes that do
    assert metrics.balanced_accuracy(confusion) == pytest.approx(0.5)


def test_top_k_accuracy_on_six_classes():
    scores = torch.tensor(
        [
            [0.50, 0.20, 0.10, 0.10, 0.05, 0.05],  # true 0: rank 1
            [0.30, 0.25, 0.20, 0.15, 0.06, 0.04],  # true 4: rank 5
            [0.30, 0.25, 0.20, 0.15, 0.06, 0.04],  # true 5: rank 6
            [0.10, 0.40, 0.20, 0.15, 0.10, 0.05],  # true 2: rank 2
        ]
    )
    targets = torch.tensor([0, 4, 5, 2])
    assert metrics.top_k_accuracy(scores, targets, 1) == pytest.approx(1 / 4)
    assert metrics.top_k_accuracy(scores, targets, 2) == pytest.approx(2 / 4)
    assert metrics.top_k_accuracy(scores, targets, 5) == pytest.approx(3 / 4)
    assert metrics.top_k_accuracy(scores, targets, 6) == pytest.approx(1.0)


def test_expected_calibration_error_by_hand():
    # Two images at confidence 0.9 (one right) and two at 0.6 (both right): bins hold |0.5-0.9| and |1.0-0.6|.
    probabilities = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    targets = torch.tensor([0, 1, 0, 1])
    assert metrics.expected_calibration_error(probabilities, targets) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    bins = metrics.reliability(probabilities, targets)
    assert sum(b.count for b in bins) == 4
    assert len(bins) == metrics.ECE_BINS


def test_temperature_scaling_lowers_ece_of_an_overconfident_model():
    # A model that is right 70% of the time but says so with ~99.9% confidence: logits scaled 8x too far.
    generator = torch.Generator().manual_seed(0)
    n, classes = 2000, 4
    targets = torch.randint(0, classes, (n,), generator=generator)
    logits = torch.randn(n, classes, generator=generator) * 0.5
    right = torch.rand(n, generator=generator) < 0.7
    predicted = torch.where(right, targets, (targets + 1) % classes)
    logits[torch.arange(n), predicted] += 1.5
    overconfident = logits * 8
    temperature = metrics.fit_temperature(overconfident[:1000], targets[:1000])
    assert temperature > 3  # it undoes most of the 8x
    before = metrics.expected_calibration_error(overconfident[1000:].softmax(1), targets[1000:])
    after_logp = metrics.apply_temperature(overconfident[1000:].log_softmax(1), temperature)
    after = metrics.expected_calibration_error(after_logp.exp(), targets[1000:])
    assert before > 0.2
    assert after < before / 3
    # the predicted class never changes
    assert torch.equal(after_logp.argmax(1), overconfident[1000:].argmax(1))


def test_temperature_minimises_nll():
    generator = torch.Generator().manual_seed(1)
    targets = torch.randint(0, 3, (500,), generator=generator)
    logits = torch.randn(500, 3, generator=generator) * 3
    logits[torch.arange(500), targets] += 2  # some signal, so the best T is finite
    t = metrics.fit_temperature(logits, targets)
    assert 1.0 < t < 100.0

    def nll(temp: float) -> float:
        return torch.nn.functional.cross_entropy(logits / temp, targets).item()

    assert nll(t) <= min(nll(t * 0.9), nll(t * 1.1), nll(1.0)) + 1e-9


def test_misclassified_rows_sorted_by_loss():
    log_p = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.99, 0.01]]).log()
    targets = torch.tensor([0, 0, 0, 1])
    rows = metrics.misclassified(["a", "b", "c", "d"], targets, log_p, ["cat", "dog"])
    assert [r.path for r in rows] == ["d", "b", "c"]
    assert rows[0].true == "dog" and rows[0].predicted == "cat"
    assert rows[0].probability == pytest.approx(0.99)
    assert rows[0].loss == pytest.approx(-math.log(0.01))


def test_summarize_has_top5_only_from_five_classes():
    log_p = torch.randn(10, 4).log_softmax(1)
    targets = torch.randint(0, 4, (10,))
    assert "top5_accuracy" not in metrics.summarize(log_p, targets, list("abcd"))
    log_p6 = torch.randn(12, 6).log_softmax(1)
    targets6 = torch.randint(0, 6, (12,))
    result = metrics.summarize(log_p6, targets6, list("abcdef"))
    assert result["top5_accuracy"] == pytest.approx(metrics.top_k_accuracy(log_p6, targets6, 5))
    assert sum(map(sum, result["confusion"])) == 12


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_against_scikit_learn():
    sk = importlib.import_module("sklearn.metrics")
    generator = torch.Generator().manual_seed(2)
    classes = 7
    targets = torch.randint(0, classes - 1, (300,), generator=generator)  # class 6 never occurs
    logits = torch.randn(300, classes, generator=generator)
    logits[torch.arange(300), targets] += torch.rand(300, generator=generator) * 2
    predicted = logits.argmax(1)
    y, p = targets.numpy(), predicted.numpy()
    labels = list(range(classes))
    confusion = metrics.confusion_matrix(targets, predicted, classes)
    assert confusion.tolist() == sk.confusion_matrix(y, p, labels=labels).tolist()
    scores = metrics.per_class_scores(confusion)
    precision, recall, f1, support = sk.precision_recall_fscore_support(y, p, labels=labels, zero_division=0)
    assert scores.precision == pytest.approx(precision.tolist())
    assert scores.recall == pytest.approx(recall.tolist())
    assert scores.f1 == pytest.approx(f1.tolist())
    assert scores.support == support.tolist()
    avg = metrics.averages(scores)
    for kind in ("macro", "weighted"):
        expected = sk.precision_recall_fscore_support(y, p, labels=labels, average=kind, zero_division=0)
        assert [avg[kind]["precision"], avg[kind]["recall"], avg[kind]["f1"]] == pytest.approx(list(expected[:3]))
    assert metrics.balanced_accuracy(confusion) == pytest.approx(sk.balanced_accuracy_score(y, p))
    assert metrics.top_k_accuracy(logits, targets, 5) == pytest.approx(
        sk.top_k_accuracy_score(y, logits.numpy(), k=5, labels=labels)
    )
