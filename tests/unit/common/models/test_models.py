"""Unit tests of common/models/registry.py: the model registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from common.models.inputs import images_to_tensor
from common.models.registry import MODELS, build_model, count_parameters, head_parameters, models_for

IMAGE_SIZES = [(28, 28), (8, 8)]  # Fashion-MNIST, digits


def small_cnn_parameters(widths: tuple[int, int], hidden: int, image_size: tuple[int, int], classes: int = 10) -> int:
    """Parameters of conv3x3(1->w0), conv3x3(w0->w1), linear(w1*(h/4)*(w/4) -> hidden), linear(hidden -> classes)."""
    flat = widths[1] * (image_size[0] // 4) * (image_size[1] // 4)
    return (
        (9 * 1 * widths[0] + widths[0])
        + (9 * widths[0] * widths[1] + widths[1])
        + (flat * hidden + hidden)
        + (hidden * classes + classes)
    )


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    """build_model(seed=...) reseeds torch's global generator: restore it after each test."""
    with torch.random.fork_rng():
        yield


def test_registry_names() -> None:
    # Execute / Assert
    assert models_for("image") == [
        "cnn-large", "cnn-small", "cnn-student", "cnn-tiny", "mlp", "mlp-deep", "mlp-student", "scatter-linear",
        "scatter-pca", "scatter-pca-mlp",
    ]
    assert models_for("tabular") == ["mlp", "mlp-deep", "mlp-student"]
    assert models_for("text") == ["bert-small", "bert-tiny", "minilm"]
    assert all(spec.name == name and spec.tasks for name, spec in MODELS.items())


def test_heterogeneous_teachers_span_a_5x_size_range() -> None:
    # Prepare
    sizes = {name: count_parameters(build_model(name, 10, (28, 28))) for name in ("cnn-tiny", "mlp", "cnn-large")}

    # Assert: the MLP is 784*128 + 128 + 128*10 + 10 parameters
    assert sizes["mlp"] == 784 * 128 + 128 + 128 * 10 + 10
    assert sizes["cnn-tiny"] == small_cnn_parameters((4, 8), 32, (28, 28))
    assert sizes["cnn-large"] >= 5 * sizes["cnn-tiny"]


@pytest.mark.parametrize("name", models_for("image"))
def test_every_model_has_a_head_for_two_stage_training(name: str) -> None:
    # Prepare
    model = build_model(name, 10, (28, 28))

    # Execute
    head = head_parameters(model)

    # Assert: the head is the last linear layer block, a strict subset of all parameters (all of them
    # when the features are fixed, as scatter-linear's are)
    size = sum(p.numel() for p in head)
    assert 0 < size <= count_parameters(model) and (size < count_parameters(model) or model.fixed_features)
    assert head[-1].shape == (10,)


@pytest.mark.parametrize("image_size", IMAGE_SIZES, ids=["28x28", "8x8"])
@pytest.mark.parametrize("name", models_for("image"))
def test_model_maps_images_to_logits(name: str, image_size: tuple[int, int]) -> None:
    # Prepare
    public = np.random.default_rng(0).integers(0, 256, (300, *image_size), dtype=np.uint8)  # scatter-pca(-mlp) fits on it
    model = build_model(name, num_classes=10, input_shape=image_size, seed=0, public=public)
    batch = torch.rand(3, 1, *image_size)

    # Execute
    with torch.no_grad():
        logits = model(batch)

    # Assert
    assert logits.shape == (3, 10)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_model_respects_num_classes() -> None:
    # Prepare
    model = build_model("cnn-student", num_classes=3, input_shape=(8, 8))

    # Execute
    with torch.no_grad():
        logits = model(torch.zeros(2, 1, 8, 8))

    # Assert
    assert logits.shape == (2, 3)


@pytest.mark.parametrize(
    ("name", "image_size", "widths", "hidden"),
    [
        ("cnn-small", (28, 28), (16, 32), 128),
        ("cnn-large", (28, 28), (32, 64), 256),
        ("cnn-student", (28, 28), (16, 32), 64),
        ("cnn-student", (8, 8), (16, 32), 64),
    ],
)
def test_parameter_count_golden_values(name, image_size, widths, hidden) -> None:
    # Prepare
    expected = small_cnn_parameters(widths, hidden, image_size)

    # Execute
    count = count_parameters(build_model(name, 10, image_size))

    # Assert
    assert count == expected


def test_parameter_count_literal_golden_values() -> None:
    # Execute / Assert: 160 + 4,640 + 100,416 + 650 and 320 + 18,496 + 803,072 + 2,570
    assert count_parameters(build_model("cnn-student", 10, (28, 28))) == 105_866
    assert count_parameters(build_model("cnn-large", 10, (28, 28))) == 824_458


@pytest.mark.parametrize("image_size", IMAGE_SIZES, ids=["28x28", "8x8"])
def test_student_has_under_a_third_of_the_large_teachers_parameters(image_size: tuple[int, int]) -> None:
    # Prepare
    student = build_model("cnn-student", 10, image_size)
    large = build_model("cnn-large", 10, image_size)

    # Execute
    ratio = count_parameters(student) / count_parameters(large)

    # Assert
    assert ratio < 1 / 3


def test_seed_makes_initial_weights_reproducible() -> None:
    # Execute
    first = build_model("cnn-small", 10, (8, 8), seed=5)
    again = build_model("cnn-small", 10, (8, 8), seed=5)
    other = build_model("cnn-small", 10, (8, 8), seed=6)

    # Assert
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.state_dict()["head.1.weight"], other.state_dict()["head.1.weight"])


def test_unknown_model_is_a_config_error() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="unknown model 'resnet18'; known models: bert-small, bert-tiny, cnn-large, cnn-small"):
        build_model("resnet18", 10, (28, 28))


def test_images_to_tensor_scales_uint8_to_unit_interval() -> None:
    # Prepare
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)  # (1, 2, 2)

    # Execute
    tensor = images_to_tensor(images)

    # Assert
    assert tensor.shape == (1, 1, 2, 2)
    assert tensor.dtype == torch.float32
    np.testing.assert_allclose(tensor.numpy()[0, 0], [[0.0, 1.0], [0.2, 0.4]], rtol=1e-6)
