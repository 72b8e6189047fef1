"""Unit tests of common/models/scattering.py: the scatter-linear teacher (fixed scattering features, a linear head),
scatter-pca (the public set's whitened principal components before the layer) and `fixed_stage`, which trains and
runs the head on features computed once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import common.models.scattering as scattering
from common.errors import ConfigError
from common.models.inputs import images_to_tensor
from common.models.registry import build_model, count_parameters
from common.models.training import ENGINE_MIN_ROWS, accuracy, predict_logits, train_supervised
from common.privacy.dpsgd import require_dp_compatible, train_dpsgd
from common.tasks.registry import load_split


@pytest.fixture(autouse=True)
def _keep_torch_rng_state():
    with torch.random.fork_rng():
        yield


@pytest.fixture(scope="module")
def digits():
    return load_split("digits", "", 400, 42)


def test_features_have_81_channels_at_a_quarter_of_the_size_and_no_weights() -> None:
    model = build_model("scatter-linear", 10, (28, 28), seed=0)

    out = model.features(torch.rand(3, 1, 28, 28))

    assert out.shape == (3, 81, 7, 7)
    assert count_parameters(model) == 81 * 7 * 7 * 10 + 10 == count_parameters(model.head)
    assert not list(model.features.parameters())
    require_dp_compatible(model)  # Opacus accepts it (group norm, no batch norm)


def test_features_are_translation_stable_and_deterministic() -> None:
    # Prepare: an image and the same image shifted by one pixel
    image = torch.zeros(1, 1, 28, 28)
    image[0, 0, 10:18, 8:20] = 1.0
    shifted = torch.roll(image, 1, dims=3)
    features = scattering.Scattering((28, 28))

    # Execute
    a, b, again = features(image), features(shifted), features(image)

    # Assert: the same input gives the same output; a one-pixel shift moves the low-pass features little
    assert torch.equal(a, again)
    assert (a - b).norm() < 0.25 * a.norm()


def test_sides_not_divisible_by_4_are_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="divisible by 4.*choose cnn-"):
        build_model("scatter-linear", 10, (30, 30))


def test_fixed_stage_computes_features_once_and_predictions_match_the_whole_model(digits) -> None:
    # Prepare
    model = build_model("scatter-linear", 10, (8, 8), seed=0).eval()
    x = images_to_tensor(digits.public.images)
    scattering._cache.clear()

    # Execute
    head, features = scattering.fixed_stage(model, x)
    again_head, again = scattering.fixed_stage(model, x.clone())  # same content, another tensor
    other = scattering.fixed_stage(build_model("cnn-tiny", 10, (8, 8)), x)

    # Assert
    assert head is model.head and again is features and len(scattering._cache) == 1
    assert other[1] is x  # models without fixed features are untouched
    with torch.no_grad():
        whole = model(x)
    assert torch.allclose(predict_logits(model, digits.public.images), whole, atol=1e-5)


def test_only_the_head_learns_with_and_without_dp(digits) -> None:
    # Prepare
    plain, private = (build_model("scatter-linear", 10, (8, 8), seed=1) for _ in range(2))
    before = {k: v.clone() for k, v in private.state_dict().items()}

    # Execute
    train_supervised(plain, digits.private.images, digits.private.labels, epochs=10, lr=0.01, batch_size=32, seed=0)
    _, event = train_dpsgd(private, digits.private.images, digits.private.labels, epochs=10, lr=0.01, batch_size=64,
                           noise_multiplier=1.0, max_grad_norm=1.0, seed=0)

    # Assert: both learn the 10 digits well above chance; the DP model's keys are unchanged (Opacus detached)
    assert accuracy(plain, digits.test.images, digits.test.labels) > 0.85
    assert accuracy(private, digits.test.images, digits.test.labels) > 0.5
    assert set(private.state_dict()) == set(before)
    assert not torch.equal(private.head[2].weight, before["head.2.weight"])
    assert event["mechanism"] == "dp-sgd" and event["noise_multiplier"] == 1.0


def test_scatter_pca_whitens_the_public_features_and_trains_1290_weights(digits) -> None:
    # Prepare
    scattering._fitted.clear()

    # Execute
    model = build_model("scatter-pca", 10, (8, 8), seed=0, public=digits.public.images)
    head, features = scattering.fixed_stage(model, images_to_tensor(digits.public.images))
    with torch.no_grad():
        projected = head[2](head[1](head[0](features)))

    # Assert: on the public set the 128 components are centred, uncorrelated and of unit variance
    assert count_parameters(model) == 128 * 10 + 10 == count_parameters(model.head[3])
    assert torch.allclose(projected.mean(0), torch.zeros(128), atol=1e-3)
    assert torch.allclose(projected.T @ projected / len(projected), torch.eye(128), atol=2e-3)
    require_dp_compatible(model)


def test_scatter_pca_fits_the_same_projection_from_the_same_public_set_and_restores_from_saved_weights(
    digits, tmp_path
) -> None:
    # Prepare
    from safetensors.torch import load_file, save_file

    scattering._fitted.clear()
    first = build_model("scatter-pca", 10, (8, 8), seed=0, public=digits.public.images)
    scattering._fitted.clear()  # fitted again, not taken from the cache
    second = build_model("scatter-pca", 10, (8, 8), seed=1, public=digits.public.images.copy())
    other = build_model("scatter-pca", 10, (8, 8), seed=0, public=digits.private.images[:300])

    # Execute: saved as a node saves its teacher, restored into a model built without the public set
    save_file(first.state_dict(), str(tmp_path / "teacher.safetensors"))
    restored = build_model("scatter-pca", 10, (8, 8))
    restored.load_state_dict(load_file(str(tmp_path / "teacher.safetensors")))

    # Assert: the same public set gives the same projection (signs included); another set another one
    assert torch.allclose(first.projection.basis, second.projection.basis, atol=1e-4)
    assert not torch.allclose(first.projection.basis, other.projection.basis, atol=1e-2)
    assert torch.equal(restored.projection.basis, first.projection.basis) and bool(restored.projection.fitted)
    assert torch.equal(predict_logits(restored, digits.test.images), predict_logits(first, digits.test.images))


def test_an_unfitted_scatter_pca_and_a_too_small_public_set_are_refused_with_the_fix(digits) -> None:
    # Execute / Assert
    with pytest.raises(RuntimeError, match="fitted on the public set first"):
        predict_logits(build_model("scatter-pca", 10, (8, 8)), digits.test.images)
    with pytest.raises(ConfigError, match="only 100 samples; raise public-size"):
        build_model("scatter-pca", 10, (8, 8), public=digits.public.images[:100])


def test_dp_sgd_trains_only_scatter_pca_s_linear_layer_and_onnx_labels_as_torch(digits) -> None:
    # Prepare
    model = build_model("scatter-pca", 10, (8, 8), seed=2, public=digits.public.images)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()

    # Execute
    train_dpsgd(model, digits.private.images, digits.private.labels, epochs=10, lr=0.01, batch_size=64,
                noise_multiplier=1.0, max_grad_norm=1.0, seed=0)
    rows = np.concatenate([digits.test.images] * 3)  # over ENGINE_MIN_ROWS: labelled in onnxruntime
    with torch.no_grad():
        whole = model.eval()(images_to_tensor(rows))

    # Assert: the projection is what the public set gave; the layer learnt the digits well above chance
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before if not k.startswith("head.3"))
    assert not torch.equal(model.head[3].weight, before["head.3.weight"])
    assert accuracy(model, digits.test.images, digits.test.labels) > 0.6
    assert len(rows) >= ENGINE_MIN_ROWS and torch.allclose(predict_logits(model, rows), whole, atol=1e-4)


def test_scatter_pca_fits_once_per_public_set_in_a_process(digits) -> None:
    # Prepare
    from unittest import mock

    scattering._fitted.clear()

    # Execute: two builds on the same public set (another array of the same content), one on another set
    with mock.patch.object(scattering.PublicProjection, "fit", autospec=True,
                           wraps=scattering.PublicProjection.fit) as fit:
        first = build_model("scatter-pca", 10, (8, 8), public=digits.public.images)
        again = build_model("scatter-pca", 10, (8, 8), public=digits.public.images.copy())
        build_model("scatter-pca", 10, (8, 8), public=digits.private.images[:300])

    # Assert
    assert fit.call_count == 2
    assert torch.equal(first.projection.basis, again.projection.basis)


def test_scatter_pca_mlp_projects_on_256_components_trains_its_two_layers_and_restores(digits, tmp_path) -> None:
    # Prepare
    from safetensors.torch import load_file, save_file

    scattering._fitted.clear()
    model = build_model("scatter-pca-mlp", 10, (8, 8), seed=0, public=digits.public.images)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # Execute
    train_supervised(model, digits.private.images, digits.private.labels, epochs=10, lr=0.003, batch_size=64, seed=0)
    head, features = scattering.fixed_stage(model, images_to_tensor(digits.public.images))
    with torch.no_grad():
        projected = head[2](head[1](head[0](features)))
    save_file(model.state_dict(), str(tmp_path / "teacher.safetensors"))
    restored = build_model("scatter-pca-mlp", 10, (8, 8))
    restored.load_state_dict(load_file(str(tmp_path / "teacher.safetensors")))

    # Assert: 256 centred components, then 256 hidden units and the output layer learn; the projection does not
    assert count_parameters(model) == 256 * 256 + 256 + 256 * 10 + 10 == count_parameters(model.head[3:])
    assert projected.shape == (len(digits.public.images), 256)
    assert torch.allclose(projected.mean(0), torch.zeros(256), atol=1e-3)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before if k.startswith("head.2"))
    assert not torch.equal(model.head[3].weight, before["head.3.weight"])
    assert not torch.equal(model.head[5].weight, before["head.5.weight"])
    assert accuracy(model, digits.test.images, digits.test.labels) > 0.85
    assert torch.equal(predict_logits(restored, digits.test.images), predict_logits(model, digits.test.images))
