"""Model registry: teachers and students are named in the config and built by `build_model`.

Adding a model is one entry in `MODELS`. Image models take `(batch, 1, height, width)` floats in
[0, 1] and return logits `(batch, num_classes)`; each has a `features` body and a `head` (the
last layers), so a student can be trained head first.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks (conv 3x3, ReLU, max-pool 2) and a two-layer head."""

    def __init__(self, num_classes: int, image_size: tuple[int, int], widths: tuple[int, int], hidden: int):
        super().__init__()
        height, width = image_size
        self.features = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(widths[0], widths[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = widths[1] * (height // 4) * (width // 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten, one hidden ReLU layer, linear head: the institution that has no GPU and no CNN expertise."""

    def __init__(self, num_classes: int, image_size: tuple[int, int], hidden: int):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(image_size[0] * image_size[1], hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


ModelBuilder = Callable[[int, tuple[int, int]], nn.Module]

MODELS: dict[str, ModelBuilder] = {
    # teachers
    "cnn-small": lambda classes, size: SmallCNN(classes, size, widths=(16, 32), hidden=128),
    "cnn-large": lambda classes, size: SmallCNN(classes, size, widths=(32, 64), hidden=256),
    "cnn-tiny": lambda classes, size: SmallCNN(classes, size, widths=(4, 8), hidden=32),
    "mlp": lambda classes, size: MLP(classes, size, hidden=128),
    # student: under a third of cnn-large's parameters
    "cnn-student": lambda classes, size: SmallCNN(classes, size, widths=(16, 32), hidden=64),
}


def build_model(name: str, num_classes: int, image_size: tuple[int, int], seed: int | None = None) -> nn.Module:
    """Build the registered model `name`; `seed` makes its initial weights reproducible."""
    if name not in MODELS:
        from common.errors import ConfigError

        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name](num_classes, image_size)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the model's `head` (the part trained alone in two-stage distillation)."""
    return list(model.head.parameters())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 `(n, h, w)` images to float `(n, 1, h, w)` in [0, 1]."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)
