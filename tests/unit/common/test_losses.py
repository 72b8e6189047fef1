"""Unit tests of common/losses.py: the distillation loss against golden values computed with numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from common.losses import distillation_loss


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference_loss(
    z: np.ndarray, q: np.ndarray, temperature: float,
    labels: np.ndarray | None = None, labelled: np.ndarray | None = None, ce_weight: float = 0.0,
) -> float:
    """(1 - a) T^2 (1/B) sum_i KL(q_i || softmax(z_i / T)) + a mean_{i in S} CE(softmax(z_i), y_i)."""
    p = softmax(z / temperature)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * (np.log(q) - np.log(p)), 0.0)  # 0 log 0 = 0
    kl = terms.sum() / z.shape[0] * temperature**2
    if ce_weight == 0.0 or labels is None or labelled is None or not labelled.any():
        return (1.0 - ce_weight) * kl
    log_p = np.log(softmax(z))
    ce = -log_p[labelled, labels[labelled]].mean()
    return (1.0 - ce_weight) * kl + ce_weight * ce


def t(array) -> torch.Tensor:
    return torch.tensor(np.asarray(array), dtype=torch.float64)


@pytest.mark.parametrize(
    ("logits", "target", "temperature", "expected"),
    [
        # uniform student, one-hot target: KL = log 2, times T^2 = 4
        ([[0.0, 0.0]], [[1.0, 0.0]], 2.0, 4 * math.log(2)),
        # student (3/4, 1/4), target (1/2, 1/2): KL = 1/2 log(2/3) + 1/2 log 2 = 1/2 log(4/3)
        ([[math.log(3), 0.0]], [[0.5, 0.5]], 1.0, 0.5 * math.log(4 / 3)),
        # batchmean: a second, matching row halves the loss
        ([[math.log(3), 0.0], [0.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]], 1.0, 0.25 * math.log(4 / 3)),
    ],
)
def test_loss_matches_hand_computed_golden_values(logits, target, temperature, expected) -> None:
    # Execute
    loss = distillation_loss(t(logits), t(target), temperature)

    # Assert
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.5, 4.0])
def test_loss_matches_numpy_reference(temperature: float) -> None:
    # Prepare
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(4, 5))
    q = rng.dirichlet(np.ones(5), size=4)
    q[0] = [0.0, 0.0, 1.0, 0.0, 0.0]  # zeros in the target contribute 0 log 0 = 0

    # Execute
    loss = distillation_loss(t(z), t(q), temperature)

    # Assert
    assert loss.item() == pytest.approx(reference_loss(z, q, temperature), rel=1e-10)


def test_float32_inputs_give_a_float32_loss_close_to_reference() -> None:
    # Prepare: the dtype training uses
    rng = np.random.default_rng(7)
    z, q = rng.normal(scale=3.0, size=(8, 10)), rng.dirichlet(np.ones(10), size=8)

    # Execute
    loss = distillation_loss(torch.tensor(z, dtype=torch.float32), torch.tensor(q, dtype=torch.float32), 3.0)

    # Assert
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference_loss(z, q, 3.0), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 3.0, 8.0])
def test_soft_term_is_scaled_by_temperature_squared(temperature: float) -> None:
    # Prepare: a uniform student is uniform at every temperature, so only the T^2 factor changes
    z = torch.zeros(3, 4, dtype=torch.float64)
    q = t(np.random.default_rng(1).dirichlet(np.ones(4), size=3))
    at_one = distillation_loss(z, q, 1.0)

    # Execute
    at_t = distillation_loss(z, q, temperature)

    # Assert
    assert at_t.item() == pytest.approx(temperature**2 * at_one.item(), rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_loss_is_zero_when_student_matches_target(temperature: float) -> None:
    # Prepare
    z = np.random.default_rng(2).normal(size=(6, 10))
    q = softmax(z / temperature)

    # Execute
    loss = distillation_loss(t(z), t(q), temperature)

    # Assert
    assert abs(loss.item()) < 1e-12


def test_gradient_flows_to_the_student_logits() -> None:
    # Prepare: d/dz [T^2 KL(q || softmax(z/T)) / B] = T (softmax(z/T) - q) / B
    rng = np.random.default_rng(3)
    z, q, temperature = rng.normal(size=(4, 6)), rng.dirichlet(np.ones(6), size=4), 3.0
    logits = t(z).requires_grad_(True)

    # Execute
    distillation_loss(logits, t(q), temperature).backward()

    # Assert
    expected = temperature * (softmax(z / temperature) - q) / z.shape[0]
    assert logits.grad is not None
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_cross_entropy_is_mixed_in_on_labelled_rows_only() -> None:
    # Prepare
    rng = np.random.default_rng(4)
    z, q = rng.normal(size=(4, 3)), rng.dirichlet(np.ones(3), size=4)
    labels = np.array([2, 0, 1, 1])
    labelled = np.array([True, False, True, False])

    # Execute
    loss = distillation_loss(
        t(z), t(q), 2.0, labels=torch.tensor(labels), labelled=torch.tensor(labelled), ce_weight=0.25
    )

    # Assert
    assert loss.item() == pytest.approx(reference_loss(z, q, 2.0, labels, labelled, 0.25), rel=1e-10)


def test_cross_entropy_golden_value() -> None:
    # Prepare: student (3/4, 1/4), label 0: CE = log(4/3); KL to (1/2, 1/2) = 1/2 log(4/3)
    z, q = t([[math.log(3), 0.0]]), t([[0.5, 0.5]])

    # Execute
    loss = distillation_loss(
        z, q, 1.0, labels=torch.tensor([0]), labelled=torch.tensor([True]), ce_weight=0.5
    )

    # Assert
    assert loss.item() == pytest.approx(0.5 * 0.5 * math.log(4 / 3) + 0.5 * math.log(4 / 3), rel=1e-12)


@pytest.mark.parametrize(
    "labelled", [None, torch.tensor([False, False, False])], ids=["no-mask", "no-labelled-row"]
)
def test_without_labelled_rows_only_the_weighted_soft_term_remains(labelled) -> None:
    # Prepare
    rng = np.random.default_rng(5)
    z, q = rng.normal(size=(3, 4)), rng.dirichlet(np.ones(4), size=3)

    # Execute
    loss = distillation_loss(t(z), t(q), 2.0, labels=torch.tensor([0, 1, 2]), labelled=labelled, ce_weight=0.4)

    # Assert
    assert loss.item() == pytest.approx(0.6 * reference_loss(z, q, 2.0), rel=1e-10)


def test_zero_ce_weight_ignores_labels() -> None:
    # Prepare
    rng = np.random.default_rng(6)
    z, q = rng.normal(size=(3, 4)), rng.dirichlet(np.ones(4), size=3)

    # Execute
    loss = distillation_loss(
        t(z), t(q), 2.0, labels=torch.tensor([0, 1, 2]), labelled=torch.tensor([True, True, True]), ce_weight=0.0
    )

    # Assert
    assert loss.item() == pytest.approx(reference_loss(z, q, 2.0), rel=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    z=hnp.arrays(np.float64, (3, 4), elements=st.floats(-20, 20)),
    weights=hnp.arrays(np.float64, (3, 4), elements=st.floats(0, 1)),
    temperature=st.floats(0.5, 10.0),
)
def test_loss_is_non_negative_and_matches_reference(z, weights, temperature) -> None:
    # Prepare: rows on the simplex (an all-zero row becomes one-hot)
    weights[weights.sum(axis=1) == 0, 0] = 1.0
    q = weights / weights.sum(axis=1, keepdims=True)

    # Execute
    loss = distillation_loss(t(z), t(q), temperature).item()

    # Assert
    assert loss >= -1e-9
    assert loss == pytest.approx(reference_loss(z, q, temperature), rel=1e-7, abs=1e-9)
