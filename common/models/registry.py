"""Model registry: teachers and students are named in the config and built by `build_model`.

Adding a model is one entry in `MODELS`: a function of (num_classes, input_shape). Every model maps
one input tensor to logits `(batch, num_classes)` and has a `head` (the last layers), so a student
can be trained head first. What a model consumes depends on the task (`inputs_to_tensor`):
images `(batch, 1, height, width)` floats in [0, 1], input shape (height, width); tabular
features `(batch, d)` float32, input shape (d,); token ids `(batch, L)` int64, input shape (L,)
(the text models of `common.models.text`). A model may carry `lr_multiplier`, the factor its
optimiser applies to the configured learning rate (a pretrained encoder is fine-tuned gently).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from common.models.scattering import ScatterLinear


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
        return self.head(self.features(x))


def _text_model(name: str) -> Callable[[int, tuple[int, ...]], nn.Module]:
    def build(classes: int, shape: tuple[int, ...]) -> nn.Module:
        from common.models.text import build_text_model  # transformers is imported only for text tasks

        return build_text_model(name, classes, shape)
    return build


ModelBuilder = Callable[[int, tuple[int, ...]], nn.Module]

MODELS: dict[str, ModelBuilder] = {
    # teachers
    "cnn-small": lambda classes, size: SmallCNN(classes, size, widths=(16, 32), hidden=128),
    "cnn-large": lambda classes, size: SmallCNN(classes, size, widths=(32, 64), hidden=256),
    "cnn-tiny": lambda classes, size: SmallCNN(classes, size, widths=(4, 8), hidden=32),
    "mlp": lambda classes, size: MLP(classes, size, hidden=128),
    # fixed scattering features + a linear layer: the teacher for DP-SGD (common/models/scattering.py)
    "scatter-linear": lambda classes, size: ScatterLinear(classes, size),
    # student: under a third of cnn-large's parameters
    "cnn-student": lambda classes, size: SmallCNN(classes, size, widths=(16, 32), hidden=64),
    # tabular teachers and student (`mlp` serves tables too)
    "mlp-deep": lambda classes, size: MLP(classes, size, hidden=(256, 128), dropout=0.1),
    "mlp-student": lambda classes, size: MLP(classes, size, hidden=32),
    # text: pretrained all-MiniLM-L6-v2 fine-tuned; small BERTs from scratch (same tokenizer)
    "minilm": _text_model("minilm"),
    "bert-small": _text_model("bert-small"),
    "bert-tiny": _text_model("bert-tiny"),
}

MODEL_TASKS: dict[str, tuple[str, ...]] = {  # the tasks each model fits; MLPs flatten images too
    **{name: ("image",) for name in ("cnn-small", "cnn-large", "cnn-tiny", "cnn-student", "scatter-linear")},
    **{name: ("image", "tabular") for name in ("mlp", "mlp-deep", "mlp-student")},
    **{name: ("text",) for name in ("minilm", "bert-small", "bert-tiny")},
}


def models_for(task: str) -> list[str]:
    """Registered models that fit `task` ("image", "tabular" or "text"), sorted."""
    return sorted(name for name in MODELS if task in MODEL_TASKS.get(name, ()))


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], seed: int | None = None) -> nn.Module:
    """Build the registered model `name` for inputs of `input_shape` (one sample's shape: (height, width),
    (d,) or (L,)); `seed` makes its initial weights reproducible."""
    if name not in MODELS:
        from common.errors import ConfigError

        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    if seed is not None:
        torch.manual_seed(seed)
    return MODELS[name](num_classes, tuple(input_shape))


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the model's `head` (the part trained alone in two-stage distillation)."""
    return list(model.head.parameters())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 `(n, h, w)` images to float `(n, 1, h, w)` in [0, 1]."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).unsqueeze(1)


def inputs_to_tensor(inputs: np.ndarray) -> torch.Tensor:
    """A set's `inputs` as its models consume them, by dtype: uint8 images scaled (`images_to_tensor`),
    float32 features and int64 token ids as they are."""
    if inputs.dtype == np.uint8:
        return images_to_tensor(inputs)
    if inputs.dtype in (np.float32, np.int64):
        return torch.from_numpy(np.ascontiguousarray(inputs))
    raise TypeError(f"model inputs must be uint8 images, float32 features or int64 token ids, got {inputs.dtype}")


def input_shape(inputs: np.ndarray) -> tuple[int, ...]:
    """One sample's shape: what `build_model` needs to size a model for these inputs."""
    return tuple(int(d) for d in inputs.shape[1:])


def lr_of(model: nn.Module, lr: float) -> float:
    """The learning rate for `model`: the configured one times the model's `lr_multiplier` (default 1)."""
    return lr * float(getattr(model, "lr_multiplier", 1.0))
