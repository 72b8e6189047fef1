"""Unit tests of simulations/student/robustness.py on toy models: Gaussian noise, FGSM (against its closed form for a
linear model), token dropout and substitution, accuracy under a perturbation, and level parsing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import ConfigError
from simulations.student.robustness import (
    accuracy_under,
    fgsm,
    fgsm_curve,
    gaussian_noise,
    noise_curve,
    parse_levels,
    token_dropout,
    token_substitution,
)


def identity_classifier() -> nn.Module:
    """logits = x for 2-feature inputs: the class is the larger feature."""
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    return model.eval()


def test_gaussian_noise_has_the_requested_scale_and_is_clipped() -> None:
    # Prepare
    x = torch.full((20_000,), 0.5)

    # Execute
    unclipped = gaussian_noise(x, 0.1, torch.Generator().manual_seed(0), clip=None)
    clipped = gaussian_noise(x, 1.0, torch.Generator().manual_seed(0))

    # Assert
    assert float((unclipped - x).std()) == pytest.approx(0.1, rel=0.03)
    assert float(clipped.min()) == 0.0 and float(clipped.max()) == 1.0
    assert gaussian_noise(x, 0.0, torch.Generator()) is x


def test_fgsm_steps_by_epsilon_along_the_sign_of_the_loss_gradient() -> None:
    # Prepare: logits = x; at x = (0.5, 0.5), y = 0 the CE gradient is softmax(x) - e_0 = (-0.5, 0.5)
    model = identity_classifier()
    x, y = torch.tensor([[0.5, 0.5]]), torch.tensor([0])

    # Execute
    adversarial = fgsm(model, x, y, 0.1)

    # Assert
    torch.testing.assert_close(adversarial, torch.tensor([[0.4, 0.6]]))
    assert model.weight.grad is None  # the model's own gradients are left alone


def test_fgsm_clips_into_the_valid_range() -> None:
    adversarial = fgsm(identity_classifier(), torch.tensor([[0.05, 0.95]]), torch.tensor([0]), 0.2)

    torch.testing.assert_close(adversarial, torch.tensor([[0.0, 1.0]]))


def test_accuracy_falls_under_fgsm_and_not_under_zero_noise() -> None:
    # Prepare: points at margin 0.1 from the decision boundary x0 = x1, half of each class
    model = identity_classifier()
    x = torch.tensor([[0.55, 0.45], [0.45, 0.55]] * 50)
    y = torch.tensor([0, 1] * 50)

    # Execute
    clean = accuracy_under(model, x, y, lambda _m, xb, _y: xb, batch=16)
    curve = fgsm_curve(model, x, y, [0.0, 0.02, 0.1])
    noise = noise_curve(model, x, y, [0.0], seed=0)

    # Assert: epsilon 0.1 moves each feature 0.1 toward the other class, past the boundary
    assert clean == 1.0
    assert [row["accuracy"] for row in curve] == [1.0, 1.0, 0.0]
    assert noise == [{"level": 0.0, "accuracy": 1.0}]


PROTECTED = torch.tensor([0, 101, 102])  # padding, [CLS], [SEP]


def test_token_dropout_deletes_ordinary_tokens_and_closes_up() -> None:
    # Prepare
    ids = torch.tensor([[101, 7, 8, 9, 102, 0], [101, 5, 102, 0, 0, 0]])

    # Execute
    none = token_dropout(ids, 0.0, torch.Generator().manual_seed(0), PROTECTED)
    every = token_dropout(ids, 1.0, torch.Generator().manual_seed(0), PROTECTED)
    some = token_dropout(ids[:1].repeat(200, 1), 0.5, torch.Generator().manual_seed(0), PROTECTED)

    # Assert
    torch.testing.assert_close(none, ids)
    torch.testing.assert_close(every, torch.tensor([[101, 102, 0, 0, 0, 0], [101, 102, 0, 0, 0, 0]]))
    assert (some[:, 0] == 101).all()
    lengths = (some != 0).sum(dim=1)
    assert set(lengths.tolist()) <= {2, 3, 4, 5} and 3 <= float(lengths.float().mean()) <= 4  # 2 + Binomial(3, 0.5)
    for row, length in zip(some, lengths, strict=True):
        assert row[length - 1] == 102 and row[:length].tolist() == [t for t in [101, 7, 8, 9, 102] if t in row[:length].tolist()]


def test_token_substitution_replaces_only_ordinary_tokens_with_candidates() -> None:
    # Prepare
    ids = torch.tensor([[101, 7, 8, 9, 102, 0]])
    candidates = torch.tensor([500, 501])

    # Execute
    every = token_substitution(ids, 1.0, torch.Generator().manual_seed(0), PROTECTED, candidates)
    none = token_substitution(ids, 0.0, torch.Generator().manual_seed(0), PROTECTED, candidates)

    # Assert
    assert every[0, 0] == 101 and every[0, 4] == 102 and every[0, 5] == 0
    assert set(every[0, 1:4].tolist()) <= {500, 501}
    torch.testing.assert_close(none, ids)


def test_parse_levels_reads_numbers_and_refuses_negative_ones() -> None:
    assert parse_levels("0, 0.05,0.1", "--sigmas") == [0.0, 0.05, 0.1]
    with pytest.raises(ConfigError, match="--epsilons must be one or more finite numbers >= 0"):
        parse_levels("0,-0.1", "--epsilons")
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        parse_levels("a,b", "--sigmas")
