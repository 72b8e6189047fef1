"""Training and inference loops shared by teachers (client side) and the student (server side)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.models import images_to_tensor

INFERENCE_BATCH = 256


def batches(n: int, batch_size: int, rng: np.random.Generator | None) -> Iterator[np.ndarray]:
    """Index batches over `n` rows, shuffled when `rng` is given."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def train_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    n: int,
    batch_loss: Callable[[np.ndarray], torch.Tensor],
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> float:
    """Run `epochs` shuffled passes over `n` rows; `batch_loss(indices)` gives each batch's loss.

    Returns the mean loss of the last epoch (nan when `epochs` is 0).
    """
    rng = np.random.default_rng(seed)
    model.train()
    last = float("nan")
    for epoch in range(epochs):
        total, count = 0.0, 0
        for idx in batches(n, batch_size, rng):
            optimizer.zero_grad(set_to_none=True)
            loss = batch_loss(idx)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / max(count, 1)
        if on_epoch is not None:
            on_epoch(epoch + 1, last)
    return last


def train_supervised(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, *, epochs: int, lr: float, batch_size: int, seed: int
) -> float:
    """Cross-entropy training of an image classifier with Adam; returns the last epoch's mean loss."""
    x, y = images_to_tensor(images), torch.from_numpy(np.asarray(labels, dtype=np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    return train_epochs(
        model, optimizer, len(y), lambda idx: F.cross_entropy(model(x[idx]), y[idx]),
        epochs=epochs, batch_size=batch_size, seed=seed,
    )


def predict_logits(model: nn.Module, images: np.ndarray) -> torch.Tensor:
    """Logits `(n, C)` for uint8 images `(n, h, w)`, in inference mode."""
    model.eval()
    outputs = []
    with torch.inference_mode():
        for idx in batches(len(images), INFERENCE_BATCH, None):
            outputs.append(model(images_to_tensor(images[idx])))
    return torch.cat(outputs) if outputs else torch.empty(0)


def predict_probs(model: nn.Module, images: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities softmax(z / T): `(n, C)` float32, rows sum to 1."""
    logits = predict_logits(model, images)
    return torch.softmax(logits.double() / temperature, dim=1).float().numpy()


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy on the given images."""
    if len(labels) == 0:
        return float("nan")
    predicted = predict_logits(model, images).argmax(dim=1).numpy()
    return float((predicted == np.asarray(labels)).mean())
