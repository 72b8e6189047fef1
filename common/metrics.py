"""Classification metrics that stay honest under imbalanced labels, beside plain accuracy.

    accuracy           share of samples whose top class is right
    balanced_accuracy  mean recall over the classes present in the labels (Brodersen et al., 2010)
    macro_f1           unweighted mean of the per-class F1 over the classes present in the labels or
                       the predictions (a class neither predicted nor present does not count)
    auroc              binary: area under the ROC curve of the positive class (class 1); more classes:
                       the mean one-vs-rest AUROC over the classes present in the labels (Hand & Till
                       use pairs; one-vs-rest is scikit-learn's `multi_class="ovr"`, macro average)

On a test set where 92% of the samples are one class, a model that always predicts it has accuracy
0.92 but balanced accuracy 1/C and macro-F1 near 0.3: this is why tabular tasks report all four.
"""

from __future__ import annotations

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "auroc")


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The four metrics of `probs` `(n, C)` (any scores whose argmax is the prediction and whose columns
    rank samples per class) against `labels` `(n,)`; nan where undefined (no samples, one class)."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return dict.fromkeys(METRICS, float("nan"))
    predicted = probs.argmax(axis=1)
    present = np.unique(labels)
    recalls = [float((predicted[labels == c] == c).mean()) for c in present]
    return {
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(np.mean(recalls)),
        "macro_f1": macro_f1(predicted, labels),
        "auroc": _auroc(probs, labels, present),
    }


def macro_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-class F1 = 2 TP / (2 TP + FP + FN) over every class that occurs in `labels` or `predicted`
    (both `(n,)` class indices); nan for no samples."""
    predicted, labels = np.asarray(predicted, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return float("nan")
    scores = []
    for c in np.union1d(labels, predicted):
        tp = float(((predicted == c) & (labels == c)).sum())
        scores.append(2 * tp / float((predicted == c).sum() + (labels == c).sum()))
    return float(np.mean(scores))


def _auroc(probs: np.ndarray, labels: np.ndarray, present: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(present) < 2:
        return float("nan")
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels == 1, probs[:, 1]))
    return float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))
