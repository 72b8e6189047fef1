"""Training and inference loops shared by teachers (client side) and the student (server side)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.models.inputs import inputs_to_tensor
from common.models.onnx_engine import exported_logits
from common.models.registry import lr_of
from common.models.scattering import fixed_stage

INFERENCE_BATCH = 256
ENGINE_MIN_ROWS = 512  # from this many rows a set is labelled in onnxruntime (common/models/onnx_engine.py)
TEXT_INFERENCE_BATCH = 32  # token ids: a transformer's activations grow with the sequence length


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
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            optimizer.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        last = total / max(count, 1)
        if on_epoch is not None:
            on_epoch(epoch + 1, last)
    return last


def train_supervised(
    model: nn.Module, inputs: np.ndarray, labels: np.ndarray, *, epochs: int, lr: float, batch_size: int, seed: int
) -> float:
    """Cross-entropy training of a classifier with Adam on a set's `inputs` (images, features or token
    ids); `lr` times the model's `lr_multiplier`. Returns the last epoch's mean loss."""
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    trained, x = fixed_stage(model, inputs_to_tensor(inputs))  # fixed features: computed once, head trained
    optimizer = torch.optim.Adam(trained.parameters(), lr=lr_of(model, lr))
    return train_epochs(
        trained, optimizer, len(y), lambda idx: F.cross_entropy(trained(x[idx]), y[idx]),
        epochs=epochs, batch_size=batch_size, seed=seed,
    )


def predict_logits(model: nn.Module, inputs: np.ndarray) -> torch.Tensor:
    """Logits `(n, C)` for a set's `inputs` (uint8 images `(n, h, w)`, features, token ids), in inference mode:
    sets of images or table rows from `ENGINE_MIN_ROWS` rows in onnxruntime (common/models/onnx_engine.py: the
    same logits to float32 rounding, several times faster), token ids and smaller sets in PyTorch."""
    model.eval()
    outputs = []
    batch = TEXT_INFERENCE_BATCH if inputs.dtype == np.int64 else INFERENCE_BATCH
    fixed = getattr(model, "fixed_features", False)
    if not fixed and inputs.dtype != np.int64 and len(inputs) >= ENGINE_MIN_ROWS:  # images, tables: onnxruntime
        with torch.no_grad():
            logits = exported_logits(model, inputs_to_tensor(inputs))
        if logits is not None:
            return logits
    with torch.inference_mode():
        if fixed:  # features of the whole set at once, cached by content
            head, x = fixed_stage(model, inputs_to_tensor(inputs))
            return torch.cat([head(x[idx]) for idx in batches(len(x), batch, None)]) if len(x) else torch.empty(0)
        for idx in batches(len(inputs), batch, None):
            outputs.append(model(inputs_to_tensor(inputs[idx])))
    return torch.cat(outputs) if outputs else torch.empty(0)


def predict_probs(model: nn.Module, inputs: np.ndarray, temperature: float) -> np.ndarray:
    """Temperature-scaled probabilities softmax(z / T): `(n, C)` float32, rows sum to 1."""
    logits = predict_logits(model, inputs)
    return torch.softmax(logits.double() / temperature, dim=1).float().numpy()


def accuracy(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy on the given inputs."""
    if len(labels) == 0:
        return float("nan")
    predicted = predict_logits(model, inputs).argmax(dim=1).numpy()
    return float((predicted == np.asarray(labels)).mean())


def evaluate(model: nn.Module, inputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro-F1 and AUROC (`common.metrics`) of the model on the given inputs."""
    from common.metrics import classification_metrics

    if len(labels) == 0:
        return classification_metrics(np.zeros((0, 1)), np.asarray(labels))
    probs = torch.softmax(predict_logits(model, inputs).double(), dim=1).numpy()
    return classification_metrics(probs, labels)
