"""Unit tests of the student's mixed precision (run-config `student-precision`): bf16 autocast runs the
forward pass in bfloat16, keeps weights and loss in float32, still distils; unknown values are refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from common.config import RunConfig, default_run_config
from common.errors import ConfigError
from common.models.inputs import images_to_tensor
from common.tasks.registry import load_split
from common.tasks.samples import FederatedSplit
from server.checkpoint import config_differences, resumable_config
from server.distill import Student

TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def split() -> FederatedSplit:
    return load_split("digits", "", 400, 42)


def make_cfg(**overrides: Any) -> RunConfig:
    base = {"dataset": "digits", "public-size": 400, "student-lr": 0.01, "student-batch-size": 32, "student-epochs": 5}
    return RunConfig.from_run_config({**default_run_config(), **base, **overrides})


def smoothed_labels(labels: np.ndarray) -> np.ndarray:
    return (0.8 * np.eye(10, dtype=np.float32)[labels] + 0.02).astype(np.float32)  # (m, 10)


def test_default_precision_is_fp32_and_autocast_is_off(split: FederatedSplit) -> None:
    # Prepare
    student = Student(make_cfg(), 10, (8, 8))

    # Execute
    with student.autocast():
        logits = student.model(images_to_tensor(split.public.images[:4]))

    # Assert
    assert student.cfg.student_precision == "fp32"
    assert logits.dtype == torch.float32


def kl_to(student: Student, x: torch.Tensor, ensemble: np.ndarray) -> float:
    with torch.no_grad():
        log_probs = torch.log_softmax(student.model(x) / TEMPERATURE, dim=1)
        return float(torch.nn.functional.kl_div(log_probs, torch.from_numpy(ensemble), reduction="batchmean"))


def test_bf16_runs_the_forward_in_bfloat16_keeps_float32_weights_and_distils_like_fp32(split: FederatedSplit) -> None:
    # Prepare
    bf16, fp32 = Student(make_cfg(**{"student-precision": "bf16"}), 10, (8, 8)), Student(make_cfg(), 10, (8, 8))
    ids = np.arange(0, 400, 2, dtype=np.int64)
    ensemble = smoothed_labels(split.public.labels[ids])
    x = images_to_tensor(split.public.images[ids])
    before = kl_to(bf16, x, ensemble)

    # Execute
    with bf16.autocast():
        autocast_logits = bf16.model(x[:4])
    loss = bf16.distil(split.public, ids, ensemble, round_=1, temperature=TEMPERATURE)
    fp32.distil(split.public, ids, ensemble, round_=1, temperature=TEMPERATURE)

    # Assert
    assert autocast_logits.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert np.isfinite(loss)
    after, after_fp32 = kl_to(bf16, x, ensemble), kl_to(fp32, x, ensemble)
    assert after < 0.9 * before
    assert abs(after - after_fp32) < 0.1 * before


def test_unknown_precision_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"student-precision must be one of \('fp32', 'bf16'\), got 'fp16'"):
        make_cfg(**{"student-precision": "fp16"})


def test_a_checkpoint_older_than_student_precision_resumes_with_the_default() -> None:
    # Prepare: a checkpoint's config recorded before the key existed
    cfg = make_cfg()
    recorded = {key: value for key, value in resumable_config(cfg).items() if key != "student-precision"}

    # Execute
    same = config_differences(recorded, cfg)
    other = config_differences(recorded, make_cfg(**{"student-precision": "bf16"}))

    # Assert
    assert same == []
    assert other == ["student-precision: 'fp32' -> 'bf16'"]
