"""Classification metrics equal values computed by hand from fixed confusion matrices."""

import math

import numpy as np
import pytest

from nucgpt import classification_metrics as cm

# rows = true class, columns = predicted class
COUNTS_3x3 = np.array([[5, 1, 0], [2, 3, 1], [0, 1, 4]])


def _examples_from(counts_CxC: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, predictions = [], []
    for true_class, row in enumerate(counts_CxC):
        for predicted_class, count in enumerate(row):
            labels += [true_class] * int(count)
            predictions += [predicted_class] * int(count)
    order = np.random.default_rng(0).permutation(len(labels))
    return np.array(labels)[order], np.array(predictions)[order]


def test_confusion_matrix_counts_true_by_predicted():
    labels, predictions = _examples_from(COUNTS_3x3)
    np.testing.assert_array_equal(cm.confusion_matrix(labels, predictions, 3), COUNTS_3x3)


def test_three_class_metrics_match_hand_computation():
    labels, predictions = _examples_from(COUNTS_3x3)
    report = cm.classification_report(labels, predictions, 3)
    # 17 examples, 12 on the diagonal; true totals 6,6,5; predicted totals 7,5,5.
    assert report["accuracy"] == pytest.approx(12 / 17)
    assert report["mcc"] == pytest.approx((12 * 17 - (7 * 6 + 5 * 6 + 5 * 5)) / math.sqrt((289 - 99) * (289 - 97)))
    f1_per_class = [2 * 5 / (7 + 6), 2 * 3 / (5 + 6), 2 * 4 / (5 + 5)]
    assert report["f1_macro"] == pytest.approx(sum(f1_per_class) / 3)
    assert report["f1_weighted"] == pytest.approx((6 * f1_per_class[0] + 6 * f1_per_class[1] + 5 * f1_per_class[2]) / 17)
    assert report["confusion_matrix"] == COUNTS_3x3.tolist()
    assert report["num_test"] == 17


def test_binary_mcc_is_the_textbook_formula():
    tn, fp, fn, tp = 40, 10, 5, 45
    counts = np.array([[tn, fp], [fn, tp]])
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert cm.matthews_corrcoef(counts) == pytest.approx(expected)


def test_degenerate_predictions_give_zero_mcc_and_zero_f1_for_unpredicted_class():
    counts = np.array([[0, 7], [0, 3]])  # everything predicted as class 1
    assert cm.matthews_corrcoef(counts) == 0.0
    assert cm.per_class_f1(counts)[0] == 0.0
    assert cm.accuracy(counts) == pytest.approx(0.3)


def test_out_of_range_label_is_rejected():
    with pytest.raises(ValueError, match="labels"):
        cm.confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
