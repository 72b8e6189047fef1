"""Vision architectures: small CNNs and MLPs (the MLPs serve tabular rows too)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv blocks (conv 3x3, ReLU, max-pool 2) and a two-layer head."""

    def __init__(self, num_classes: int, image_size: tuple[int, ...], widths: tuple[int, int], hidden: int):
        super().__init__()
        height, width = image_size
        self.features = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(widths[0], widths[1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = widths[1] * (height // 4) * (width // 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits


class MLP(nn.Module):
    """Flatten, ReLU hidden layers, linear head: images (the institution that has no GPU and no CNN
    expertise) or tabular rows."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...], hidden: int | tuple[int, ...],
                 dropout: float = 0.0):
        super().__init__()
        widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        previous = int(np.prod(input_shape))
        for width in widths:
            layers += [nn.Linear(previous, width), nn.ReLU()] + ([nn.Dropout(dropout)] if dropout else [])
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.features(x))
        return logits
