"""Unit tests of common/models/onnx_engine.py and the labelling pass that uses it (common/models/training.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.models import training
from common.models.inputs import inputs_to_tensor
from common.models.onnx_engine import exported_logits
from common.models.registry import build_model
from common.models.training import ENGINE_MIN_ROWS, predict_logits, predict_probs, train_supervised


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    """build_model(seed=...) reseeds torch's global generator: restore it after each test."""
    with torch.random.fork_rng():
        yield


def _count_engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the sets `predict_logits` hands to onnxruntime, as the test goes."""
    calls: list[int] = []
    real = training.exported_logits

    def counted(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        calls.append(len(x))
        return real(model, x)

    monkeypatch.setattr(training, "exported_logits", counted)
    return calls


def _eager_logits(model: nn.Module, inputs: np.ndarray) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return model(inputs_to_tensor(inputs))


@pytest.mark.parametrize("name", ["cnn-small", "cnn-large", "mlp"])
def test_a_trained_teacher_labels_a_public_set_in_onnxruntime_as_pytorch_does(name: str,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a teacher trained a little on structured images, so its logits are far from uniform
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=ENGINE_MIN_ROWS + 88)
    images = (rng.integers(0, 60, size=(len(labels), 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
    model = build_model(name, 10, (28, 28), seed=1)
    train_supervised(model, images, labels, epochs=1, lr=1e-3, batch_size=64, seed=0)
    calls = _count_engine_calls(monkeypatch)

    # Execute
    fast = predict_logits(model, images)
    probs = predict_probs(model, images, temperature=3.0)

    # Assert: the engine ran, and its logits are PyTorch's to float32 rounding
    reference = _eager_logits(model, images)
    assert calls == [len(images), len(images)]
    assert fast.shape == reference.shape == (len(images), 10)
    assert torch.allclose(fast, reference, rtol=1e-4, atol=1e-4)
    assert (fast.argmax(dim=1) == reference.argmax(dim=1)).all()
    assert float(reference.std()) > 0.1  # not a degenerate model whose logits all agree trivially
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)


def test_a_small_set_is_labelled_in_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    model = build_model("cnn-small", 10, (28, 28), seed=1)
    small = np.zeros((ENGINE_MIN_ROWS - 1, 28, 28), dtype=np.uint8)
    calls = _count_engine_calls(monkeypatch)

    # Execute
    logits = predict_logits(model, small)

    # Assert
    assert calls == [] and logits.shape == (len(small), 10)


class _NotExportable(nn.Module):
    """A model whose forward uses an operator ONNX has no counterpart for (complex eigenvalues)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        square = x.reshape(len(x), 2, 2)
        return self.linear(x) + torch.linalg.eigvals(square).real.sum(dim=1, keepdim=True)


def test_a_model_that_does_not_export_is_labelled_in_pytorch() -> None:
    # Prepare
    torch.manual_seed(0)
    model = _NotExportable()
    rows = np.random.default_rng(0).normal(size=(ENGINE_MIN_ROWS, 4)).astype(np.float32)

    # Execute
    exported = exported_logits(model, inputs_to_tensor(rows))
    logits = predict_logits(model, rows)

    # Assert: the engine declined it, and the labelling pass gave PyTorch's own logits
    assert exported is None
    assert torch.allclose(logits, _eager_logits(model, rows))
