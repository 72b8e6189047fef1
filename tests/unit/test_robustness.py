"""Unit tests of common/robustness.py on toy models: Gaussian noise, FGSM (against its closed form for a
linear model), accuracy under a perturbation, and level parsing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.errors import ConfigError
from common.robustness import accuracy_under, fgsm, fgsm_curve, gaussian_noise, noise_curve, parse_levels


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
    assert noise == [{"sigma": 0.0, "accuracy": 1.0}]


def test_parse_levels_reads_numbers_and_refuses_negative_ones() -> None:
    assert parse_levels("0, 0.05,0.1", "--sigmas") == [0.0, 0.05, 0.1]
    with pytest.raises(ConfigError, match="--epsilons must be one or more finite numbers >= 0"):
        parse_levels("0,-0.1", "--epsilons")
    with pytest.raises(ConfigError, match="comma-separated numbers"):
        parse_levels("a,b", "--sigmas")
