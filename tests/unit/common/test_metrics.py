"""Unit tests of the imbalance-aware metrics (common/metrics.py) against hand-computed values and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from common.metrics import classification_metrics, macro_f1


def test_majority_guess_scores_high_accuracy_but_low_balanced_metrics() -> None:
    # Prepare: 9 negatives, 1 positive; the model always says "negative", slightly less sure on the positive
    labels = np.array([0] * 9 + [1])
    probs = np.array([[0.9, 0.1]] * 9 + [[0.6, 0.4]])

    # Execute
    metrics = classification_metrics(probs, labels)

    # Assert: golden values
    assert metrics["accuracy"] == pytest.approx(0.9)
    assert metrics["balanced_accuracy"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx((2 * 9 / (9 + 10) + 0.0) / 2)
    assert metrics["auroc"] == pytest.approx(1.0)  # the ranking is perfect even though the argmax is not


def test_multiclass_metrics_match_scikit_learn() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    labels = rng.choice(3, size=200, p=[0.8, 0.15, 0.05])
    probs = rng.dirichlet([1, 1, 1], size=200)
    probs[np.arange(200), labels] += 0.3
    probs /= probs.sum(axis=1, keepdims=True)

    # Execute
    metrics = classification_metrics(probs, labels)

    # Assert
    predicted = probs.argmax(axis=1)
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predicted))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro"))
    assert metrics["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr", average="macro"))


def test_undefined_metrics_are_nan() -> None:
    # Execute
    one_class = classification_metrics(np.array([[0.7, 0.3], [0.4, 0.6]]), np.array([0, 0]))
    empty = classification_metrics(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))

    # Assert
    assert math.isnan(one_class["auroc"]) and one_class["balanced_accuracy"] == 0.5
    assert all(math.isnan(v) for v in empty.values())


def test_macro_f1_matches_a_hand_computed_value() -> None:
    # class 0: TP 1, predicted 1, true 2 -> F1 2/3; class 1: TP 2, predicted 3, true 2 -> F1 4/5
    assert macro_f1(np.array([0, 1, 1, 1]), np.array([0, 0, 1, 1])) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert math.isnan(macro_f1(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))


def _macro_f1_over_all_columns(probs: np.ndarray, labels: np.ndarray) -> float:
    """The loop `classification_metrics` ran before it called `macro_f1`: every column with a nonzero
    denominator (kept to show the two give the same float, bit for bit)."""
    predicted = probs.argmax(axis=1)
    f1s = []
    for c in range(probs.shape[1]):
        tp = float(((predicted == c) & (labels == c)).sum())
        denominator = float((predicted == c).sum() + (labels == c).sum())
        if denominator:
            f1s.append(2 * tp / denominator)
    return float(np.mean(f1s))


@pytest.mark.parametrize("seed", range(6))
def test_classification_metrics_macro_f1_is_macro_f1_of_the_argmax_bit_for_bit(seed: int) -> None:
    # Prepare: imbalanced labels over 5 classes, class 4 never a label; some seeds leave classes unpredicted
    rng = np.random.default_rng(seed)
    labels = rng.choice(5, size=150, p=[0.6, 0.2, 0.1, 0.1, 0.0])
    probs = rng.dirichlet([0.3] * 5, size=150)

    # Execute
    metrics = classification_metrics(probs, labels)

    # Assert: one implementation, the same number as before and as scikit-learn
    assert metrics["macro_f1"] == macro_f1(probs.argmax(axis=1), labels) == _macro_f1_over_all_columns(probs, labels)
    present = np.union1d(labels, probs.argmax(axis=1))
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, probs.argmax(axis=1), labels=present, average="macro"))


def test_compare_adds_an_imbalance_table_only_when_runs_have_the_metrics() -> None:
    # Prepare
    from simulations.compare import markdown_table

    final = {"student_accuracy": 0.93, "teacher_accuracy_mean": 0.92, "student_balanced_accuracy": 0.5,
             "student_macro_f1": 0.4, "student_auroc": 0.75}
    row = {"round": 1, "student_accuracy": 0.93, "clients_replied": 2, "uplink_bytes": 2_000, "downlink_bytes": 0}
    local = {"epochs": 2, "accuracy_mean": 0.9, "accuracy_min": 0.8, "accuracy_max": 0.95, "balanced_accuracy_mean": 0.4,
             "macro_f1_mean": 0.35, "auroc_mean": 0.6, "per_client": {}}
    with_metrics = {"scenario": {"scenario": "covid-clinics"}, "methods": {"mean": {"rounds": [row], "final": final}},
                    "baselines": {"local_only": local}}
    old = {"scenario": None, "methods": {"mean": {"rounds": [row], "final": {"student_accuracy": 0.9}}}, "baselines": {}}

    # Execute
    table, plain = markdown_table(with_metrics), markdown_table(old)

    # Assert
    assert "| mean | 0.9300 | 0.5000 | 0.4000 | 0.7500 |" in table
    assert "| local-only (mean of institutions) | 0.9000 | 0.4000 | 0.3500 | 0.6000 |" in table
    assert "Imbalance-aware" not in plain
