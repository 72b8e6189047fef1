"""Unit tests of the student's augmented views (run-config `student-augment`): every view is the original image
shifted by at most 2 pixels (and, with `shift-flip`, maybe mirrored), drawn from a seeded generator; the
student distils on them and repeats exactly; the setting is refused for data sets that are not images."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from common.config import RunConfig, default_run_config
from common.errors import ConfigError
from common.models.augment import SHIFT_PX, augment_images
from common.tasks.registry import load_split
from server.distill import Student


def images(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) + 0.1  # no zero pixel inside


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """`image` (1, h, w) moved down by dy and right by dx pixels, zeros coming in."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[:, max(-dy, 0):h - max(dy, 0),
                                                                         max(-dx, 0):w - max(dx, 0)]
    return out


def shifts_of(image: torch.Tensor) -> list[torch.Tensor]:
    moves = range(-SHIFT_PX, SHIFT_PX + 1)
    return [shifted(image, dy, dx) for dy in moves for dx in moves]


def test_a_shifted_view_is_the_image_moved_by_at_most_two_pixels_and_the_moves_vary() -> None:
    # Prepare
    x = images()

    # Execute
    views = augment_images(x, "shift", torch.Generator().manual_seed(1))

    # Assert: each view is one of the 25 moves of its own image, and not all the same move
    assert views.shape == x.shape
    matched = [next(i for i, s in enumerate(shifts_of(x[k])) if torch.equal(views[k], s)) for k in range(len(x))]
    assert len(set(matched)) > 5


def test_shift_flip_mirrors_some_views_and_only_moves_the_others() -> None:
    # Prepare
    x = images(64)

    # Execute
    views = augment_images(x, "shift-flip", torch.Generator().manual_seed(2))

    # Assert
    mirrored = 0
    for k in range(len(x)):
        if any(torch.equal(views[k], s) for s in shifts_of(x[k])):
            continue
        assert any(torch.equal(views[k], s.flip(-1)) for s in shifts_of(x[k])), f"view {k} is neither moved nor mirrored"
        mirrored += 1
    assert 10 < mirrored < 54


def test_the_views_repeat_with_the_seed_and_none_leaves_the_batch_alone() -> None:
    # Prepare
    x = images()

    # Execute
    first = augment_images(x, "shift-flip", torch.Generator().manual_seed(3))
    again = augment_images(x, "shift-flip", torch.Generator().manual_seed(3))
    other = augment_images(x, "shift-flip", torch.Generator().manual_seed(4))

    # Assert
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert augment_images(x, "none", torch.Generator()) is x


def test_views_of_rows_that_are_not_images_are_refused() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match=r"applies to images \(n, channels, h, w\), got shape \(4, 12\)"):
        augment_images(torch.zeros(4, 12), "shift", torch.Generator())
    with pytest.raises(ValueError, match="must be one of none, shift, shift-flip, got 'rotate'"):
        augment_images(images(), "rotate", torch.Generator())


def make_cfg(**overrides: Any) -> RunConfig:
    base = {"dataset": "digits", "public-size": 400, "student-lr": 0.01, "student-batch-size": 32, "student-epochs": 2}
    return RunConfig.from_run_config({**default_run_config(), **base, **overrides})


def test_the_student_learns_from_augmented_views_and_repeats_exactly() -> None:
    # Prepare
    split = load_split("digits", "", 400, 42)
    ids = np.arange(400, dtype=np.int64)
    ensemble = (0.8 * np.eye(10, dtype=np.float32)[split.public.labels] + 0.02).astype(np.float32)

    def distilled(augment: str) -> tuple[float, torch.Tensor]:
        student = Student(make_cfg(**{"student-augment": augment}), 10, (8, 8))
        loss = student.distil(split.public, ids, ensemble, 1, 2.0)
        return loss, next(student.model.parameters()).detach().clone()

    # Execute
    plain_loss, plain = distilled("none")
    loss, weights = distilled("shift")
    loss_again, weights_again = distilled("shift")

    # Assert: the same draws each time, other than plain training, and still learning
    assert loss == loss_again and torch.equal(weights, weights_again)
    assert not torch.equal(weights, plain)
    assert np.isfinite(loss) and loss < 2.0 * plain_loss + 1.0


@pytest.mark.parametrize(("dataset", "task"), [("bbc-news", "text"), ("credit-data", "tabular")])
def test_augmenting_a_data_set_of_no_images_is_a_config_error_that_names_the_fix(dataset: str, task: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"dataset '{dataset}' is a {task} task: use student-augment = \"none\""):
        RunConfig.from_run_config({**default_run_config(), "dataset": dataset, "student-augment": "shift"})


def test_an_unknown_augmentation_is_a_config_error() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="student-augment must be one of none, shift, shift-flip, got 'mixup'"):
        make_cfg(**{"student-augment": "mixup"})
