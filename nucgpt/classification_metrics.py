"""Test-split metrics for classification, computed exactly in numpy from one confusion matrix.

Everything derives from the confusion matrix so that the numbers in results.json are consistent
with each other and can be recomputed by hand from the matrix stored beside them.
"""

import numpy as np


def confusion_matrix(labels_N: np.ndarray, predictions_N: np.ndarray, num_classes: int) -> np.ndarray:
    """counts_CxC[true, predicted]."""
    labels_N = np.asarray(labels_N, dtype=np.int64)
    predictions_N = np.asarray(predictions_N, dtype=np.int64)
    if labels_N.shape != predictions_N.shape:
        raise ValueError(f"labels {labels_N.shape} and predictions {predictions_N.shape} differ in shape")
    for name, values in (("labels", labels_N), ("predictions", predictions_N)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}); got {values.min()}..{values.max()}")
    counts_CxC = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts_CxC, (labels_N, predictions_N), 1)
    return counts_CxC


def accuracy(counts_CxC: np.ndarray) -> float:
    total = counts_CxC.sum()
    return float(np.trace(counts_CxC) / total) if total else 0.0


def matthews_corrcoef(counts_CxC: np.ndarray) -> float:
    """Multi-class MCC (Gorodkin's R_K); equals the usual binary MCC for two classes, 0 when undefined."""
    counts_CxC = counts_CxC.astype(np.float64)
    total = counts_CxC.sum()
    correct = np.trace(counts_CxC)
    true_per_class_C = counts_CxC.sum(axis=1)
    predicted_per_class_C = counts_CxC.sum(axis=0)
    numerator = correct * total - predicted_per_class_C @ true_per_class_C
    denominator = np.sqrt(total**2 - predicted_per_class_C @ predicted_per_class_C) * np.sqrt(
        total**2 - true_per_class_C @ true_per_class_C
    )
    return float(numerator / denominator) if denominator > 0 else 0.0


def per_class_f1(counts_CxC: np.ndarray) -> np.ndarray:
    """F1 of each class; 0 for a class that is neither present nor predicted (scikit-learn's default)."""
    counts_CxC = counts_CxC.astype(np.float64)
    true_positive_C = np.diag(counts_CxC)
    denominator_C = counts_CxC.sum(axis=0) + counts_CxC.sum(axis=1)
    return np.divide(2 * true_positive_C, denominator_C, out=np.zeros_like(true_positive_C), where=denominator_C > 0)


def f1_macro(counts_CxC: np.ndarray) -> float:
    return float(per_class_f1(counts_CxC).mean())


def f1_weighted(counts_CxC: np.ndarray) -> float:
    """Per-class F1 weighted by each class's number of true examples."""
    support_C = counts_CxC.sum(axis=1).astype(np.float64)
    total = support_C.sum()
    return float(per_class_f1(counts_CxC) @ support_C / total) if total else 0.0


def classification_report(labels_N: np.ndarray, predictions_N: np.ndarray, num_classes: int) -> dict:
    """The metrics results.json and TensorBoard record, as plain JSON-serialisable values."""
    counts_CxC = confusion_matrix(labels_N, predictions_N, num_classes)
    return {
        "accuracy": accuracy(counts_CxC),
        "mcc": matthews_corrcoef(counts_CxC),
        "f1_macro": f1_macro(counts_CxC),
        "f1_weighted": f1_weighted(counts_CxC),
        "confusion_matrix": counts_CxC.tolist(),
        "num_test": int(counts_CxC.sum()),
    }
