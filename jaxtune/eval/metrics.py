"""Metrics of predictions against labels: classification (accuracy, macro-F1, per-class precision /
recall / F1) and regression (MSE, MAE, Pearson's r). Checked against scikit-learn in the tests."""

from __future__ import annotations

import numpy as np


def classification_report(predictions: np.ndarray, labels: np.ndarray, num_labels: int) -> dict:
    """Accuracy, macro-F1 and per-class precision / recall / F1 from predicted and true classes."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    report = {"accuracy": float(np.mean(predictions == labels)) if len(labels) else float("nan"), "examples": len(labels)}
    f1s = []
    for k in range(num_labels):
        tp = int(np.sum((predictions == k) & (labels == k)))
        fp = int(np.sum((predictions == k) & (labels != k)))
        fn = int(np.sum((predictions != k) & (labels == k)))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        report[f"class_{k}"] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
        f1s.append(f1)
    report["macro_f1"] = float(np.mean(f1s)) if f1s else float("nan")
    return report


def regression_report(predictions: np.ndarray, labels: np.ndarray) -> dict:
    predictions, labels = np.asarray(predictions, np.float64), np.asarray(labels, np.float64)
    err = predictions - labels
    corr = float(np.corrcoef(predictions, labels)[0, 1]) if len(labels) > 1 and np.std(predictions) > 0 else float("nan")
    return {"mse": float(np.mean(err ** 2)), "mae": float(np.mean(np.abs(err))), "pearson": corr, "examples": len(labels)}
