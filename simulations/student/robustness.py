"""Input perturbations for robustness curves: Gaussian noise and FGSM on float inputs, token dropout and
substitution on token ids.

The float perturbations act on what the model consumes (images as floats in [0, 1], tabular features as
standardised floats) and, for images, clip back into the valid range so a perturbed image is still an image.

    gaussian_noise      x + N(0, sigma^2), independently per input value
    fgsm                x + epsilon * sign(grad_x CE(f(x), y)) (Goodfellow et al., 2015, "Explaining and
                        Harnessing Adversarial Examples"): the one-step L-infinity attack of radius epsilon
    token_dropout       each ordinary token deleted with probability `rate`; the rest close up, padding refills
    token_substitution  each ordinary token replaced with probability `rate` by a token drawn uniformly from
                        `candidates` (e.g. the tokens seen in the public set)

Padding and `protected` ids (a tokenizer's [CLS], [SEP], ...) are never touched.

`accuracy_under` runs a perturbation over a data set in batches and returns the top-1 accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError

Range = tuple[float, float] | None  # the valid input range to clip into; None leaves values unbounded
Perturbation = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
BATCH = 256


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator, clip: Range = (0.0, 1.0)) -> torch.Tensor:
    """`x` plus independent N(0, sigma^2) noise, clipped to `clip`; sigma 0 returns `x` unchanged."""
    if sigma < 0:
        raise ValueError(f"gaussian_noise: sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return x
    noisy = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return noisy.clamp(*clip) if clip is not None else noisy


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, clip: Range = (0.0, 1.0)) -> torch.Tensor:
    """The fast gradient sign attack: one step of size `epsilon` up the cross-entropy's input gradient.

    The model is used as it is (call `model.eval()` first); its parameters' gradients are left untouched.
    x  # (B, ...) float inputs; y  # (B,) int64 true labels -> (B, ...) adversarial inputs
    """
    if epsilon < 0:
        raise ValueError(f"fgsm: epsilon must be >= 0, got {epsilon}")
    if epsilon == 0:
        return x
    x_adv = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
    perturbed = x.detach() + epsilon * grad.sign()
    return perturbed.clamp(*clip) if clip is not None else perturbed


def token_dropout(ids: torch.Tensor, rate: float, generator: torch.Generator, protected: torch.Tensor,
                  pad_id: int = 0) -> torch.Tensor:
    """Delete each ordinary token of `ids` (B, L) with probability `rate`; each row keeps its order and is
    padded back to L with `pad_id`."""
    if not 0 <= rate <= 1:
        raise ValueError(f"token_dropout: rate must be in [0, 1], got {rate}")
    ordinary = (ids != pad_id) & ~torch.isin(ids, protected)
    keep = ~(ordinary & (torch.rand(ids.shape, generator=generator) < rate))
    out = torch.full_like(ids, pad_id)
    for row in range(ids.shape[0]):
        kept = ids[row][keep[row]]
        out[row, :len(kept)] = kept
    return out


def token_substitution(ids: torch.Tensor, rate: float, generator: torch.Generator, protected: torch.Tensor,
                       candidates: torch.Tensor, pad_id: int = 0) -> torch.Tensor:
    """Replace each ordinary token of `ids` (B, L) with probability `rate` by one of `candidates` (uniform)."""
    if not 0 <= rate <= 1:
        raise ValueError(f"token_substitution: rate must be in [0, 1], got {rate}")
    ordinary = (ids != pad_id) & ~torch.isin(ids, protected)
    swap = ordinary & (torch.rand(ids.shape, generator=generator) < rate)
    drawn = candidates[torch.randint(len(candidates), ids.shape, generator=generator)]
    return torch.where(swap, drawn, ids)


def accuracy_under(model: nn.Module, x: torch.Tensor, y: torch.Tensor, perturb: Perturbation, batch: int = BATCH) -> float:
    """Top-1 accuracy of `model` on `perturb(model, x_batch, y_batch)`, batch by batch, in eval mode."""
    model.eval()
    correct = 0
    for start in range(0, len(y), batch):
        xb, yb = x[start:start + batch], y[start:start + batch]
        perturbed = perturb(model, xb, yb)
        with torch.inference_mode():
            correct += int((model(perturbed).argmax(dim=1) == yb).sum())
    return correct / len(y) if len(y) else float("nan")


def noise_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sigmas: list[float], seed: int,
                clip: Range = (0.0, 1.0)) -> list[dict[str, float]]:
    """Accuracy at each noise level; the same seeded noise draws for every level (common random numbers)."""
    return seeded_curve(model, x, y, sigmas, seed, lambda xb, sigma, g: gaussian_noise(xb, sigma, g, clip))


def fgsm_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float],
               clip: Range = (0.0, 1.0)) -> list[dict[str, float]]:
    """Accuracy under FGSM at each epsilon (white-box: the attack sees the model it attacks)."""
    return [{"level": float(eps), "accuracy": accuracy_under(model, x, y, functools.partial(fgsm, epsilon=eps, clip=clip))}
            for eps in epsilons]


def seeded_curve(model: nn.Module, x: torch.Tensor, y: torch.Tensor, levels: list[float], seed: int,
                 perturb: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]) -> list[dict[str, float]]:
    """Accuracy under a random perturbation `perturb(x_batch, level, generator)` at each level, every level
    drawing from the same seed."""
    rows = []
    for level in levels:
        generator = torch.Generator().manual_seed(seed)
        at_level = functools.partial(_input_only, perturb, level, generator)  # binds this iteration's level and generator
        rows.append({"level": float(level), "accuracy": accuracy_under(model, x, y, at_level)})
    return rows


def _input_only(perturb: Callable[[torch.Tensor, float, torch.Generator], torch.Tensor], level: float, generator: torch.Generator,
                _model: nn.Module, x: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
    """`perturb(x, level, generator)` as a Perturbation: model and labels unused."""
    return perturb(x, level, generator)


def parse_levels(text: str, name: str) -> list[float]:
    """"0,0.05,0.1" -> [0.0, 0.05, 0.1]; levels must be finite and >= 0."""
    try:
        levels = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated numbers such as 0,0.05,0.1, got {text!r}") from None
    if not levels or any(not np.isfinite(v) or v < 0 for v in levels):
        raise ConfigError(f"{name} must be one or more finite numbers >= 0, got {text!r}")
    return levels
