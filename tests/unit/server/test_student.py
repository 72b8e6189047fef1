"""Unit tests of the server's student (server/distill.py): KD on a tiny digits public set, the
two-stage (head first) schedule, and the ensemble's accuracy."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import server.distill as distill
from common.config import RunConfig, default_run_config
from common.losses import distillation_loss
from common.models.inputs import images_to_tensor
from common.models.registry import head_parameters
from common.tasks.registry import load_split
from common.tasks.samples import FederatedSplit
from server.distill import Student, ensemble_accuracy, target_temperature

TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def split() -> FederatedSplit:
    return load_split("digits", "", 400, 42)


def make_cfg(**overrides: Any) -> RunConfig:
    base = {"dataset": "digits", "public-size": 400, "student-model": "cnn-student", "student-lr": 0.01,
            "student-batch-size": 32, "student-epochs": 5, "student-head-epochs": 0}
    return RunConfig.from_run_config({**default_run_config(), **base, **overrides})


def smoothed_labels(labels: np.ndarray) -> np.ndarray:
    """Soft targets that favour the true class: 0.82 on it, 0.02 on each other class (rows sum to 1)."""
    return (0.8 * np.eye(10, dtype=np.float32)[labels] + 0.02).astype(np.float32)  # (m, 10)


def kd_loss(student: Student, images: np.ndarray, ensemble: np.ndarray) -> float:
    with torch.no_grad():
        return float(distillation_loss(student.model(images_to_tensor(images)), torch.from_numpy(ensemble), TEMPERATURE))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_distil_lowers_the_kd_loss_on_the_queried_samples(split: FederatedSplit) -> None:
    # Prepare
    student = Student(make_cfg(), num_classes=10, input_shape=(8, 8))
    ids = np.arange(0, 400, 2, dtype=np.int64)  # every other public sample
    ensemble = smoothed_labels(split.public.labels[ids])
    before = kd_loss(student, split.public.images[ids], ensemble)

    # Execute
    last_epoch_loss = student.distil(split.public, ids, ensemble, round_=1, temperature=TEMPERATURE)

    # Assert
    after = kd_loss(student, split.public.images[ids], ensemble)
    assert np.isfinite(last_epoch_loss)
    assert after < 0.9 * before
    assert last_epoch_loss < before


def test_distil_is_reproducible_for_a_seed(split: FederatedSplit) -> None:
    # Prepare
    cfg = make_cfg(**{"student-epochs": 1})
    first, second = Student(cfg, 10, (8, 8)), Student(cfg, 10, (8, 8))
    ids = np.arange(100, dtype=np.int64)
    ensemble = smoothed_labels(split.public.labels[ids])

    # Execute
    loss_first = first.distil(split.public, ids, ensemble, 1, TEMPERATURE)
    loss_second = second.distil(split.public, ids, ensemble, 1, TEMPERATURE)

    # Assert
    assert loss_first == loss_second
    for name, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[name]), name


class TrainEpochsSpy:
    """Wraps `train_epochs`: records each call's optimizer parameters, epochs, and weights before/after."""

    def __init__(self, real):
        self.real = real
        self.calls: list[dict[str, Any]] = []

    def __call__(self, model, optimizer, n, batch_loss, **kwargs):
        before = snapshot(model)
        result = self.real(model, optimizer, n, batch_loss, **kwargs)
        self.calls.append({
            "params": [p for group in optimizer.param_groups for p in group["params"]],
            "epochs": kwargs["epochs"], "before": before, "after": snapshot(model), "result": result,
        })
        return result


