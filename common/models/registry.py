"""Model registry: teachers and students are named in the config, each one `ModelSpec`, and built by `build_model`.

Adding a model is one entry in `MODELS` plus its builder: a function of (num_classes, input_shape) and
the tasks the model fits. The run config accepts a model for exactly its `tasks`, and `build_model`
refuses an unknown name with the same message as the config. Every model maps one input tensor to
logits `(batch, num_classes)` and has a `head` (the last layers), so a student can be trained head
first. What a model consumes depends on the task (`common.models.inputs.inputs_to_tensor`): images
`(batch, 1, height, width)` floats in [0, 1], input shape (height, width); tabular features
`(batch, d)` float32, input shape (d,); token ids `(batch, L)` int64, input shape (L,). A model may
carry `lr_multiplier`, the factor its optimiser applies to the configured learning rate (a pretrained
encoder is fine-tuned gently). The builders import their architectures (and torch) when called, so the
registry's names are cheap to import for the run config.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

from common.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

ModelBuilder = Callable[[int, tuple[int, ...]], "nn.Module"]


@dataclass(frozen=True)
class ModelSpec:
    """One registered model: its builder and the tasks ("image", "tabular", "text") it fits."""

    name: str
    tasks: tuple[str, ...]
    build: ModelBuilder
    teacher_only: bool = False  # fitted on the public set by `build_model`: only the institutions' teachers


def small_cnn(widths: tuple[int, int], hidden: int) -> ModelBuilder:
    """A `SmallCNN` builder (common/models/vision.py)."""
    def build(num_classes: int, shape: tuple[int, ...]) -> nn.Module:
        from common.models.vision import SmallCNN

        return SmallCNN(num_classes, shape, widths=widths, hidden=hidden)
    return build


def mlp(hidden: int | tuple[int, ...], dropout: float = 0.0) -> ModelBuilder:
    """An `MLP` builder (common/models/vision.py): images are flattened, table rows taken as they are."""
    def build(num_classes: int, shape: tuple[int, ...]) -> nn.Module:
        from common.models.vision import MLP

        return MLP(num_classes, shape, hidden=hidden, dropout=dropout)
    return build


def scatter_linear(num_classes: int, shape: tuple[int, ...]) -> nn.Module:
    """Fixed scattering features + a linear layer: the teacher for DP-SGD (common/models/scattering.py)."""
    from common.models.scattering import ScatterLinear

    return ScatterLinear(num_classes, shape)


def scatter_pca(num_classes: int, shape: tuple[int, ...]) -> nn.Module:
    """scatter-linear with the public set's whitened principal components before the layer: the teacher for
    DP-SGD at small budgets (common/models/scattering.py). `build_model` fits it on the public set."""
    from common.models.scattering import ScatterPCA

    return ScatterPCA(num_classes, shape)


def scatter_pca_mlp(num_classes: int, shape: tuple[int, ...]) -> nn.Module:
    """scatter-pca on the public set's 256 leading whitened components, with a hidden layer of 256 (ReLU) before
    the output layer: the stronger teacher without privacy (docs/methods.md)."""
    from common.models.scattering import ScatterPCA

    return ScatterPCA(num_classes, shape, components=256, hidden=256)


def text_model(name: str) -> ModelBuilder:
    """A text model builder (common/models/text.py); transformers is imported only for text tasks."""
    def build(num_classes: int, shape: tuple[int, ...]) -> nn.Module:
        from common.models.text import build_text_model

        return build_text_model(name, num_classes, shape)
    return build


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    # image teachers
    ModelSpec("cnn-small", ("image",), small_cnn(widths=(16, 32), hidden=128)),
    ModelSpec("cnn-large", ("image",), small_cnn(widths=(32, 64), hidden=256)),
    ModelSpec("cnn-tiny", ("image",), small_cnn(widths=(4, 8), hidden=32)),
    ModelSpec("mlp", ("image", "tabular"), mlp(hidden=128)),
    ModelSpec("scatter-linear", ("image",), scatter_linear),
    ModelSpec("scatter-pca", ("image",), scatter_pca, teacher_only=True),
    ModelSpec("scatter-pca-mlp", ("image",), scatter_pca_mlp, teacher_only=True),
    # image student: under a third of cnn-large's parameters
    ModelSpec("cnn-student", ("image",), small_cnn(widths=(16, 32), hidden=64)),
    # tabular teachers and student (`mlp` serves tables too; MLPs flatten images as well)
    ModelSpec("mlp-deep", ("image", "tabular"), mlp(hidden=(256, 128), dropout=0.1)),
    ModelSpec("mlp-student", ("image", "tabular"), mlp(hidden=32)),
    # text: pretrained all-MiniLM-L6-v2 fine-tuned; small BERTs from scratch (same tokenizer)
    ModelSpec("minilm", ("text",), text_model("minilm")),
    ModelSpec("bert-small", ("text",), text_model("bert-small")),
    ModelSpec("bert-tiny", ("text",), text_model("bert-tiny")),
)}


def models_for(task: str) -> list[str]:
    """Registered models that fit `task` ("image", "tabular" or "text"), sorted."""
    return sorted(name for name, spec in MODELS.items() if task in spec.tasks)


def unknown_model(name: str) -> str:
    """The one message for a model name the registry does not know (run config and `build_model` alike)."""
    return f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"


def model_spec(name: str) -> ModelSpec:
    """The registered model `name`; an unknown name is a `ConfigError` (`unknown_model`)."""
    spec = MODELS.get(name)
    if spec is None:
        raise ConfigError(unknown_model(name))
    return spec


def build_model(
    name: str, num_classes: int, input_shape: tuple[int, ...], seed: int | None = None, public: np.ndarray | None = None
) -> nn.Module:
    """Build the registered model `name` for inputs of `input_shape` (one sample's shape: (height, width),
    (d,) or (L,)); `seed` makes its initial weights reproducible. A model that learns something from the public
    transfer set without labels (`fit_public`: scatter-pca's projection) is fitted on `public`, its inputs; without
    them it can only be given saved weights (load_state_dict) before use."""
    import torch

    spec = model_spec(name)
    if seed is not None:
        torch.manual_seed(seed)
    model = spec.build(num_classes, tuple(input_shape))
    fit_public = getattr(model, "fit_public", None)
    if fit_public is not None and public is not None:
        from common.models.inputs import inputs_to_tensor

        fit_public(inputs_to_tensor(public))
    return model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the model's `head` (the part trained alone in two-stage distillation)."""
    head = cast("nn.Module", model.head)
    return list(head.parameters())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lr_of(model: nn.Module, lr: float) -> float:
    """The learning rate for `model`: the configured one times the model's `lr_multiplier` (default 1)."""
    return lr * float(getattr(model, "lr_multiplier", 1.0))
