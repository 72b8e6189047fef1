"""Unit tests of the federation-free baselines (simulations/baselines.py) on the digits data:
local-only (each institution alone) and centralised (pooled private data)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import simulations.baselines as baselines
from common.config import RunConfig, default_run_config
from common.models.registry import build_model, count_parameters
from common.tasks.registry import load_split

PUBLIC_SIZE = 400
TEACHERS = "cnn-tiny,cnn-large"  # round-robin over 3 clients: tiny, large, tiny


def make_cfg(**overrides: Any) -> RunConfig:
    base = {"dataset": "digits", "public-size": PUBLIC_SIZE, "num-clients": 3, "min-clients": 1, "partitioner": "iid",
            "teacher-models": TEACHERS, "student-model": "cnn-student", "local-epochs": 1, "num-server-rounds": 2}
    return RunConfig.from_run_config({**default_run_config(), **base, **overrides})


@pytest.fixture(scope="module")
def private_size() -> int:
    return len(load_split("digits", "", PUBLIC_SIZE, 42).private)


@pytest.fixture(scope="module")
def local() -> dict[str, Any]:
    return baselines.local_only(make_cfg(), epochs=1)


@pytest.fixture(scope="module")
def central() -> dict[str, Any]:
    return baselines.centralised(make_cfg(), epochs=1)


# ---------------------------------------------------------------------------------------------------
# local_only
# ---------------------------------------------------------------------------------------------------


def test_local_only_reports_every_institution(local: dict[str, Any], private_size: int) -> None:
    # Assert
    assert set(local) == {"epochs", "per_client", "accuracy_mean", "accuracy_min", "accuracy_max", "wall_s",
                          "balanced_accuracy_mean", "macro_f1_mean", "auroc_mean"}
    assert local["epochs"] == 1
    assert list(local["per_client"]) == ["0", "1", "2"]
    assert [c["model"] for c in local["per_client"].values()] == ["cnn-tiny", "cnn-large", "cnn-tiny"]
    samples = [c["samples"] for c in local["per_client"].values()]
    assert all(s > 0 for s in samples)
    assert sum(samples) == private_size  # iid partitions cover the private pool
    assert max(samples) - min(samples) <= 1


def test_local_only_accuracies_are_fractions_and_summarised(local: dict[str, Any]) -> None:
    # Assert
    accs = [c["accuracy"] for c in local["per_client"].values()]
    assert all(isinstance(a, float) and 0.0 <= a <= 1.0 for a in accs)
    assert local["accuracy_mean"] == pytest.approx(np.mean(accs))
    assert local["accuracy_min"] == min(accs)
    assert local["accuracy_max"] == max(accs)
    assert local["wall_s"] >= 0


# ---------------------------------------------------------------------------------------------------
# centralised
# ---------------------------------------------------------------------------------------------------


def test_centralised_trains_the_student_and_the_largest_teacher(central: dict[str, Any], private_size: int) -> None:
    # Assert
    assert set(central) == {"epochs", "samples", "student", "teacher"}
    assert central["epochs"] == 1
    assert central["samples"] == private_size
    assert central["student"]["model"] == "cnn-student"
    assert central["teacher"]["model"] == "cnn-large"
    for role in ("student", "teacher"):
        entry = central[role]
        assert set(entry) == {"model", "params", "accuracy", "balanced_accuracy", "macro_f1", "auroc", "wall_s"}
        assert entry["params"] == count_parameters(build_model(entry["model"], 10, (8, 8)))
        assert isinstance(entry["accuracy"], float) and 0.0 <= entry["accuracy"] <= 1.0


# ---------------------------------------------------------------------------------------------------
# Defaults and model choice, with training replaced by a recorder (no training: fast)
# ---------------------------------------------------------------------------------------------------


class TrainingRecorder:
    """Stands in for `train_supervised`: records the model class size, rows and epochs; trains nothing."""

    def __init__(self):
        self.calls: list[dict[str, Any]] = []

    def __call__(self, model, images, labels, *, epochs, lr, batch_size, seed):
        self.calls.append({"params": count_parameters(model), "rows": len(labels), "epochs": epochs, "seed": seed})
        return 0.0


@pytest.mark.parametrize("baseline", ["local_only", "centralised"])
def test_default_epochs_match_the_teachers_training_in_the_federation(baseline: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    recorder = TrainingRecorder()
    monkeypatch.setattr(baselines, "train_supervised", recorder)
    cfg = make_cfg(**{"local-epochs": 2, "num-server-rounds": 3})

    # Execute
    result = getattr(baselines, baseline)(cfg)

    # Assert
    assert result["epochs"] == 6
    assert recorder.calls and all(call["epochs"] == 6 for call in recorder.calls)


@pytest.mark.parametrize("teachers", ["cnn-large,cnn-tiny,mlp", "mlp,cnn-large,cnn-tiny", "cnn-tiny,mlp,cnn-large", "mlp"])
def test_centralised_teacher_is_the_largest_listed(teachers: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    monkeypatch.setattr(baselines, "train_supervised", TrainingRecorder())
    cfg = make_cfg(**{"teacher-models": teachers})
    sizes = {name: count_parameters(build_model(name, 10, (8, 8))) for name in cfg.teacher_model_list}

    # Execute
    result = baselines.centralised(cfg, epochs=1)

    # Assert
    assert result["teacher"]["model"] == max(sizes, key=sizes.get)
    assert result["teacher"]["params"] == max(sizes.values())


def test_local_only_trains_each_partition_with_its_own_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    recorder = TrainingRecorder()
    monkeypatch.setattr(baselines, "train_supervised", recorder)
    cfg = make_cfg(**{"teacher-models": "mlp,cnn-large,cnn-tiny"})

    # Execute
    result = baselines.local_only(cfg, epochs=1)

    # Assert
    expected_params = [count_parameters(build_model(n, 10, (8, 8))) for n in ("mlp", "cnn-large", "cnn-tiny")]
    assert [call["params"] for call in recorder.calls] == expected_params
    assert [call["rows"] for call in recorder.calls] == [c["samples"] for c in result["per_client"].values()]
    assert len({call["seed"] for call in recorder.calls}) == 3


def test_local_only_trains_each_institution_at_least_local_min_steps_a_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: batches of 64, at least 40 steps a round, 2 rounds
    recorder = TrainingRecorder()
    monkeypatch.setattr(baselines, "train_supervised", recorder)
    cfg = make_cfg(**{"local-min-steps": 40, "teacher-batch-size": 64})

    # Execute
    result = baselines.local_only(cfg)

    # Assert: each as its federated teacher trains, its own epochs for its own rows
    expected = [2 * math.ceil(40 / math.ceil(call["rows"] / 64)) for call in recorder.calls]
    assert [call["epochs"] for call in recorder.calls] == expected
    assert [c["epochs"] for c in result["per_client"].values()] == expected
    assert result["epochs"] == max(expected) and min(expected) > 2 * cfg.local_epochs