def test_head_stage_trains_only_the_head_before_the_full_stage(split: FederatedSplit, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    spy = TrainEpochsSpy(distill.train_epochs)
    monkeypatch.setattr(distill, "train_epochs", spy)
    student = Student(make_cfg(**{"student-head-epochs": 2, "student-epochs": 1}), 10, (8, 8))
    head_ids = {id(p) for p in head_parameters(student.model)}
    head_names = {f"head.{name}" for name, _ in student.model.head.named_parameters()}
    ids = np.arange(200, dtype=np.int64)
    ensemble = smoothed_labels(split.public.labels[ids])
    initial = snapshot(student.model)

    # Execute
    loss = student.distil(split.public, ids, ensemble, round_=1, temperature=TEMPERATURE)

    # Assert: two stages, the head alone first
    assert len(spy.calls) == 2
    head_stage, full_stage = spy.calls
    assert {id(p) for p in head_stage["params"]} == head_ids
    assert len(head_stage["params"]) == len(head_ids)
    assert head_stage["epochs"] == 2
    for name, value in head_stage["after"].items():
        changed = not torch.equal(value, head_stage["before"][name])
        assert changed == (name in head_names), f"{name}: changed={changed} in the head stage"
    assert {id(p) for p in full_stage["params"]} == {id(p) for p in student.model.parameters()}
    assert full_stage["epochs"] == 1
    assert loss == full_stage["result"]
    assert all(not torch.equal(student.model.state_dict()[name], initial[name]) for name in head_names)


def test_without_head_epochs_there_is_one_full_stage(split: FederatedSplit, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    spy = TrainEpochsSpy(distill.train_epochs)
    monkeypatch.setattr(distill, "train_epochs", spy)
    student = Student(make_cfg(**{"student-head-epochs": 0, "student-epochs": 1}), 10, (8, 8))
    ids = np.arange(64, dtype=np.int64)

    # Execute
    student.distil(split.public, ids, smoothed_labels(split.public.labels[ids]), 1, TEMPERATURE)

    # Assert
    assert len(spy.calls) == 1
    assert {id(p) for p in spy.calls[0]["params"]} == {id(p) for p in student.model.parameters()}


def test_head_stage_lowers_the_kd_loss_with_the_body_frozen(split: FederatedSplit) -> None:
    # Prepare: what the head stage alone can do, measured through the real head optimizer
    student = Student(make_cfg(**{"student-head-epochs": 3}), 10, (8, 8))
    ids = np.arange(200, dtype=np.int64)
    ensemble = smoothed_labels(split.public.labels[ids])
    body_before = snapshot(student.model.features)
    before = kd_loss(student, split.public.images[ids], ensemble)
    x, targets = images_to_tensor(split.public.images[ids]), torch.from_numpy(ensemble)

    # Execute
    distill.train_epochs(
        student.model, student.head_optimizer, len(ids),
        lambda idx: distillation_loss(student.model(x[idx]), targets[idx], TEMPERATURE),
        epochs=3, batch_size=32, seed=0,
    )

    # Assert
    assert kd_loss(student, split.public.images[ids], ensemble) < before
    for name, value in student.model.features.state_dict().items():
        assert torch.equal(value, body_before[name]), name


def test_ensemble_accuracy_on_hand_made_rows() -> None:
    # Prepare
    ensemble = np.array([
        [0.7, 0.2, 0.1],  # predicts 0, label 0: right
        [0.1, 0.8, 0.1],  # predicts 1, label 1: right
        [0.3, 0.3, 0.4],  # predicts 2, label 0: wrong
        [0.5, 0.4, 0.1],  # predicts 0, label 1: wrong
        [0.4, 0.4, 0.2],  # tie: argmax takes the first, 0, label 0: right
    ], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 0])

    # Execute
    result = ensemble_accuracy(ensemble, labels)

    # Assert
    assert isinstance(result, float)
    assert result == pytest.approx(3 / 5)


@pytest.mark.parametrize(("labels", "expected"), [([0, 1], 1.0), ([1, 0], 0.0)])
def test_ensemble_accuracy_bounds(labels: list[int], expected: float) -> None:
    # Prepare
    ensemble = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)

    # Execute
    result = ensemble_accuracy(ensemble, np.array(labels))

    # Assert
    assert result == expected


def test_votes_are_matched_at_temperature_one_and_soft_labels_at_the_querys() -> None:
    # Execute / Assert
    assert target_temperature("vote", 3.0) == 1.0
    assert [target_temperature(codec, 3.0) for codec in ("float32", "float16", "uint8", "topk")] == [3.0] * 4


def test_a_student_learns_from_three_teachers_votes(split: FederatedSplit) -> None:
    # Prepare: three teachers each right on 60 % of the public samples, their votes' shares as targets
    rng = np.random.default_rng(0)
    labels = split.public.labels
    votes = np.where(rng.random((3, len(labels))) < 0.6, labels[None, :], rng.integers(0, 10, (3, len(labels))))
    shares = sum(np.eye(10, dtype=np.float32)[v] for v in votes) / 3
    student = Student(make_cfg(), num_classes=10, input_shape=(8, 8))

    # Execute
    for round_ in (1, 2):
        student.distil(split.public, np.arange(len(labels)), shares, round_, target_temperature("vote", 3.0))

    # Assert: well above chance on the public samples' true labels
    assert ensemble_accuracy(student_probs(student, split.public.images), labels) > 0.6


def student_probs(student: Student, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(student.model(images_to_tensor(images)), dim=1).numpy()
